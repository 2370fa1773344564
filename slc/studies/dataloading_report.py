"""What the data-loading benchmark shows people: metrics/dataloading.json, a Markdown report and a plot.

Kept apart from the measuring (`dataloading.py`) so that the layout is tested on a fixed result
dict without timing anything. The JSON has one entry per kind, `{"images_per_s": {"<workers>": v},
...}`, and "machine" beside them.
"""
from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from slc.core.files import save_figure, write_json, write_text_atomic
from slc.studies.dataloading import KINDS

MACHINE = "machine"
ISSUE_REFERENCE = ("The issue's own figures, on an ImageFolder of 500x375 JPEGs prepared at 224 px: 214 images/s "
                   "with 0 workers, 374 with 2.")


def kinds_of(study: dict) -> dict[str, dict]:
    return {name: figures for name, figures in study.items() if name != MACHINE}


def figures_markdown(study: dict) -> str:
    """One row per kind and worker count: the median images/s, its spread, the gain over 0 workers."""
    rows = []
    for name, kind in kinds_of(study).items():
        rate = kind["images_per_s"]
        for w, value in rate.items():
            gain = f"x{value / rate['0']:.2f}" if "0" in rate else "n/a"
            rows.append([name, w, f"{value:,.1f}", f"{kind['images_per_s_min'][w]:,.1f}",
                         f"{kind['images_per_s_max'][w]:,.1f}", gain, f"{kind['startup_s'][w] * 1000:.1f}"])
    return tabulate(rows, ("kind", "workers", "images/s (median)", "min", "max", "vs 0 workers", "start-up ms"),
                    tablefmt="github", disable_numparse=True)


def settings_markdown(study: dict) -> str:
    rows = [[name, s["preset"], s["dataset"], "x".join(map(str, s["input_shape"])), s["batch_size"], s["augment"],
             f"{s['images']:,}"] for name, s in ((name, kind["settings"]) for name, kind in kinds_of(study).items())]
    table = tabulate(rows, ("kind", "preset", "data.name", "input", "batch", "augment", "train images"),
                     tablefmt="github", disable_numparse=True)
    data = [f"- {name}: {KINDS[name].about}." for name in kinds_of(study) if name in KINDS]
    return "\n".join([table, "", *data])


def report_markdown(study: dict) -> str:
    m, first = study[MACHINE], next(iter(kinds_of(study).values()))["settings"]
    repeats, budget_s, threads = first["repeats"], first["budget_s"], first["threads"]
    load = lambda values: ", ".join(f"{x:.2f}" for x in values)
    return "\n\n".join([
        "# Data loading: images per second into training",
        "Training's own loader (`slc.train.training.train_loader`: shuffled, full batches, 4 batches prefetched per "
        "worker) over each kind's prepared train split with its preset's augmentation; images/s counts the "
        "normalised float32 images it delivers (the training input) per second of wall time, nothing trained. "
        f"Each pass is a fresh loader: start-up is the time to its first batch (workers started, one batch made); "
        f"the clock then starts after the first batch of each worker (all made at once) and runs until {budget_s:g} s "
        f"or the end of the split. {repeats} passes per worker count, the counts interleaved; median, min and max "
        f"over the passes. With 0 workers the batches are made in the measuring process on {threads} torch "
        f"thread{'s' * (threads != 1)}, as in a training process of {threads} CPU{'s' * (threads != 1)} (Ray sets "
        "OMP_NUM_THREADS to a Train worker's CPUs: 1 on the default grid); each loader worker uses 1 (PyTorch sets "
        "it). The data is written to a scratch folder just before (so files are in the page cache) and removed after.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']}, Python {m['python']}. "
        f"A {m['cores']}-core machine shared with other work: the load average was {load(m['load_average'])} at the "
        f"start and {load(m['load_average_end'])} at the end, so figures vary from run to run.",
        figures_markdown(study),
        "Settings (read from the presets when the benchmark runs):",
        settings_markdown(study),
        ISSUE_REFERENCE,
        "![data loading](../plots/dataloading.png)"])


def write_plot(study: dict, path: Path) -> None:
    """Images/s per kind, one bar per worker count (min to max as the error bar), on a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = kinds_of(study)
    workers = sorted({w for kind in kinds.values() for w in kind["images_per_s"]}, key=int)
    width = 0.8 / max(1, len(workers))
    figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(kinds) + 2), 4.2))
    for i, w in enumerate(workers):
        x = [k + (i - (len(workers) - 1) / 2) * width for k in range(len(kinds))]
        median = [kind["images_per_s"].get(w, float("nan")) for kind in kinds.values()]
        low = [m - kind["images_per_s_min"].get(w, m) for m, kind in zip(median, kinds.values())]
        high = [kind["images_per_s_max"].get(w, m) - m for m, kind in zip(median, kinds.values())]
        bars = axes.bar(x, median, width, yerr=[low, high], capsize=3, label=f"{w} worker{'s' * (w != '1')}")
        axes.bar_label(bars, labels=[f"{v:,.0f}" for v in median], fontsize=7, padding=2)
    axes.set_xticks(range(len(kinds)), [f"{name}\n{kind['settings']['preset']}" for name, kind in kinds.items()],
                    fontsize=8)
    axes.set(yscale="log", ylabel="images/s delivered",
             title=f"Training's loader, per dataset kind ({study[MACHINE]['cores']} CPU cores)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def write_outputs(study: dict, metrics: Path, table: Path, plot: Path) -> None:
    write_json(metrics, study)
    write_plot(study, plot)
    write_text_atomic(table, report_markdown(study) + "\n")
