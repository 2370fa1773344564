"""What the search benchmark shows people: results/search.md, plots/search.png and the README's example
picture (docs/search_example.png), from the study dict that metrics/search.json holds, so the layout is
tested on a fixed dict without timing anything."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tabulate import tabulate

from slc.bench.report import k_label
from slc.core.files import save_figure, write_json, write_text_atomic

QUERY_COLUMNS = ("N", "exact ms (p99)", "exact q/s", "read limit ms", "exact / limit", "sq8 ms (p99)", "sq8 q/s",
                 "sq8 recall")


def _table(rows: list[list[str]], headers) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _number(value: float) -> str:
    """Three figures or more, commas above a thousand: 0.123, 4.56, 400, 7,000,000."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _diff(value: float | None) -> str:
    return "not compared" if value is None else f"{value:.1e}" if value else "0"


def queries_markdown(queries: dict[str, dict]) -> str:
    """One row per N: the queries beside the limit; then the full-head alternative per k."""
    rows, full = [], []
    ks = list(next(iter(queries.values()))["full_ms"])
    for n, q in sorted(queries.items(), key=lambda item: int(item[0])):
        rows.append([f"{int(n):,}", f"{_number(q['exact_ms'])} ({_number(q['exact_p99_ms'])})", _number(q["exact_qps"]),
                     _number(q["limit_ms"]), f"x{q['exact_vs_limit']:.2f}",
                     f"{_number(q['compressed_ms'])} ({_number(q['compressed_p99_ms'])})", _number(q["compressed_qps"]),
                     f"{q['compressed_recall']:.3f}"])
        full.append([f"{int(n):,}", *(f"{_number(q['full_ms'][k])}{' *' if q['full_extrapolated'][k] else ''}" for k in ks),
                     *(f"x{_number(q['full_vs_exact'][k])} (x{_number(q['predicted_full_vs_exact'][k])})" for k in ks)])
    headers = ["N", *(f"full k={k_label(int(k))} ms" for k in ks),
               *(f"full / exact at k={k_label(int(k))} (physics)" for k in ks)]
    return _table(rows, QUERY_COLUMNS) + "\n\n" + _table(full, headers)


def build_markdown(builds: dict) -> str:
    rows = [[how, f"{b['images']:,}", f"{b['wall_s']:.2f}", f"{b['images_per_s']:,.0f}",
             f"{b['threads']} per {'actor' if how == 'ray' else 'process'}"]
            for how, b in builds.items() if how in ("single", "ray")]
    return _table(rows, ["build", "images", "wall s", "images/s", "onnxruntime threads"])


def quality_markdown(quality: dict) -> str:
    rows = [[loss, ", ".join(at["runs"]), _diff(at["max_abs_diff"]), _diff(at["max_abs_diff_evaluate_file"])]
            for loss, at in quality["losses"].items()]
    return _table(rows, ["loss", "runs", "worst difference vs precision_recall_at", "vs evaluate's file"])


def example_markdown(examples: list[dict]) -> str:
    first = examples[0]
    rows = [[e["run"], f"{e['threshold']:.3f}", f"{e['found']:,}", f"{e['right']:,}",
             f"{e['right'] / e['found']:.3f}" if e["found"] else "n/a", f"{e['right'] / e['positives']:.3f}"]
            for e in examples]
    return (f"Searching the test split for class {first['class_id']} ({first['class_name']}) at recall "
            f"{first['recall_target']:g}, {first['positives']:,} images of it there:\n\n"
            + _table(rows, ["run", "threshold", "found", "of the class", "precision", "recall"]))


def goals_markdown(goals: dict) -> str:
    lines = ["Goals, as measured (not asserted):"]
    if "exact_vs_limit" in goals:
        lines.append(f"- exact query at N = {goals['n']:,} against reading its features once at B (goal <= x1.5): "
                     f"x{goals['exact_vs_limit']:.2f}")
        lines.append(f"- SLC query against the full head at k = {goals['k']:,}, N = {goals['n']:,} (goal >= k/20 = "
                     f"x{goals['k'] / 20:,.0f}): x{_number(goals['full_vs_exact'])}; physics predicts "
                     f"x{_number(goals['predicted_full_vs_exact'])}")
    lines.append(f"- search's precision and recall against evaluate's (goal <= 1e-6): {_diff(goals['quality_max_abs_diff'])}")
    return "\n".join(lines)


def method_markdown(study: dict) -> str:
    """How the query figures were made: the machine, the data, the calls and the rounds."""
    machine, s = study["machine"], study["settings"]
    return " ".join([
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, load average",
        f"{', '.join(f'{x:.1f}' for x in machine['load_average'])} at the start;",
        f"FAISS {machine['faiss']} on {s['faiss_threads']} OpenMP threads,",
        f"numpy {machine['numpy']}, onnxruntime {machine['onnxruntime']}. Export {s['run']} (d = {s['d']}).",
        f"Memory bandwidth B: {study['bandwidth']['method']}.",
        f"At each N the stored features are random float32 vectors of d = {s['d']} (a query's cost depends on their",
        "number and size, not their values), written as a flat (exact) and an sq8 (a byte a feature) index bound to",
        "the export and queried through `SearchIndex.search`, each query for the next of the export's classes at a",
        f"threshold that keeps a share {s['found']:g} of the images (what is found has its logits computed again in",
        "float64, as every search does). Read limit: N d 4 bytes at that round's B (sq8's: N d bytes). Full: every",
        "stored image's k logits, features @ W^T + b of a random (k, d) head in chunks (numpy's BLAS; the product",
        "alone, deciding by a softmax would add to it); * extrapolated: a head above",
        f"{s['full_rows']:,} rows is not computed whole, a {s['slice_images']:,} x {s['slice_rows']:,} slice is timed",
        "and scaled by N k over its size (the whole product at the slice's FLOP rate F). Physics: the larger of",
        "2 N k d FLOPs at F and reading N d + k d floats at B, over the read limit. Each N's calls are timed",
        f"interleaved in {s['rounds']} rounds of {s['repeats']} runs after {s['warmup']} warm-up runs; ms are medians",
        "(p99 in brackets, over every run of the call after the warm-up), q/s one stream's (1000 / median), every",
        "ratio the median of its rounds'."])


