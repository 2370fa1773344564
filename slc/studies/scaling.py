"""The scaling study: the whole product at growing k, everything else held fixed, with each head.

At each k and head the real stages (prepare, train, evaluate, export) run as subprocesses in a folder of
their own, on the same settings but `data.tuples.num_classes`; each one's wall time and peak
memory are measured with its child processes (Ray's workers) included. Beside them a training
step of every loss is timed in-process, sampled and exact, on the same batch and backbone, and the
trained export is timed with onnxruntime. A benchmark, not a test: figures go to JSON, Markdown
and a plot with the machine and settings beside them, and nothing asserts a time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import yaml
from tabulate import tabulate
from torch.utils.data import DataLoader, RandomSampler

from slc.bench import timing
from slc.bench.benchmarking import session_providers, time_exports, write_gemv_probe
from slc.core.config import Params
from slc.core.errors import PipelineError
from slc.core.files import save_figure, write_json, write_text_atomic
from slc.core.strict import from_dict
from slc.data.prepared import PreparedData
from slc.nn.losses import make_loss
from slc.nn.models import build_model
from slc.train.optim import make_optimizers
from slc.train.training import make_step

POLL_S = 5.0  # one reading of ~30 processes' smaps costs ~0.15 CPU-s: every 5 s is ~3% of a core


class StudyError(PipelineError, RuntimeError):
    """A stage of the study failed: its log says why."""


def measure(command: list[str], cwd: Path, log: Path) -> dict[str, float]:
    """Wall seconds and peak memory (GB) of a command and all its descendants.

    Memory is the sum of the processes' proportional set sizes (PSS: a page shared by n processes
    counts 1/n in each), sampled every POLL_S seconds, so shared memory (Ray's object store, the
    libraries) is not counted once per process; a peak shorter than a sample can be missed.
    """
    started = time.perf_counter()
    with log.open("w") as out:
        process = psutil.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while True:
            total = 0
            for p in [process, *process.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:  # a child that ended between the listing and the reading
                    pass
            peak = max(peak, total)
            try:
                process.wait(timeout=POLL_S)  # returns as soon as it ends: the wall time is not rounded up
                break
            except psutil.TimeoutExpired:
                pass
    if process.returncode != 0:
        raise StudyError(f"{' '.join(command)} failed with exit code {process.returncode}: see {log}")
    return {"wall_s": round(time.perf_counter() - started, 2), "peak_rss_gb": round(peak / 1e9, 3)}


@dataclass(frozen=True)
class Layout:
    """Where, in a point's folder, the stages put what the study reads (as dvc.yaml names it)."""
    data: Path
    trials: Path
    metrics: Path
    exports: Path


def run_stages(params: dict, folder: Path, commands: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Each stage's command (dvc.yaml's, reading `params.yaml`) run in `folder` on `params`, measured."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return {stage: measure(command, folder, folder / f"{stage}.log") for stage, command in commands.items()}


def step_ms(params: Params, data: PreparedData, loss: str, candidates: int | None, warmup: int, budget_s: float,
            max_steps: int) -> float:
    """Median milliseconds of one training step (forward, loss, backward, optimizer) on real batches:
    `warmup` untimed steps, then timed ones until `budget_s` seconds or `max_steps` steps."""
    train = dataclasses.replace(params.train, candidates=candidates)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_model(params.model, data.input_shape, data.num_classes)
    optimizers = make_optimizers(model, train)
    loss_fn = make_loss(loss, train, generator=generator)
    step = make_step(candidates, data.num_classes, generator)
    split = data.split("train")  # drawn with replacement: as many full batches as asked for, at any k
    sampler = RandomSampler(split, replacement=True, num_samples=train.batch_size * (warmup + max_steps),
                            generator=generator)
    loader = iter(DataLoader(split, batch_size=train.batch_size, sampler=sampler))
    times, spent = [], 0.0
    for number in range(warmup + max_steps):
        images, labels = next(loader)
        started = time.perf_counter()
        value = step(model, images, labels, loss_fn)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        value.backward()
        for optimizer in optimizers:
            optimizer.step()
        if number >= warmup:
            times.append(time.perf_counter() - started)
            spent += times[-1]
            if spent > budget_s:
                break
    return round(statistics.median(times) * 1e3, 2)


