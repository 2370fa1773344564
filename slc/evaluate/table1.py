"""What `evaluate` shows people: the paper-style Table 1, the plot data `dvc plots` renders, PNGs.

Kept apart from the computation in `evaluate.py` so that the numbers can be tested without
matplotlib, and so that the table's layout can change without touching how it is measured.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from tabulate import tabulate

from slc.core.files import write_json
from slc.evaluate.metrics import MIN_RELATIVE_BASE, recall_key
from slc.nn.losses import HEAD_BIASES, PAPER_LOSSES

# The paper's Table 1 (1-AUPRC, 1-P@0.9, 1-P@0.99): mean non-PoLS, mean PoLS, relative improvement.
PAPER_TABLE1: dict[str, tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]] = {
    "MNIST": ((.010, .011, .232), (.002, .001, .027), (.800, .909, .884)),
    "SVHN": ((.022, .026, .538), (.017, .016, .319), (.236, .396, .408)),
    "CIFAR-10": ((.101, .305, .704), (.074, .211, .608), (.269, .309, .137)),
    "CIFAR-100": ((.487, .879, .975), (.405, .834, .971), (.168, .052, .004)),
    "ImageNet (CE vs batch CE)": ((.366, .739, .932), (.245, .563, .865), (.331, .238, .072)),
}
# Our dataset names -> the paper's nearest dataset (Fashion-MNIST: same images and network as MNIST).
NEAREST_PAPER_DATASET = {"mnist": "MNIST", "fashion_mnist": "MNIST", "svhn": "SVHN",
                         "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
                         "imagenet": "ImageNet (CE vs batch CE)"}
PAPER_COLUMNS = "1-AUPRC / 1-P@0.9 / 1-P@0.99"


def error_names(recalls: list[float]) -> list[str]:
    """The paper's error columns in our metric names: 1-auprc, then 1-p_at_<r> per recall target."""
    return ["1-auprc", *(f"1-p_at_{recall_key(r)}" for r in recalls)]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _fmt_spread(mean: float, std: float, seeds: int) -> str:
    return _fmt(mean) if seeds < 2 else f"{_fmt(mean)} ± {_fmt(std)}"


