"""What `benchmark` shows people: the paper-style Table 2 beside ours, the plots, the MLflow run.

Kept apart from the measuring (`benchmark.py`) so that the layout is tested on a fixed result
dict without timing anything.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from tabulate import tabulate

from slc.bench.results import FLOOR_TOLERANCE, Architecture, Ratio, SpeedupResults, Timing, write_speedup
from slc.core.files import save_figure, write_text_atomic
from slc.core.tracking import RunLog

TITLE = "Single-logit speedup: the paper's Table 2 in onnxruntime"
# The paper's Table 2: SLC forward time (ms) and full-model time / SLC time at 2^14, 2^18, 2^18.5.
PAPER_K = (2 ** 14, 2 ** 18, int(2 ** 18.5))  # 2^18.5 = 370,727.6: the params use 370,727
PAPER_TABLE2: dict[str, tuple[float, tuple[float, float, float]]] = {
    "alexnet": (3.6, (1.14, 5.68, 21.38)),
    "vgg16": (9.4, (1.05, 2.79, 8.52)),
    "inception_v3": (6.0, (1.09, 3.11, 12.75)),
    "resnet50": (6.1, (1.08, 3.11, 12.69)),
    "resnet101": (8.0, (1.04, 2.95, 10.10)),
}
PLOT_FIELDS = ("architecture", "k", "backbone_ms", "single_logit_ms", "full_ms", "head_ms", "predicted_full_ms",
               "full_vs_floor", "speedup", "speedup_limit", "peak_rss_gb")


def k_label(k: int) -> str:
    """2^14, 2^18.5, ... where k is a (half-)power of two as in the paper, else k with commas."""
    exponent = round(2 * math.log2(k)) / 2 if k > 1 else 0
    if k > 2 and int(2 ** exponent) == k:
        return f"2^{exponent:g}"
    return f"{k:,}"


def rows(architectures: dict[str, Architecture]) -> list[dict]:
    """One flat row per architecture (or trained run) and k: the plot data and the detail tables;
    each ratio is its median over the rounds that are not outliers."""
    out = []
    for arch, a in architectures.items():
        for k, r in sorted(a.k.items()):
            out.append({"architecture": arch, "k": k, "backbone_ms": r.backbone.median_ms,
                        "single_logit_ms": r.single_logit.median_ms, "full_ms": r.full.median_ms,
                        "head_ms": r.head.median_ms, "full_vs_floor": r.full_vs_floor.median,
                        **r.model_dump(include={"predicted_full_ms", "speedup", "speedup_limit", "peak_rss_gb",
                                                "head_gb"}),
                        "at_k": r})
    return out


def _ms(t: Timing) -> str:
    return f"{t.median_ms:.1f} ({t.p10_ms:.1f}–{t.p90_ms:.1f})"


def _ratio(r: Ratio, digits: int = 2) -> str:
    """median (min–max) over the rounds kept, and how many were left out."""
    text = f"{r.median:.{digits}f} ({r.min:.{digits}f}–{r.max:.{digits}f})"
    return text + (f", {len(r.outliers)} out" if r.outliers else "")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    """GitHub Markdown; numparse off, so that x1.00 and 400,000 are printed as formatted here."""
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def table2_markdown(results: SpeedupResults) -> str:
    """Paper layout: SLC time, then full / SLC per k; ours, the bandwidth limit and the paper's."""
    ks = sorted({k for a in results.architectures.values() for k in a.k})
    rows = []
    for arch, a in results.architectures.items():
        top = a.largest
        factor = lambda key: [f"x{getattr(a.k[k], key):.2f}" if k in a.k else "—" for k in ks]
        rows += [[f"{arch} (ours)", f"{top.single_logit.median_ms:.1f} ms", *factor("speedup")],
                 [f"{arch} (bandwidth floor)", f"{top.backbone.median_ms:.1f} ms (backbone)",
                  *factor("speedup_limit")]]
        if arch in PAPER_TABLE2:
            slc, factors = PAPER_TABLE2[arch]
            paper = dict(zip(PAPER_K, factors))
            rows.append([f"{arch} (paper)", f"{slc} ms", *(f"x{paper[k]:.2f}" if k in paper else "—" for k in ks)])
    return _table(rows, ["architecture", "SLC time", *(f"k = {k_label(k)}" for k in ks)])


