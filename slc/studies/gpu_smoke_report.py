"""What `make gpu-smoke` shows people: metrics/gpu_smoke.json as measured, and results/gpu_smoke.md, which
puts every figure beside the device, and the paper's Table 2 on the GPU beside the CPU machine's.

Written even when a step failed (with the error and what was measured before it), since GPU time is
scarce: a failed run must still say how far it got.
"""
from __future__ import annotations

from pathlib import Path

from tabulate import tabulate

from slc.bench.report import PAPER_K, PAPER_TABLE2, k_label
from slc.bench.results import ResultsError, read_speedup
from slc.core.files import write_json, write_text_atomic


def _table(rows: list[list], headers: list[str]) -> str:
    return tabulate(rows, headers, tablefmt="github", disable_numparse=True)


def device_line(device: dict) -> str:
    gpu = device.get("gpu")
    card = (f"{gpu['count']} x {gpu['name']} ({gpu['memory_gb']} GB, compute capability {gpu['compute_capability']}, "
            f"bfloat16 {'yes' if gpu['bf16'] else 'no'}), driver {gpu['driver']}" if gpu else "GPU: none")
    return (f"Device: {card}; torch {device['torch']} (CUDA {device['torch_cuda']}, cuDNN {device['cudnn']}), "
            f"onnxruntime {device['onnxruntime']} (providers offered: {', '.join(device['onnxruntime_providers'])}), "
            f"Ray {device['ray']}; CPU {device['cpu']}, {device['cores']} cores, {device['memory_gb']} GB; load "
            f"average at start {', '.join(f'{x:.1f}' for x in device['load_average'])}.")


def training_rows(runs: dict) -> list[list]:
    rows = []
    for done in runs.values():
        for t in done["trials"]:
            rows.append([t["run_name"], done["dataset"], f"{done['num_classes']:,}", done["model"],
                         "yes" if done["ray"]["use_gpu"] else "no", t["world_size"], done["train"]["amp"],
                         done["train"]["candidates"] or "all", t["status"], t["epochs"],
                         f"{t['samples_per_s']:,.0f}" if t["samples_per_s"] else "—",
                         f"{t['val_accuracy']:.3f}" if t["val_accuracy"] is not None else "—",
                         f"{t['wall_time_s']:.1f}" if t["wall_time_s"] else "—"])
    return rows


def evaluation_rows(runs: dict) -> list[list]:
    return [[run, f"{metrics['1-auprc']:.3f}", f"{metrics['accuracy']:.3f}",
             f"{done['export'][run]['max_abs_diff_vs_pytorch']:.1e}", done["export"][run]["files"]]
            for done in runs.values() for run, metrics in done["evaluate"].items() if run in done["export"]]


def agreement_markdown(agreement: dict) -> str:
    rows = [[run, graph, ", ".join(g["providers_used"]), f"{g['max_abs_diff']:.2e}", f"{g['max_abs_logit']:.2f}",
             f"{g['allowed']:.2e}", "yes" if g["ok"] else "**no**"]
            for run, graphs in agreement["runs"].items() for graph, g in graphs.items()]
    return (f"{agreement['candidate']} against {agreement['reference']}, on {agreement['images']} test images of each "
            f"export: {agreement['rule']}.\n\n"
            + _table(rows, ["run", "graph", "providers used", "max abs diff", "max |logit|", "allowed", "agree"]))


def timing_markdown(timing: dict) -> str:
    rows = [[r["provider"].removesuffix("ExecutionProvider"), r["batch"], f"{r['k']:,}", f"{r['backbone_ms']:.2f}",
             f"{r['single_logit_ms']:.2f}", f"{r['full_ms']:.2f}", f"x{r['speedup']:.2f}",
             f"{r['single_vs_backbone']:.3f}"] for r in timing["rows"]]
    trt = timing["tensorrt"]
    note = "TensorRT: timed at batch 1, smallest and largest k." if trt["usable"] else f"TensorRT: not timed ({trt['why']})."
    return (f"{timing['architecture']} (d = {timing['d']}, input {timing['input_shape']}), random weights; "
            f"{timing['warmup']} warm-up then {timing['repeats']} timed runs per graph, interleaved, median ms; "
            f"host arrays in and out, as a server calls them (a full model's (batch, k) logits are copied back). "
            f"{note}\n\n"
            + _table(rows, ["provider", "batch", "k", "backbone ms", "single_logit ms", "full (model.onnx) ms",
                            "full / single", "single / backbone"]))