def summary_of(metrics: Path) -> dict:
    """Table 1's summary of one point: per error, non_pols, pols and relative_improvement (null = n/a)."""
    slc = json.loads(metrics.read_text())
    return {name: {key: errors[key] for key in ("non_pols", "pols", "relative_improvement")}
            for name, errors in slc["summary"].items()}


def export_bytes(exports: Path) -> int:
    return sum(path.stat().st_size for path in exports.rglob("*") if path.is_file())


def per_loss(trials: Path, metrics: Path) -> dict[str, dict[str, float]]:
    """Each loss's test 1-AUPRC (mean over seeds) and its train loss over the last epoch (seed 0's run):
    a loss still at log k learned nothing, however its errors compare."""
    losses, records = json.loads(metrics.read_text())["losses"], json.loads(trials.read_text())
    first_seed = min(record["seed"] for record in records)
    final = {record["loss"]: record["train_loss"] for record in records if record["seed"] == first_seed}
    return {loss: {"1-auprc": values["1-auprc_mean"], "train_loss": final.get(loss)} for loss, values in losses.items()}


def run_point(raw_params: dict, folder: Path, commands: dict[str, list[str]], layout: Layout) -> dict:
    """The pipeline at one k and head: each stage's cost, the export's bytes, Table 1's summary, and
    each loss's error and final train loss."""
    stages = run_stages(raw_params, folder, commands)
    return {"k": raw_params["data"]["tuples"]["num_classes"], "head": raw_params["model"]["head"],
            "stages": stages, "evaluate": stages["evaluate"],
            "export": {**stages["export"], "bytes": export_bytes(folder / layout.exports)},
            "summary": summary_of(folder / layout.metrics),
            "losses": per_loss(folder / layout.trials, folder / layout.metrics)}


def time_point(raw_params: dict, folder: Path, layout: Layout, reads: tuple[int, dict]) -> dict:
    """At one k, after `run_point`: a training step of each loss, sampled and exact, and the trained
    export's latency, in the benchmark's rounds with the bandwidth `reads` (`timing.bandwidth_reads`),
    so that a backbone's drift does not look like a single logit's cost. The study times every k in
    one pass once all have run, so that the ratios across k compare figures taken minutes apart."""
    params = from_dict(Params, raw_params)
    data = PreparedData(folder / layout.data)
    steps = {loss: {"sampled": step_ms(params, data, loss, params.train.candidates, warmup=3, budget_s=10, max_steps=40),
                    "exact": step_ms(params, data, loss, None, warmup=1, budget_s=10, max_steps=10)}
             for loss in params.grid.losses}
    settings = timing.session_settings(params.benchmark.threads, params.benchmark.prepacking,
                                       session_providers(params.benchmark.providers))
    trained = time_exports(folder / layout.exports, params.benchmark, settings, reads)
    run = min(trained)  # the first run's export: every run has the same shapes
    at = trained[run].largest
    return {"train_step_ms": steps, "head_gb": round(at.head_gb, 3),
            "latency_ms": {"full": at.full.median_ms, "single_logit": at.single_logit.median_ms,
                           "backbone": at.backbone.median_ms, "head": at.head.median_ms,
                           "single_vs_backbone": at.single_vs_backbone.median,
                           "single_vs_backbone_rounds": at.single_vs_backbone.model_dump(),
                           "full_vs_floor": at.full_vs_floor.model_dump(), "gbps": at.gbps,
                           "speedup": at.speedup, "speedup_limit": at.speedup_limit, "run": run}}