def _fmt_gain(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    """GitHub Markdown; numparse off, so that 0.100 and 22.1% are printed as formatted here."""
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def _absolute(errors: dict) -> float:
    return errors["non_pols"] - errors["pols"]


# Table 1's bold rows: label, the figure from one error's slc.json summary, format, row of PAPER_TABLE1
# (None: the paper has no such row).
SUMMARY_ROWS = (("mean non-PoLS", lambda e: e["non_pols"], _fmt, 0), ("mean PoLS", lambda e: e["pols"], _fmt, 1),
                ("absolute improvement", _absolute, _fmt, None),
                ("relative improvement", lambda e: e["relative_improvement"], _fmt_gain, 2))


def table1_title(settings: dict) -> str:
    return f"Table 1 on {settings['dataset']}: single-logit errors (lower is better)"


def settings_markdown(settings: dict) -> str:
    """What the errors were measured on; `settings` has dataset, evaluated_on, model, epochs,
    seeds, recalls, test_size (evaluate's settings)."""
    paper = NEAREST_PAPER_DATASET.get(settings["dataset"])
    k, scored = settings.get("num_classes"), settings.get("scored_classes")
    over = (f"a seeded sample of {scored:,} of the {k:,} classes, each ranked over every test image"
            if scored is not None and scored < k else "classes")
    return "\n".join([
        f"- trained on: {settings['dataset']}; evaluated on: {settings['evaluated_on']}",
        f"- model: {settings['model']}; epochs: {settings['epochs']}; seeds: {settings['seeds']}",
        f"- errors are 1 - x on the test split ({settings['test_size']} images), averaged over "
        f"{over}; a loss's row is the mean ± std over its seeds",
        "- paper: Keren, Sabato & Schuller, ICDM 2018, Table 1, "
        + (f"nearest dataset {paper} ({PAPER_COLUMNS})" if paper else "no comparable dataset")])


def paper_means(per_loss: dict[str, dict], aligned: set[str]) -> dict[str, dict]:
    """The losses the PoLS summary averages: the paper's seven where the grid has both kinds of them,
    so that Table 1's headline stays the paper's whatever related losses stand beside them; else all."""
    paper = {loss: row for loss, row in per_loss.items() if loss in PAPER_LOSSES}
    both = any(loss in aligned for loss in paper) and any(loss not in aligned for loss in paper)
    return paper if both else per_loss


def errors_markdown(slc: dict, names: list[str], aligned: set[str], paper: str | None) -> str:
    """Table 1 proper: one row per loss, the PoLS summary in bold, the paper's row beside it.

    `slc` is the metrics/slc.json content, `names` its error columns (`error_names`), `paper` the
    paper's dataset to set beside ours (a key of PAPER_TABLE1) or None. The README renders it too.
    """
    headers = ["loss", "PoLS-aligned", *names, *([f"paper {paper}"] if paper else [])]
    rows = [[f"{loss} (cosine head)" if loss in HEAD_BIASES else loss, "yes" if loss in aligned else "no",
             *(_fmt_spread(row[f"{n}_mean"], row[f"{n}_std"], row["seeds"]) for n in names),
             *([""] if paper else [])] for loss, row in slc["losses"].items()]
    summary = slc["summary"]
    if summary:
        for label, figure, fmt, paper_index in SUMMARY_ROWS:
            paper_cell = [] if not paper else [""] if paper_index is None else \
                [" / ".join(fmt(x) for x in PAPER_TABLE1[paper][paper_index])]
            rows.append([f"**{label}**", "", *(fmt(figure(summary[n])) for n in names), *paper_cell])
        small = [n for n in names if summary[n]["relative_improvement"] is None]
        note = (f"\n\nRelative improvement n/a for {', '.join(small)}: the non-aligned error is below "
                f"{MIN_RELATIVE_BASE}, too small to divide by (the absolute improvement is the figure to read)."
                if small else "")
        related = [loss for loss in slc["losses"] if loss not in PAPER_LOSSES]
        if related and set(paper_means(slc["losses"], aligned)) != set(slc["losses"]):
            note += (f"\n\nThe means are over the paper's losses in the grid, so the headline stays the paper's; "
                     f"{', '.join(related)} (the related work's) stand beside them, each with its alignment.")
        return _table(rows, headers) + note
    return (f"{_table(rows, headers)}\n\nNo PoLS summary: it needs at least one finished PoLS-aligned and one "
            f"non-aligned loss (aligned: {', '.join(sorted(aligned))}).")


def table1_markdown(slc: dict, settings: dict, failed: list, aligned: set[str]) -> str:
    """The paper's Table 1 for our dataset, the paper's nearest row beside it, and the settings.

    `slc` is the metrics/slc.json content; `settings` has dataset, evaluated_on, model, epochs,
    seeds, recalls, test_size; `failed` the trial records that did not finish.
    """
    names = error_names(settings["recalls"])
    paper = NEAREST_PAPER_DATASET.get(settings["dataset"])
    thresholds = [[run, recall_key(r), *(_fmt(metrics[f"test_{kind}_at_val_threshold_{recall_key(r)}{suffix}"])
                                         for kind, suffix in (("precision", ""), ("recall", ""), ("recall", "_min")))]
                  for run, metrics in slc["runs"].items() for r in settings["recalls"]]
    parts = [f"# {table1_title(settings)}", settings_markdown(settings), errors_markdown(slc, names, aligned, paper),
             "## Thresholds calibrated on validation, measured on test",
             "What a deployment sees: per class, the largest validation threshold reaching the "
             "recall target; mean (and worst class) test precision and recall it gives.",
             _table(thresholds, ["run", "target recall", "test precision (mean)", "test recall (mean)",
                                 "test recall (worst class)"])]
    if failed:
        errors = [str(trial.error or "no error recorded").splitlines() for trial in failed]
        parts += ["## Failed trials (not evaluated)",
                  _table([[trial.run_name, (error[-1] if error else "").replace("|", "/")]
                          for trial, error in zip(failed, errors)], ["run", "error"])]
    return "\n\n".join(parts) + "\n"


def write_plot_data(plots: Path, pr_curves: dict[str, tuple[np.ndarray, np.ndarray]],
                    histograms: dict[str, dict[str, np.ndarray]]) -> None:
    """One JSON file per loss, so `dvc plots show` draws one plot per loss whatever the grid is.

    `pr_curves/<loss>.json`: recall, precision (mean over classes and seeds).
    `logit_hist/<loss>.json`: logit (bin centre), true_logits, false_logits (densities: the 1 true logit
    per example and its k-1 false ones on one scale).
    Earlier files are removed first, so a loss dropped from the grid leaves no stale plot.
    """
    for folder in ("pr_curves", "logit_hist"):
        shutil.rmtree(plots / folder, ignore_errors=True)
    for loss, (recall, precision) in pr_curves.items():
        write_json(plots / "pr_curves" / f"{loss}.json",
                   [{"recall": float(r), "precision": float(p)} for r, p in zip(recall, precision)])
    for loss, hist in histograms.items():
        centres, true, false = _densities(hist)
        write_json(plots / "logit_hist" / f"{loss}.json",
                   [{"logit": float(c), "true_logits": float(t), "false_logits": float(f)}
                    for c, t, f in zip(centres, true, false)])


def _densities(hist: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    edges = hist["edges"]
    widths = np.diff(edges)
    density = lambda counts: counts / max(counts.sum(), 1) / widths
    return (edges[:-1] + edges[1:]) / 2, density(hist["true"]), density(hist["false"])


def write_plot_pngs(plots: Path, pr_curves: dict[str, tuple[np.ndarray, np.ndarray]],
                    histograms: dict[str, dict[str, np.ndarray]], aligned: set[str]) -> list[Path]:
    """pr_curves.png (all losses on one axis) and logit_hist.png (one panel per loss)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 5))
    for loss, (recall, precision) in pr_curves.items():
        ax.plot(recall, precision, label=loss, linestyle="-" if loss in aligned else "--")
    ax.set(xlabel="recall", ylabel="precision (mean over classes)", ylim=(0, 1.02),
           title="Single-logit precision-recall (dashed: not PoLS-aligned)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "pr_curves.png", dpi=100)
    plt.close(fig)

    cols = min(4, max(1, len(histograms)))
    rows = math.ceil(len(histograms) / cols) if histograms else 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (loss, hist) in zip(axes.flat, histograms.items()):
        centres, true, false = _densities(hist)
        width = np.diff(hist["edges"])
        ax.bar(centres, false, width=width, alpha=0.5, label="false logits")
        ax.bar(centres, true, width=width, alpha=0.5, label="true logits")
        ax.set(title=f"{loss} ({'PoLS' if loss in aligned else 'not PoLS'})", xlabel="logit")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(histograms):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(plots / "logit_hist.png", dpi=100)
    plt.close(fig)
    return [plots / "pr_curves.png", plots / "logit_hist.png"]
