"""metrics/ray_overhead.json, results/ray_overhead.md and plots/ray_overhead.png from the study's figures."""
from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from slc.core.files import save_figure, write_json, write_text_atomic
from slc.studies.ray_overhead import summary

TITLE = "Ray's cost on a grid: the train stage through Ray against a plain loop"
RAY_PHASES = (("spawn_s", "until the worker's process"), ("own_start_s", "the worker's own start"),
              ("training_s", "training"), ("report_s", "waiting in report"), ("teardown_s", "teardown"),
              ("save_s", "driver: save + MLflow"))


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ray_phases(s: dict) -> dict:
    """A grid's median Ray trial by RAY_PHASES, from the summary's per-trial medians."""
    return {"spawn_s": s["ray_spawn_s"], "own_start_s": _difference(s["ray_startup_s"], s["ray_spawn_s"]),
            "training_s": _difference(s["ray_train_s"], s["ray_report_s"]), "report_s": s["ray_report_s"],
            "teardown_s": s["ray_teardown_s"], "save_s": s["ray_save_s"]}


def metrics(study: dict) -> dict:
    """The JSON: every figure, the per-trial medians, and at the top the default grid's `ratio`."""
    grids = {name: {**grid, "summary": summary(grid)} for name, grid in study["grids"].items()}
    top = {"ratio": grids["default"]["ratio"]} if "default" in grids else {}
    goals = {f"{name}_within_{grid['goal']:g}x": grid["ratio"] <= grid["goal"] for name, grid in grids.items()
             if grid.get("goal") is not None}
    return {**top, "goals": goals, "machine": study["machine"], "grids": grids}


def report_markdown(figures: dict) -> str:
    m = figures["machine"]
    lines = [f"# {TITLE}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; 1-min load average at the end "
             f"{m['load_average_end'][0]:.1f}.",
             "Through Ray: `slc.train.grid.run_grid`, what `dvc repro train` runs (a new local Ray, one Tune trial "
             "per (loss, seed) fitting a Train `TorchTrainer`, a checkpoint reported every epoch, the driver saving "
             "each model and recording it in MLflow). Plain loop: `train_one` for each trial one after another in "
             "one process with every CPU as torch threads, loading in-process as the Train workers do, each model "
             "saved, no MLflow. The plain loop runs first.", ""]
    rows = []
    for name, grid in figures["grids"].items():
        s = grid["settings"]
        rows.append([name, f"{s['dataset']}, {s['train_images']:,} images, {s['model']}",
                     f"{len(s['losses'])} x {len(s['seeds'])}", f"{s['epochs']} x batch {s['batch_size']}",
                     s["max_concurrent_trials"], _s(grid["plain"]["wall_s"]), _s(grid["ray"]["wall_s"]),
                     f"x{grid['ratio']:.2f}", "—" if grid.get("goal") is None else
                     f"≤ {grid['goal']:g}: {'met' if grid['ratio'] <= grid['goal'] else 'missed'}"])
    lines += [tabulate(rows, ["grid", "data", "losses x seeds", "epochs", "Ray trials at once", "plain loop s",
                              "through Ray s", "Ray / plain", "goal"], tablefmt="github", disable_numparse=True), ""]
    lines += ["## Where a trial's seconds go", "",
              "Medians over each grid's trials, in seconds. Ray: the worker's start from the trial's `TorchTrainer` "
              "to the first line of the Train worker, in two parts: until the worker's process existed (the Train "
              "controller's process, the placement group, the worker's scheduling) and the worker's own start (a "
              "Python process joining Ray, unpickling the training function, which imports torch and the project, "
              "and the process group); then training (`train_one` less the time blocked in Ray's report), the "
              "wait in report, the teardown after the worker returned, and the driver's saving and MLflow logging. "
              "The plain loop trains with every CPU, one trial at a time; Ray runs `max_concurrent_trials` at once, "
              "each on its share of the CPUs.", ""]
    rows = []
    for name, grid in figures["grids"].items():
        s = grid["summary"]
        rows.append([name, _s(s["ray_wall_s"]), *(_s(value) for value in ray_phases(s).values()),
                     _s(s["plain_wall_s"]), _s(s["plain_train_s"]), _s(s["plain_save_s"])])
    lines += [tabulate(rows, ["grid", "Ray trial", *(label for _, label in RAY_PHASES), "plain trial", "training",
                              "save"], tablefmt="github", disable_numparse=True), ""]
    return "\n".join(lines)


def write_plot(figures: dict, path: Path) -> None:
    """Per grid, the median trial's seconds by phase, through Ray and in the plain loop, beside the walls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures["grids"])
    fig, (walls, trial) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.9 * len(names)), squeeze=True)
    for i, name in enumerate(names):
        grid = figures["grids"][name]
        walls.barh([i + 0.2, i - 0.2], [grid["ray"]["wall_s"], grid["plain"]["wall_s"]], height=0.35,
                   color=["tab:orange", "tab:blue"])
        walls.text(grid["ray"]["wall_s"], i + 0.2, f" x{grid['ratio']:.2f}", va="center")
        s, left = grid["summary"], 0.0
        parts = ray_phases(s)
        for j, (key, label) in enumerate(RAY_PHASES):
            value = parts[key] or 0.0
            trial.barh(i + 0.2, value, left=left, height=0.35, color=f"C{j + 2}", label=label if i == 0 else None)
            left += value
        trial.barh(i - 0.2, s["plain_wall_s"] or 0.0, height=0.35, color="tab:blue",
                   label="plain loop trial" if i == 0 else None)
    for axis, title in ((walls, "grid wall time, s (orange: Ray, blue: plain loop)"),
                        (trial, "median trial, s, by phase (top: Ray)")):
        axis.set_yticks(range(len(names)), names)
        axis.set_title(title, fontsize=10)
    walls.set_xlim(0, 1.15 * max(g["ray"]["wall_s"] for g in figures["grids"].values()))  # room for the ratio
    trial.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_outputs(study: dict, metrics_path: Path, table: Path, plot: Path) -> None:
    figures = metrics(study)
    write_json(metrics_path, figures)
    write_plot(figures, plot)
    write_text_atomic(table, report_markdown(figures) + "\n")