def build_intro(study: dict) -> str:
    s, build = study["settings"], study["build"]
    text = (f"Index build of {build['single']['images']:,} images of the {s['split']} split of {s['data']} "
            f"(`serving.index_build.build`, flat, batch {s['batch_size']})")
    if "ray" not in build:
        return text + "; Ray not run:"
    return (text + f"; through Ray Data, a new local Ray (started in {build['ray_init_s']:.1f} s, not counted) whose "
            f"actors' start is counted; the two indexes are {'equal' if build['same_index'] else 'NOT equal'}:")


def report_markdown(study: dict) -> str:
    s = study["settings"]
    parts = ["# Search: a class query against reading the features once, and against the full head",
             method_markdown(study), queries_markdown(study["queries"]),
             f"F, the GEMM slice's rate: {study['gemm_gflops']:.0f} GFLOP/s (median over every round).",
             build_intro(study), build_markdown(study["build"]),
             f"Quality: the {s['split']} split indexed through every run's export and searched for every class (a "
             f"seeded sample of {s['quality_classes']:,} above that many) at each recall target with a threshold; the "
             f"worst absolute difference of precision and recall over classes, recalls and seeds, against evaluate's "
             f"rule (precision_recall_at on the export's own logits, the same thresholds) and against the evaluate "
             f"stage's {s['thresholds_test']}:",
             quality_markdown(study["quality"])]
    if study.get("example"):
        parts += [example_markdown(study["example"]), f"![search example](../{s['example_plot']})"]
    parts += [goals_markdown(study["goals"]), "![search](../plots/search.png)"]
    return "\n\n".join(parts)


def write_plot(study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = dict(sorted(study["queries"].items(), key=lambda item: int(item[0])))
    n = [int(key) for key in queries]
    figure, (latency, build) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2, 1]})
    for key, label, style in (("exact_ms", "exact (flat)", "o-"), ("limit_ms", "read limit N d 4 / B", "k+:"),
                              ("compressed_ms", "sq8", "s-")):
        latency.plot(n, [q[key] for q in queries.values()], style, label=label)
    for k in next(iter(queries.values()))["full_ms"]:
        extrapolated = next(iter(queries.values()))["full_extrapolated"][k]
        latency.plot(n, [q["full_ms"][k] for q in queries.values()], "x--" if extrapolated else "x-",
                     label=f"full head k={k_label(int(k))}{' (extrapolated)' if extrapolated else ''}")
    latency.set(xscale="log", yscale="log", xlabel="stored images N", ylabel="ms per query",
                title=f"one class query, d = {study['settings']['d']}")
    latency.grid(alpha=0.3)
    latency.legend(fontsize=8)
    hows = [how for how in ("single", "ray") if how in study["build"]]
    build.bar(hows, [study["build"][how]["images_per_s"] for how in hows], color=["tab:blue", "tab:orange"][:len(hows)])
    build.set(ylabel="images/s", title="index build")
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def write_example(examples: list[dict], images: np.ndarray, path: Path) -> None:
    """A row per run: its best results, then the last it found (nearest the threshold), framed green where the
    image is of the class and red where not."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(e["best"]) + len(e["last"]) for e in examples) + 1
    figure, axes = plt.subplots(len(examples), columns, figsize=(1.3 * columns, 1.6 * len(examples)), squeeze=False)
    for row, e in zip(axes, examples):
        tiles = [*zip(e["best"], e["best_right"]), (None, None), *zip(e["last"], e["last_right"])]
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off")
        for ax, (image_id, right) in zip(row, tiles):
            if image_id is None:
                ax.text(0.5, 0.5, "...", ha="center", va="center", fontsize=14)
                continue
            picture = np.asarray(images[image_id])  # (C, H, W) as stored
            ax.imshow(picture[0] if picture.shape[0] == 1 else picture.transpose(1, 2, 0), cmap="gray")
            ax.axis("on")
            for spine in ax.spines.values():
                spine.set(color="tab:green" if right else "tab:red", linewidth=3)
        row[0].set_title(f"{e['run']}: {e['found']:,} found, {e['right']:,} right", loc="left", fontsize=9)
    first = examples[0]
    figure.suptitle(f"search for {first['class_name']} at recall {first['recall_target']:g}: best first, then the "
                    f"last found (green: of the class, red: not)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def write_outputs(study: dict, metrics: Path, table: Path, plot: Path) -> None:
    write_json(metrics, study)
    write_plot(study, plot)
    write_text_atomic(table, report_markdown(study) + "\n")