def table2_markdown(timing: dict, device: dict, cpu_speedup: Path) -> str:
    """The paper's layout: SLC time at the largest k, then full / SLC per k; ours on the GPU per provider
    and batch, the CPU machine's from the benchmark stage, the paper's."""
    arch = timing["architecture"]
    ks = sorted({r["k"] for r in timing["rows"] if r["k"] > 1} | (set(PAPER_K) if arch in PAPER_TABLE2 else set()))
    where = device["gpu"]["name"] if device.get("gpu") else f"CPU stand-in, {device['cores']} cores"
    rows = []
    for provider, batch in dict.fromkeys((r["provider"], r["batch"]) for r in timing["rows"]):
        mine = {r["k"]: r for r in timing["rows"] if (r["provider"], r["batch"]) == (provider, batch)}
        top = mine[max(mine)]
        rows.append([f"{arch} ({where}, {provider.removesuffix('ExecutionProvider')}, batch {batch})",
                     f"{top['single_logit_ms']:.2f} ms", *(f"x{mine[k]['speedup']:.2f}" if k in mine else "—" for k in ks)])
    try:
        cpu = read_speedup(cpu_speedup)
    except ResultsError:
        cpu = None
    if cpu is not None and arch in cpu.architectures:
        a = cpu.architectures[arch]
        rows.append([f"{arch} ({cpu.machine['cores']} CPU cores, batch {cpu.settings['batch_size']}, {cpu_speedup})",
                     f"{a.largest.single_logit.median_ms:.1f} ms",
                     *(f"x{a.k[k].speedup:.2f}" if k in a.k else "—" for k in ks)])
    if arch in PAPER_TABLE2:
        slc, factors = PAPER_TABLE2[arch]
        paper = dict(zip(PAPER_K, factors))
        rows.append([f"{arch} (paper)", f"{slc} ms", *(f"x{paper[k]:.2f}" if k in paper else "—" for k in ks)])
    return _table(rows, ["architecture", "SLC time", *(f"k = {k_label(k)}" for k in ks)])


def smoke_markdown(figures: dict, cpu_speedup: Path) -> str:
    device = figures.get("device")
    parts = ["# GPU smoke: the pipeline's GPU path in one command", "",
             f"Mode: {figures['mode']}. " + (device_line(device) if device else "Device: not read."),
             f"Total: {figures['total_s']:.1f} s against a budget of {figures['budget_s']} s "
             f"({'within' if figures['within_budget'] else '**over**'})."]
    if "error" in figures:
        parts += ["", f"**Stopped by an error**: {figures['error']}"]
    parts += ["", "## Steps", "", _table([[name, f"{s:.1f}"] for name, s in figures["steps_s"].items()],
                                         ["step", "seconds"])]
    if figures.get("runs"):
        parts += ["", "## Training, one epoch", "",
                  "Random pixels (CIFAR-shaped arrays; tuples of Fashion-MNIST-format items), so accuracy and errors "
                  "are at chance: this proves the path, not learning. Ray's resources: "
                  f"{figures.get('ray_resources', 'not read')}.", "",
                  _table(training_rows(figures["runs"]), ["run", "data", "k", "model", "GPU", "DDP workers", "amp",
                                                          "negatives", "status", "epochs", "samples/s",
                                                          "val accuracy", "wall s"]),
                  "", "## Evaluate and export", "",
                  _table(evaluation_rows(figures["runs"]), ["run", "1-AUPRC", "accuracy",
                                                            "export: max |ORT CPU - PyTorch|", "files"])]
    if figures.get("agreement"):
        parts += ["", "## Logits across providers", "", agreement_markdown(figures["agreement"])]
    if figures.get("timing"):
        parts += ["", "## Latency of the three graphs", "", timing_markdown(figures["timing"]), "",
                  "## The paper's Table 2 on this device, beside the CPU machine's", "",
                  "Full k-class model time / single-logit time; SLC time: single_logit.onnx at the largest k.", "",
                  table2_markdown(figures["timing"], device, cpu_speedup)]
    return "\n".join(parts) + "\n"


def write_outputs(figures: dict, metrics: Path, table: Path, cpu_speedup: Path) -> None:
    write_json(metrics, figures)
    write_text_atomic(table, smoke_markdown(figures, cpu_speedup))
