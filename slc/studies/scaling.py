"""The scaling study: the whole product at growing k, everything else held fixed.

At each k the real stages (prepare, train, evaluate, export) run as subprocesses in a folder of
their own, on the same settings but `data.tuples.num_classes`; each one's wall time and peak
memory are measured with its child processes (Ray's workers) included. Beside them a training
step of every loss is timed in-process, sampled and exact, on the same batch and backbone, and the
trained export is timed with onnxruntime. A benchmark, not a test: figures go to JSON, Markdown
and a plot with the machine and settings beside them, and nothing asserts a time.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import time
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


def run_point(raw_params: dict, folder: Path, commands: dict[str, list[str]], layout: Layout) -> dict:
    """The pipeline at one k: each stage's cost, the export's bytes, Table 1's summary."""
    stages = run_stages(raw_params, folder, commands)
    return {"k": raw_params["data"]["tuples"]["num_classes"], "stages": stages, "evaluate": stages["evaluate"],
            "export": {**stages["export"], "bytes": export_bytes(folder / layout.exports)},
            "summary": summary_of(folder / layout.metrics)}


def time_point(raw_params: dict, folder: Path, layout: Layout, gbps: float) -> dict:
    """At one k, after `run_point`: a training step of each loss, sampled and exact, and the trained
    export's latency. The study times every k in one pass once all have run, so that the ratios
    across k compare figures taken minutes apart, under the same load."""
    params = from_dict(Params, raw_params)
    data = PreparedData(folder / layout.data)
    steps = {loss: {"sampled": step_ms(params, data, loss, params.train.candidates, warmup=3, budget_s=10, max_steps=40),
                    "exact": step_ms(params, data, loss, None, warmup=1, budget_s=10, max_steps=10)}
             for loss in params.grid.losses}
    settings = timing.session_settings(params.benchmark.threads, params.benchmark.prepacking,
                                       session_providers(params.benchmark.providers))
    trained = time_exports(folder / layout.exports, params.benchmark, settings, gbps)
    run = min(trained)  # the first run's export: every run has the same shapes
    at = trained[run].largest
    return {"train_step_ms": steps, "head_gb": round(at.head_gb, 3),
            "latency_ms": {"full": at.full.median_ms, "single_logit": at.single_logit.median_ms,
                           "backbone": at.backbone.median_ms, "single_vs_backbone": at.single_vs_backbone,
                           "speedup": at.speedup, "speedup_limit": at.speedup_limit, "run": run}}


def bandwidth_gbps(params: Params, folder: Path) -> dict:
    """The benchmark's memory-bandwidth bound on this machine (see slc.bench.timing.memory_bandwidth)."""
    cfg = params.benchmark
    settings = timing.session_settings(cfg.threads, cfg.prepacking, session_providers(cfg.providers))
    folder.mkdir(parents=True, exist_ok=True)
    return timing.memory_bandwidth(write_gemv_probe(folder, cfg.bandwidth_mib), settings, cfg.repeats)


TABLE_COLUMNS = ("k", "train step ms (sampled)", "train step ms (exact)", "evaluate s", "evaluate GB", "export s",
                 "export GB", "full ms", "single_logit ms", "1-AUPRC non-PoLS", "1-AUPRC PoLS", "relative improvement")


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table_markdown(points: dict[str, dict]) -> str:
    """One row per k; step times as the mean over losses (per loss in metrics/scaling.json)."""
    rows = []
    for k, p in sorted(points.items(), key=lambda item: int(item[0])):
        mean = lambda kind: statistics.mean(v[kind] for v in p["train_step_ms"].values() if v.get(kind) is not None) \
            if any(v.get(kind) is not None for v in p["train_step_ms"].values()) else None
        auprc = p["summary"]["1-auprc"]
        rows.append([f"{int(k):,}", _fmt(mean("sampled"), ".1f"), _fmt(mean("exact"), ".1f"),
                     _fmt(p["evaluate"]["wall_s"], ".0f"), _fmt(p["evaluate"]["peak_rss_gb"], ".2f"),
                     _fmt(p["export"]["wall_s"], ".0f"), _fmt(p["export"]["bytes"] / 1e9, ".2f"),
                     _fmt(p["latency_ms"]["full"], ".2f"), _fmt(p["latency_ms"]["single_logit"], ".2f"),
                     _fmt(auprc["non_pols"], ".3f"), _fmt(auprc["pols"], ".3f"),
                     "n/a" if auprc["relative_improvement"] is None else f"{100 * auprc['relative_improvement']:.1f}%"])
    return tabulate(rows, TABLE_COLUMNS, tablefmt="github", disable_numparse=True)