@contextmanager
def bandwidth_reads(params: Params, folder: Path) -> Iterator[tuple[int, dict]]:
    """The benchmark's bandwidth reads (`slc.bench.timing.bandwidth_reads`) at its settings, in `folder`."""
    cfg = params.benchmark
    settings = timing.session_settings(cfg.threads, cfg.prepacking, session_providers(cfg.providers))
    folder.mkdir(parents=True, exist_ok=True)
    with timing.bandwidth_reads(write_gemv_probe(folder, cfg.bandwidth_mib), settings) as reads:
        yield reads


def by_head(points: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{head: {k: that head's point}}, k ascending: the study's points read one head at a time."""
    heads: dict[str, dict[str, dict]] = {}
    for k in sorted(points, key=int):
        for head, point in points[k]["heads"].items():
            heads.setdefault(head, {})[k] = point
    return heads


TABLE_COLUMNS = ("k", "head", "train step ms (sampled)", "train step ms (exact)", "evaluate s", "evaluate GB",
                 "export s", "export GB", "full ms", "single_logit ms", "1-AUPRC non-PoLS", "1-AUPRC PoLS",
                 "relative improvement")


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _improvement(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table_markdown(points: dict[str, dict]) -> str:
    """One row per k and head; step times as the mean over losses (per loss in metrics/scaling.json)."""
    rows = []
    for k in sorted(points, key=int):
        for head, p in points[k]["heads"].items():
            steps = p["train_step_ms"].values()
            mean = lambda kind: statistics.mean(v[kind] for v in steps if v.get(kind) is not None) \
                if any(v.get(kind) is not None for v in steps) else None
            auprc = p["summary"]["1-auprc"]
            rows.append([f"{int(k):,}", head, _fmt(mean("sampled"), ".1f"), _fmt(mean("exact"), ".1f"),
                         _fmt(p["evaluate"]["wall_s"], ".0f"), _fmt(p["evaluate"]["peak_rss_gb"], ".2f"),
                         _fmt(p["export"]["wall_s"], ".0f"), _fmt(p["export"]["bytes"] / 1e9, ".2f"),
                         _fmt(p["latency_ms"]["full"], ".2f"), _fmt(p["latency_ms"]["single_logit"], ".2f"),
                         _fmt(auprc["non_pols"], ".3f"), _fmt(auprc["pols"], ".3f"),
                         _improvement(auprc["relative_improvement"])])
    return tabulate(rows, TABLE_COLUMNS, tablefmt="github", disable_numparse=True)


def losses_markdown(points: dict[str, dict]) -> str:
    """One row per k and head: each loss's test 1-AUPRC and its final train loss beside log k (a loss
    still at log k has learned nothing)."""
    losses = list(next(iter(points.values()))["heads"].values())[0]["losses"]
    rows = []
    for k in sorted(points, key=int):
        for head, p in points[k]["heads"].items():
            rows.append([f"{int(k):,}", head, f"{math.log(int(k)):.2f}",
                         *(f"{_fmt(p['losses'][loss]['1-auprc'], '.3f')} ({_fmt(p['losses'][loss]['train_loss'], '.2f')})"
                           for loss in losses)])
    return tabulate(rows, ["k", "head", "log k", *(f"{loss}: 1-AUPRC (train loss)" for loss in losses)],
                    tablefmt="github", disable_numparse=True)


def goals(points: dict[str, dict]) -> dict:
    """The issue's goals as measured (not asserted), per head: step ratio, evaluate memory, latency, PoLS gain."""
    measured = {}
    for head, at in by_head(points).items():
        ks = list(at)
        low, high = at[ks[0]], at[ks[-1]]
        measured[head] = {
            "sampled_step_ratio_largest_vs_smallest_k": {
                loss: high["train_step_ms"][loss]["sampled"] / low["train_step_ms"][loss]["sampled"]
                for loss in high["train_step_ms"]},
            "evaluate_peak_rss_gb_minus_head_at_largest_k": round(high["evaluate"]["peak_rss_gb"] - high["head_gb"], 3),
            "single_logit_vs_backbone_at_largest_k": high["latency_ms"]["single_vs_backbone"],
            "relative_improvement_1-auprc": {k: at[k]["summary"]["1-auprc"]["relative_improvement"] for k in ks}}
    return measured


def goals_markdown(measured: dict) -> str:
    lines = ["Goals, as measured (not asserted):"]
    for head, goal in measured.items():
        ratio = ", ".join(f"{loss} x{value:.2f}" for loss, value in goal["sampled_step_ratio_largest_vs_smallest_k"].items())
        gains = ", ".join(f"k={int(k):,}: {_improvement(v)}" for k, v in goal["relative_improvement_1-auprc"].items())
        lines += [f"- {head} head, sampled training step, largest k against smallest (goal <= x1.5): {ratio}",
                  f"- {head} head, evaluate's peak memory at the largest k less the head's bytes (goal <= 2 GB): "
                  f"{goal['evaluate_peak_rss_gb_minus_head_at_largest_k']:.2f} GB",
                  f"- {head} head, trained export's single_logit against its backbone at the largest k (goal <= x1.05): "
                  f"x{goal['single_logit_vs_backbone_at_largest_k']:.3f}",
                  f"- {head} head, relative improvement of 1-AUPRC, PoLS-aligned over not (goal >= 20%): {gains}"]
    return "\n".join(lines)


def report_markdown(study: dict) -> str:
    settings, machine = study["settings"], study["machine"]
    return "\n\n".join([
        "# Scaling in the number of classes",
        f"Same batch ({settings['train']['batch_size']}), backbone ({settings['model']['name']}, "
        f"{settings['model']['hidden']} wide), candidates ({settings['train']['candidates']}) and epochs "
        f"({settings['train']['epochs']}) at every k, and the same training budget ({settings['train_images']:,} "
        f"images per loss: the images per class fall as k grows); heads {', '.join(settings['heads'])}, rows started "
        f"by train.head_init: {settings['train']['head_init']}, head learning rate {settings['train']['head_lr']}; "
        f"data: tuples of Fashion-MNIST items; losses {', '.join(settings['grid']['losses'])}; errors over a seeded "
        f"sample of {settings['evaluate']['classes']} classes. Machine: {machine.get('cpu', '?')}, "
        f"{machine.get('cores', '?')} cores, load average {machine.get('load_average')} at the start. "
        "Stage memory: peak PSS of the stage and its child processes.",
        table_markdown(study["points"]),
        "Each loss's test 1-AUPRC, and in brackets its train loss over the last epoch (log k is the loss of "
        "a model that learned nothing):",
        losses_markdown(study["points"]),
        goals_markdown(study["goals"]),
        "![scaling](../plots/scaling.png)"])


HEAD_MARKERS = {"linear": "x", "cosine": "o"}


def write_plot(points: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for head, at in by_head(points).items():
        x, marker = [int(k) for k in at], HEAD_MARKERS.get(head, "s")
        first = next(iter(at.values()))
        for loss in first["train_step_ms"]:
            for kind, line in (("sampled", "-"), ("exact", "--")):
                y = [p["train_step_ms"][loss].get(kind) for p in at.values()]
                if any(v is not None for v in y):
                    axes[0].plot(x, y, line + marker, label=f"{head} {loss} {kind}")
        for kind, line in (("full", "-"), ("single_logit", "--"), ("backbone", ":")):
            axes[1].plot(x, [p["latency_ms"][kind] for p in at.values()], line + marker, label=f"{head} {kind}")
        for kind, line in (("non_pols", "-"), ("pols", "--")):
            axes[2].plot(x, [p["summary"]["1-auprc"][kind] for p in at.values()], line + marker,
                         label=f"{head} {kind.replace('_', '-')}")
    axes[0].set(title="training step", ylabel="ms per step", yscale="log")
    axes[1].set(title="trained export, onnxruntime", ylabel="ms per query", yscale="log")
    axes[2].set(title="1-AUPRC (lower is better)", ylabel="error")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("classes k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def write_outputs(study: dict, metrics: Path, table: Path, plot: Path) -> None:
    write_json(metrics, study)
    write_plot(study["points"], plot)
    write_text_atomic(table, report_markdown(study) + "\n")
