import dataclasses
import json

import pytest
import torch
from mlflow import MlflowClient

from pipeline import benchmark
from slc.bench.results import read_speedup
from slc.core.config import BenchmarkConfig, ModelConfig
from slc.export.exporting import export_model
from slc.nn.models import build_model
from tests.conftest import write_params

TINY = BenchmarkConfig(architectures=["mlp"], num_classes=[1, 1000], batch_size=2, threads=1, warmup=1, repeats=3, rounds=3,
                       providers="auto", prepacking=False, bandwidth_mib=16)


def a_trained_export(exports, k=3000):
    """What the export stage leaves for one run of a tiny mlp with many classes (random weights)."""
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = build_model(ModelConfig("mlp", 8, 4, None, "linear", None), shape, k).eval()
    info = {"run_name": "bce-s0", "loss": "bce", "dataset": "tiny", "class_names": [f"c{i}" for i in range(k)],
            "input_shape": list(shape), "normalisation": {"mean": [0.5], "std": [0.25]}, "pixel_scale": 255.0}
    export_model(model, exports / "bce-s0", info, None, torch.randn(4, *shape), classes="none")


@pytest.mark.slow
def test_stage_times_every_k_writes_every_output_and_logs_one_mlflow_run(tmp_path, monkeypatch, tiny_params):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    a_trained_export(tmp_path / "exports")
    out = tmp_path / "out"
    params = write_params(dataclasses.replace(tiny_params(), benchmark=TINY), tmp_path / "params.yaml")
    results = benchmark.main(["--params", str(params), "--exports", str(tmp_path / "exports"),
                              "--metrics", str(out / "speedup.json"), "--table", str(out / "speedup.md"),
                              "--plots", str(out / "plots"), "--workdir", str(tmp_path)])

    per_k = results.architectures["mlp"].k
    assert sorted(per_k) == [1, 1000]
    for r in per_k.values():
        assert all(t.median_ms > 0 and t.repeats == 3 and len(t.rounds_ms) == 3
                   for t in (r.backbone, r.full, r.single_logit, r.head))
        assert len(r.full_vs_floor.rounds) == 3 and r.full_vs_floor.median > 0
        assert r.full.providers_used == ["CPUExecutionProvider"] and r.peak_rss_gb > 0
    assert results.architectures["mlp"].d == 32
    trained = results.exports["bce-s0"]
    assert (trained.d, list(trained.k)) == (8, [3000]) and trained.largest.full.repeats == 3
    assert "| bce-s0 " in (out / "speedup.md").read_text()
    assert results.bandwidth["gbps"] > 0
    assert json.loads((out / "speedup.json").read_text())["goals"] == results.goals
    assert read_speedup(out / "speedup.json") == results
    assert "| mlp (ours) " in (out / "speedup.md").read_text()
    assert (out / "plots" / "speedup.png").exists() and (out / "plots" / "speedup.csv").exists()
    assert [p.name for p in tmp_path.glob("slc-benchmark-*")] == []  # the models were removed

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("slc-test").experiment_id])
    assert run.info.run_name == "benchmark" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "mlp/speedup")] == [1, 1000]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "trained/bce-s0/speedup")] == [3000]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"speedup.md", "speedup.png"}