def details_markdown(architectures: dict[str, Architecture], first: str = "architecture") -> str:
    """Every measurement of `architectures` (or of the trained exports, with `first` = "run")."""
    headers = [first, "k", "head GB", "backbone ms", "single_logit ms", "full ms", "head alone ms", "floor ms",
               "full / floor", "full / (backbone + head)", "single / backbone", "speedup", "at the floor",
               "peak RSS GB"]
    return _table([[r["architecture"], f"{r['k']:,}", f"{r['head_gb']:.2f}", _ms(r["at_k"].backbone),
                    _ms(r["at_k"].single_logit), _ms(r["at_k"].full), _ms(r["at_k"].head),
                    f"{r['predicted_full_ms']:.1f}", _ratio(r["at_k"].full_vs_floor),
                    _ratio(r["at_k"].full_vs_backbone_plus_head), _ratio(r["at_k"].single_vs_backbone, 3),
                    f"x{r['speedup']:.2f}", f"x{r['speedup_limit']:.2f}", f"{r['peak_rss_gb']:.2f}"]
                   for r in rows(architectures)], headers)


def rounds_markdown(results: SpeedupResults) -> str:
    """Every round of each k where a round was left out or full / floor fell below the tolerance:
    there a single number would hide what happened."""
    table = []
    for prefix, architectures in (("", results.architectures), ("trained ", results.exports)):
        for r in rows(architectures):
            at_k = r["at_k"]
            ratio = at_k.full_vs_floor
            if not ratio.outliers and min(ratio.rounds) >= FLOOR_TOLERANCE:
                continue
            mark = lambda i, text: f"{text}*" if i in ratio.outliers else text
            table.append([f"{prefix}{r['architecture']}", f"{r['k']:,}",
                          " ".join(mark(i, f"{x:.2f}") for i, x in enumerate(ratio.rounds)),
                          " ".join(mark(i, f"{x:.3g}") for i, x in enumerate(at_k.backbone.rounds_ms)),
                          " ".join(mark(i, f"{c / b:.2f}") for i, (c, b) in
                                   enumerate(zip(at_k.control.rounds_ms, at_k.backbone.rounds_ms)))
                          if at_k.control else "—",
                          " ".join(mark(i, f"{x:.1f}") for i, x in enumerate(at_k.gbps))])
    if not table:
        return (f"Every round of every k had its full model at or above {FLOOR_TOLERANCE} of its floor, and no round "
                "was an outlier.")
    return ("Each round of the k where a round was left out (marked *) or full / floor fell below "
            f"{FLOOR_TOLERANCE}:\n\n" + _table(table, ["model", "k", "full / floor per round", "backbone ms per round",
                                                     "control / backbone per round", "B GB/s per round"]))


def exports_markdown(exports: dict[str, Architecture]) -> str:
    if not exports:
        return "No trained exports were found (run `dvc repro export` first)."
    return ("Each run's own model.onnx (full) against its single_logit.onnx and backbone, at the run's k and d, "
            "judged by the same bandwidth floor.\n\n" + details_markdown(exports, first="run"))


