"""`make gpu-smoke`: the GPU proof. Its GPU settings are checked by construction here (no GPU is needed to
build them); its CPU stand-in (`--allow-cpu`) runs end to end, so the script cannot rot before a GPU comes."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from pipeline import gpu_smoke
from slc.bench.report import PAPER_K
from slc.studies import gpu_checks
from slc.studies.gpu_smoke_report import smoke_markdown
from tests.conftest import PARAMS_YAML

ROOT = PARAMS_YAML.parent
H200 = {"name": "NVIDIA H200", "count": 1, "memory_gb": 150.0, "compute_capability": "9.0", "bf16": True,
        "driver": "580.95"}


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


def test_without_a_gpu_it_stops_at_once_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(gpu_checks.NoGpuError) as stopped:
        gpu_smoke.main(["--metrics", str(tmp_path / "m.json"), "--table", str(tmp_path / "t.md")])
    assert str(stopped.value).startswith("no GPU here: torch sees no CUDA device") and "\n" not in str(stopped.value)
    assert "--allow-cpu" in str(stopped.value) and not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_the_gpu_grid_is_conv6_ce_and_batch_ce_on_the_gpu_with_bfloat16(base, tmp_path):
    params = gpu_smoke.run_params(base, {**gpu_smoke.grid_changes(gpu_smoke.GPU, H200, tmp_path),
                                         **gpu_smoke.common_changes(tmp_path)})
    assert (params.model.name, params.train.epochs, params.train.amp) == ("conv6", 1, True)
    assert params.grid.losses == ["ce", "batch_ce"] and params.grid.seeds == [0]
    assert params.ray.use_gpu and params.ray.num_workers == 1 and params.ray.max_concurrent_trials == 1
    assert params.train.augment == "crop_flip" and params.train.batch_size == 128  # cifar10_conv6's recipe
    assert params.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and params.export.registered_model is None


def test_two_gpus_train_each_trial_with_ddp_over_both(base, tmp_path):
    params = gpu_smoke.run_params(base, {**gpu_smoke.grid_changes(gpu_smoke.GPU, {**H200, "count": 2}, tmp_path),
                                         **gpu_smoke.common_changes(tmp_path)})
    assert params.ray.num_workers == 2 and params.ray.max_concurrent_trials == 1


def test_the_gpu_many_class_run_is_the_400k_recipe_at_100000_classes(base, tmp_path):
    params = gpu_smoke.run_params(base, {**gpu_smoke.many_classes_changes(gpu_smoke.GPU, H200),
                                         **gpu_smoke.common_changes(tmp_path)})
    assert (params.data.name, params.data.tuples.num_classes, params.train.candidates) == ("tuples", 100_000, 1024)
    assert (params.model.name, params.model.hidden, params.train.batch_size) == ("mlp", 256, 256)
    assert params.ray.use_gpu and params.ray.num_workers == 1 and params.grid.losses == ["batch_ce"]


def test_the_gpu_timing_is_resnet50_from_1_to_400000_classes_at_batch_1_and_64(base):
    assert gpu_smoke.GPU.architecture == "resnet50" and gpu_smoke.GPU.batches == (1, 64)
    ks = gpu_smoke.GPU.ks or base["benchmark"]["num_classes"]
    assert min(ks) == 1 and max(ks) == 400_000 and set(PAPER_K) <= set(ks)


def test_logits_beyond_the_tolerance_are_flagged():
    expected = np.array([[10.0, -4.0]], np.float32)
    assert gpu_checks.compare_logits(expected + 0.05, expected)["ok"]  # within 1e-2 x 10
    off = gpu_checks.compare_logits(expected + np.array([[0.0, 0.2]], np.float32), expected)
    assert not off["ok"] and off["max_abs_diff"] == pytest.approx(0.2) and off["allowed"] == pytest.approx(0.1)


def test_a_session_that_fell_back_to_another_provider_is_an_error():
    with pytest.raises(gpu_checks.ProviderError, match="opened model.onnx on CPUExecutionProvider, not CUDA"):
        gpu_checks.checked_providers([gpu_checks.CPU], [gpu_checks.CUDA, gpu_checks.CPU], "model.onnx")
    assert gpu_checks.checked_providers([gpu_checks.CUDA, gpu_checks.CPU], [gpu_checks.CUDA, gpu_checks.CPU], "x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the CUDA provider loads")
def test_without_a_gpu_the_cuda_timing_refuses_onnxruntimes_fallback_to_the_cpu(params, tmp_path):
    tiny = dataclasses.replace(params, model=dataclasses.replace(params.model, hidden=16))
    with pytest.raises(gpu_checks.ProviderError, match="on CPUExecutionProvider, not CUDAExecutionProvider"):
        gpu_checks.time_graphs("mlp", [1, 10], [1], tiny, True, 0, 1, tmp_path, budget_left_s=0)


def test_the_report_puts_the_gpu_beside_the_cpu_machine_and_the_paper():
    ks = [1, *PAPER_K, 400_000]
    rows = [{"provider": gpu_checks.CUDA, "k": k, "batch": batch, "backbone_ms": 2.0, "single_logit_ms": 2.1,
             "full_ms": 2.1 + k / 1e5, "speedup": (2.1 + k / 1e5) / 2.1, "single_vs_backbone": 1.05}
            for k in ks for batch in (1, 64)]
    device = {"gpu": H200, "torch": "2", "torch_cuda": "13.0", "cudnn": 91000, "onnxruntime": "1.31.1",
              "onnxruntime_providers": [gpu_checks.CUDA, gpu_checks.CPU], "ray": "2", "cpu": "EPYC", "cores": 16,
              "memory_gb": 128.0, "load_average": [0.0, 0.0, 0.0]}
    figures = {"mode": "gpu", "budget_s": 480, "total_s": 300.0, "within_budget": True, "steps_s": {"device": 1.0},
               "device": device, "timing": {"architecture": "resnet50", "d": 2048, "input_shape": [3, 224, 224],
                                            "ks": ks, "batches": [1, 64], "warmup": 5, "repeats": 30,
                                            "tensorrt": {"usable": False, "why": "no TensorRT libraries"}, "rows": rows}}
    report = smoke_markdown(figures, ROOT / "metrics" / "speedup.json")
    assert "1 x NVIDIA H200 (150.0 GB" in report and "driver 580.95" in report
    assert "resnet50 (NVIDIA H200, CUDA, batch 64) | 2.10 ms" in report.replace("  ", "")
    assert "resnet50 (paper)" in report and "x12.69" in report and "resnet50 (2 CPU cores, batch 1" in report
    assert "TensorRT: not timed (no TensorRT libraries)" in report


# ---------- slow: the CPU stand-in end to end, as `make gpu-smoke` runs it, on tiny data ----------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One `python -m pipeline.gpu_smoke --allow-cpu` with the GPUs hidden, into a temporary folder."""
    folder = tmp_path_factory.mktemp("gpu_smoke")
    (folder / "work").mkdir()
    env = {key: value for key, value in os.environ.items() if key not in gpu_smoke.IGNORED_ENV}
    done = subprocess.run([sys.executable, "-m", "pipeline.gpu_smoke", "--allow-cpu", "--metrics",
                           str(folder / "gpu_smoke.json"), "--table", str(folder / "gpu_smoke.md"), "--workdir",
                           str(folder / "work")],
                          cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"json": json.loads((folder / "gpu_smoke.json").read_text()), "md": (folder / "gpu_smoke.md").read_text(),
            "stdout": done.stdout, "folder": folder}