def goals(points: dict[str, dict]) -> dict:
    """The issue's goals as measured (not asserted): step ratio, evaluate memory, latency, PoLS gain."""
    ks = sorted(points, key=int)
    low, high = points[ks[0]], points[ks[-1]]
    ratio = {loss: high["train_step_ms"][loss]["sampled"] / low["train_step_ms"][loss]["sampled"]
             for loss in high["train_step_ms"]}
    return {"sampled_step_ratio_largest_vs_smallest_k": ratio,
            "evaluate_peak_rss_gb_minus_head_at_largest_k": round(high["evaluate"]["peak_rss_gb"] - high["head_gb"], 3),
            "single_logit_vs_backbone_at_largest_k": high["latency_ms"]["single_vs_backbone"],
            "relative_improvement_1-auprc": {k: points[k]["summary"]["1-auprc"]["relative_improvement"] for k in ks}}


def goals_markdown(measured: dict) -> str:
    ratio = ", ".join(f"{loss} x{value:.2f}" for loss, value in measured["sampled_step_ratio_largest_vs_smallest_k"].items())
    gains = ", ".join(f"k={int(k):,}: " + ("n/a" if v is None else f"{100 * v:.1f}%")
                      for k, v in measured["relative_improvement_1-auprc"].items())
    return "\n".join([
        "Goals, as measured (not asserted):",
        f"- sampled training step, largest k against smallest (goal <= x1.5): {ratio}",
        f"- evaluate's peak memory at the largest k less the head's bytes (goal <= 2 GB): "
        f"{measured['evaluate_peak_rss_gb_minus_head_at_largest_k']:.2f} GB",
        f"- trained export's single_logit against its backbone at the largest k (goal <= x1.05): "
        f"x{measured['single_logit_vs_backbone_at_largest_k']:.3f}",
        f"- relative improvement of 1-AUPRC, PoLS-aligned over not (goal >= 20%): {gains}"])


def report_markdown(study: dict) -> str:
    settings, machine = study["settings"], study["machine"]
    return "\n\n".join([
        "# Scaling in the number of classes",
        f"Same batch ({settings['train']['batch_size']}), backbone ({settings['model']['name']}, "
        f"{settings['model']['hidden']} wide), candidates ({settings['train']['candidates']}) and epochs "
        f"({settings['train']['epochs']}) at every k, and the same training budget ({settings['train_images']:,} "
        f"images per loss: the images per class fall as k grows); data: tuples of Fashion-MNIST items; losses "
        f"{', '.join(settings['grid']['losses'])}; errors over a seeded sample of "
        f"{settings['evaluate']['classes']} classes. Machine: {machine.get('cpu', '?')}, "
        f"{machine.get('cores', '?')} cores, load average {machine.get('load_average')} at the start. "
        "Stage memory: peak PSS of the stage and its child processes.",
        table_markdown(study["points"]),
        goals_markdown(study["goals"]),
        "![scaling](../plots/scaling.png)"])


def write_plot(points: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(points, key=int)
    x = [int(k) for k in ks]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for loss in points[ks[0]]["train_step_ms"]:
        for kind, style in (("sampled", "-o"), ("exact", "--x")):
            y = [points[k]["train_step_ms"][loss].get(kind) for k in ks]
            if any(v is not None for v in y):
                axes[0].plot(x, y, style, label=f"{loss} {kind}")
    axes[0].set(title="training step", ylabel="ms per step")
    for kind, style in (("full", "-o"), ("single_logit", "-s"), ("backbone", ":")):
        axes[1].plot(x, [points[k]["latency_ms"][kind] for k in ks], style, label=kind)
    axes[1].set(title="trained export, onnxruntime", ylabel="ms per query", yscale="log")
    for kind, style in (("non_pols", "-o"), ("pols", "-s")):
        axes[2].plot(x, [points[k]["summary"]["1-auprc"][kind] for k in ks], style, label=kind.replace("_", "-"))
    axes[2].set(title="1-AUPRC (lower is better)", ylabel="error")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("classes k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def write_outputs(study: dict, metrics: Path, table: Path, plot: Path) -> None:
    write_json(metrics, study)
    write_plot(study["points"], plot)
    write_text_atomic(table, report_markdown(study) + "\n")