def paper_reading(results: SpeedupResults) -> str:
    """Why our speedup differs from the paper's, from the figures themselves: the ratio is
    1 + (head read time) / (backbone time), and both terms depend on the machine."""
    bw = results.bandwidth
    out = []
    for arch, a in results.architectures.items():
        if arch not in PAPER_TABLE2:
            continue
        slc, factors = PAPER_TABLE2[arch]
        k = PAPER_K[-1]
        head_ms = (factors[-1] - 1) * slc
        head_gb = 4 * a.d * k / 1e9
        ours = a.largest
        out.append(f"- {arch}: the paper's x{factors[-1]:.2f} at 2^18.5 means its {head_gb:.2f} GB head took about "
                   f"{head_ms:.0f} ms beside a {slc} ms network, an effective {head_gb / head_ms * 1e3:.0f} GB/s "
                   f"against a fast backbone. Here the backbone takes {ours.backbone.median_ms:.0f} ms on "
                   f"{results.machine['cores']} CPU cores and memory streams at {bw['min_gbps']:.1f}-"
                   f"{bw['max_gbps']:.1f} GB/s, so the head costs less relative to the backbone: even a full model "
                   f"at the bandwidth floor would be x{ours.speedup_limit:.2f} the backbone's time (measured speedup "
                   f"x{ours.speedup:.2f}).")
    return "\n".join(out) or f"None of the paper's architectures ({', '.join(PAPER_TABLE2)}) was benchmarked."


def goals_markdown(goals: dict[str, float | bool]) -> str:
    lines = [f"- single_logit.onnx / backbone alone, worst k (median of its rounds): {goals['max_single_vs_backbone']:.3f} "
             f"(goal ≤ 1.05: {'met' if goals['single_within_1.05x_of_backbone'] else 'missed'})",
             f"- full model / bandwidth floor, worst k (median of its rounds): {goals['max_full_vs_floor']:.2f} "
             f"(goal ≤ 1.15: {'met' if goals['full_within_1.15x_of_floor'] else 'missed'})",
             f"- full model / bandwidth floor, lowest round of every k and trained export, outliers left out: "
             f"{goals['min_full_vs_floor']:.2f} (a bound: ≥ {FLOOR_TOLERANCE} in every round: "
             f"{'held' if goals['full_at_or_above_0.95_of_floor'] else 'broken (the rounds are below)'})"]
    lines += [f"- {key.replace('_', ' ')}: x{value:.2f}" for key, value in goals.items() if "speedup" in key]
    return "\n".join(lines)


def summary_markdown(results: SpeedupResults, heading: str = "##") -> str:
    """The machine, the settings, the bandwidth, then Table 2 under `heading`: the part of the
    report that the README shows too (rendered from metrics/speedup.json)."""
    m, s, bw = results.machine, results.settings, results.bandwidth
    session = s["session"]
    providers = sorted({p for a in results.architectures.values() for r in a.k.values()
                        for timing in (r.full, r.single_logit, r.backbone) for p in timing.providers_used})
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, GPU: {m['gpu'] or 'none'}; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average'])}.",
        f"Settings: batch {s['batch_size']}, providers used {', '.join(providers)}, "
        f"{session['intra_op_threads']} intra-op threads, {session['execution_mode']}, "
        f"{session['graph_optimization_level']}, prepacking {'on' if session['prepacking'] else 'off'}; "
        f"{s['warmup']} warm-up then {s['repeats']} timed runs per model in {s['rounds']} rounds, interleaved with "
        "the head alone and the bandwidth reads; median (p10–p90) in ms. Random weights (latency does not depend "
        "on their values).",
        f"Memory bandwidth B: {bw['method']}. Bandwidth floor, per round: a full model takes at least backbone + "
        "4·d·k bytes / B of the same round; each ratio is the median (min–max) of its rounds, leaving out a round "
        "that cannot resolve the 5% the floor is judged on: its two sessions of the backbone (the same work, timed "
        f"beside the models) differ by more than a factor {1 / FLOOR_TOLERANCE:.3f}, or its backbone time is "
        "beyond Tukey's fences (1.5 interquartile ranges past the quartiles) of its k.", "",
        f"{heading} Full k-class model time / single-logit time", "",
        "SLC time: single_logit.onnx at the largest k. Bandwidth floor: the floor over the backbone alone, what a "
        "single logit gains over a full model that reads its head at B; no correct measurement of a full model is "
        "faster, so ours is at least this (less the single logit's cost over the backbone).", "",
        table2_markdown(results)])