@pytest.mark.slow
def test_cpu_stand_in_records_the_device_and_onnxruntimes_providers(smoke):
    figures = smoke["json"]
    assert figures["mode"].startswith("cpu") and figures["device"]["gpu"] is None
    assert figures["device"]["onnxruntime_providers"] == ort.get_available_providers()
    assert figures["device"]["torch"] == torch.__version__ and figures["device"]["cores"] >= 1
    assert "no GPU here" in smoke["stdout"] and "GPU: none" in smoke["stdout"]


@pytest.mark.slow
def test_cpu_stand_in_times_every_step_and_the_total(smoke):
    figures = smoke["json"]
    names = ["start-up (imports)", "device check", "device", "data: write the fixtures",
             *(f"{run}: {stage}" for run in ("conv6_grid", "many_classes")
               for stage in ("prepare", "train", "evaluate", "export")),
             "agreement: CPU provider against PyTorch", "timing: mlp graphs"]
    assert list(figures["steps_s"]) == names and all(s >= 0 for s in figures["steps_s"].values())
    assert sum(figures["steps_s"].values()) <= figures["total_s"] + 0.1 * len(names)
    assert figures["within_budget"] == (figures["total_s"] <= figures["budget_s"]) and "error" not in figures


@pytest.mark.slow
def test_cpu_stand_in_trains_the_grid_and_the_sampled_run_and_exports_them(smoke):
    runs = smoke["json"]["runs"]
    grid, many = runs["conv6_grid"], runs["many_classes"]
    assert [(t["run_name"], t["status"], t["epochs"]) for t in grid["trials"]] == [("ce-s0", "finished", 1),
                                                                                   ("batch_ce-s0", "finished", 1)]
    assert grid["model"] == "conv6" and grid["train"]["amp"] and grid["ray"]["use_gpu"] is False
    assert (many["dataset"], many["num_classes"], many["train"]["candidates"]) == ("tuples", 200, 32)
    for done in runs.values():
        assert set(done["evaluate"]) == set(done["export"]) == {t["run_name"] for t in done["trials"]}
        assert all(e["max_abs_diff_vs_pytorch"] <= 1e-4 for e in done["export"].values())


@pytest.mark.slow
def test_cpu_stand_in_compares_each_exports_logits_with_pytorch(smoke):
    agreement = smoke["json"]["agreement"]
    graphs = [g for run in agreement["runs"].values() for g in run.values()]
    assert set(agreement["runs"]) == {"ce-s0", "batch_ce-s0"} and len(graphs) == 4  # two run names, three runs
    assert agreement["reference"] == "PyTorch on the CPU" and agreement["ok"]
    assert agreement["max_abs_diff"] == max(g["max_abs_diff"] for g in graphs)
    assert all(g["ok"] and g["max_abs_diff"] <= g["allowed"] and g["providers_used"] == [gpu_checks.CPU] for g in graphs)


@pytest.mark.slow
def test_cpu_stand_in_times_the_three_graphs_at_every_k_and_batch(smoke):
    timing = smoke["json"]["timing"]
    assert [(r["k"], r["batch"]) for r in timing["rows"]] == [(k, b) for k in (1, 1000) for b in (1, 4)]
    for r in timing["rows"]:
        assert r["speedup"] == pytest.approx(r["full_ms"] / r["single_logit_ms"])
        assert r["spread"]["full"]["repeats"] == timing["repeats"] and r["provider"] == gpu_checks.CPU
    assert timing["tensorrt"] == {"usable": False, "why": "no GPU"}


@pytest.mark.slow
def test_cpu_stand_in_report_shows_the_figures_and_leaves_no_work_folder(smoke):
    report = smoke["md"]
    assert "GPU: none" in report and "ce-s0" in report and "mlp (CPU stand-in" in report
    assert f"{smoke['json']['total_s']:.1f} s against a budget of 480 s" in report
    assert not list((smoke["folder"] / "work").iterdir())  # its data, models, Ray and MLflow went with it