def speedup_markdown(results: SpeedupResults) -> str:
    return "\n".join([
        f"# {TITLE}", "", summary_markdown(results), "",
        "## Goals", "", goals_markdown(results.goals), "",
        "## Why the speedup differs from the paper's", "", paper_reading(results), "",
        "## Every measurement", "", details_markdown(results.architectures), "",
        "## Rounds", "", rounds_markdown(results), "",
        "## The trained runs' exports", "", exports_markdown(results.exports), ""])


def plot_csv(results: SpeedupResults) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PLOT_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(results.architectures))
    return buffer.getvalue()


def write_plot_png(results: SpeedupResults, path: Path) -> None:
    """Latency and speedup against k (log scales), one colour per architecture, limits dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arch in enumerate(results.architectures):
        mine = [r for r in rows(results.architectures) if r["architecture"] == arch]
        k = [r["k"] for r in mine]
        colour = f"C{i}"
        left.plot(k, [r["full_ms"] for r in mine], "o-", color=colour, label=f"{arch} full k-class")
        left.plot(k, [r["single_logit_ms"] for r in mine], "s:", color=colour, label=f"{arch} single logit")
        left.plot(k, [r["predicted_full_ms"] for r in mine], "--", color=colour, alpha=0.6,
                  label=f"{arch} bandwidth floor")
        right.plot(k, [r["speedup"] for r in mine], "o-", color=colour, label=f"{arch} measured")
        right.plot(k, [r["speedup_limit"] for r in mine], "--", color=colour, alpha=0.6, label=f"{arch} at the floor")
    trained = rows(results.exports)
    if trained:  # one marker per run at its own k, labelled once
        k = [r["k"] for r in trained]
        left.plot(k, [r["full_ms"] for r in trained], "k*", label="trained exports: model.onnx")
        left.plot(k, [r["single_logit_ms"] for r in trained], "kx", label="trained exports: single_logit.onnx")
        right.plot(k, [r["speedup"] for r in trained], "k*", label="trained exports measured")
        right.plot(k, [r["speedup_limit"] for r in trained], "k_", markersize=12, label="trained exports at the floor")
    for ax, ylabel in ((left, "latency (ms, median)"), (right, "speedup (full / single logit)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("number of classes k")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"batch {results.settings['batch_size']}, {results.machine['cpu']}, "
                 f"{results.settings['session']['intra_op_threads']} threads")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_outputs(results: SpeedupResults, metrics: Path, table: Path, plots: Path) -> None:
    write_speedup(metrics, results)
    write_text_atomic(table, speedup_markdown(results))
    write_text_atomic(plots / "speedup.csv", plot_csv(results))
    write_plot_png(results, plots / "speedup.png")


def mlflow_log(results: SpeedupResults, table: Path, plots: Path) -> RunLog:
    """The benchmark's own MLflow run: settings as params, every figure as a metric stepped by k (so the
    UI draws it against k), the table and the plots as artifacts."""
    metrics = [("bandwidth_gbps", results.bandwidth["gbps"], 0)]
    for prefix, architectures in (("", results.architectures), ("trained/", results.exports)):
        metrics += [(f"{prefix}{r['architecture']}/{key}", float(r[key]), r["k"])
                    for r in rows(architectures) for key in PLOT_FIELDS[2:]]
    metrics += [(f"goals/{key}", float(value), 0) for key, value in results.goals.items()]
    return RunLog(metrics=metrics, params={"benchmark": results.settings, "machine": results.machine},
                  files=[(path, None) for path in (table, plots / "speedup.png", plots / "speedup.csv")])
