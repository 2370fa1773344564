import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from serving import sessions
from slc.bench import benchmarking as benchmark
from slc.bench import report as speedup_report
from slc.bench import timing
from slc.bench.results import Architecture, SpeedupResults, read_speedup
from slc.core import peak_memory
from slc.core.config import BenchmarkConfig, ModelConfig
from slc.core.errors import ConfigError
from slc.export.exporting import export_model
from slc.export.onnx_graphs import SyntheticRows
from slc.nn.models import build_model

CPU = ["CPUExecutionProvider"]
SETTINGS = dict(architectures=["resnet50"], num_classes=[1, 16384, 400_000], batch_size=1, threads=2, warmup=5,
                repeats=30, providers="auto", prepacking=False, bandwidth_mib=1024)


def tiny_backbone(d: int) -> onnx.ModelProto:
    """image (N, d) -> features = relu(image): a backbone small enough to check the heads by hand."""
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["features"])], "backbone",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", d])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_first_rows_points_at_a_prefix_of_the_same_bytes(tmp_path):
    weight, _ = benchmark.write_head(tmp_path, k=8, d=4)
    prefix = benchmark.first_rows(weight, 5)
    entries = {e.key: e.value for e in prefix.external_data}
    original = {e.key: e.value for e in weight.external_data}
    assert list(prefix.dims) == [5, 4] and list(weight.dims) == [8, 4]
    assert entries["offset"] == original["offset"] and int(entries["length"]) == 5 * 4 * 4


def test_first_rows_refuses_more_rows_than_written(tmp_path):
    weight, _ = benchmark.write_head(tmp_path, k=8, d=4)
    with pytest.raises(ValueError, match="9 rows"):
        benchmark.first_rows(weight, 9)


def test_models_at_small_k_compute_the_head_of_the_first_k_rows(tmp_path):
    d, k_max, k = 4, 8, 5
    weight, bias = benchmark.write_head(tmp_path, k_max, d)
    paths = benchmark.write_models(tmp_path, tiny_backbone(d), weight, bias, k)
    image = np.random.default_rng(1).standard_normal((3, d), dtype=np.float32)
    expected = np.maximum(image, 0) @ SyntheticRows(k_max, d)[:k].T
    full = ort.InferenceSession(str(paths["full"]), providers=CPU).run(None, {"image": image})[0]
    class_id = np.array([0, 4, 2], np.int64)
    single = ort.InferenceSession(str(paths["single_logit"]), providers=CPU).run(
        None, {"image": image, "class_id": class_id})[0]
    assert full.shape == (3, k)
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single, expected[np.arange(3), class_id], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture, shape", [("resnet50", (3, 224, 224)), ("inception_v3", (3, 299, 299)),
                                                 ("mlp", (1, 28, 28)), ("conv6", (3, 32, 32))])
def test_input_shape_is_the_networks_own(architecture, shape):
    assert benchmark.input_shape(architecture) == shape


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ConfigError, match="list_models"):
        benchmark.input_shape("resnet5O")


def test_prediction_is_backbone_plus_one_read_of_the_head():
    # ResNet-50 at 400,000 classes: 2048 x 400,000 x 4 bytes = 3.2768 GB, at 10 GB/s 327.68 ms
    assert benchmark.predicted_ms(10.0, 2048, 400_000, 10.0) == pytest.approx(337.68)


def test_compare_gives_the_ratios_the_goals_are_judged_on():
    r = benchmark.compare(backbone_ms=10.0, full_ms=40.0, single_ms=10.5, d=1000, k=1_000_000, gbps=16.0)
    assert r["predicted_full_ms"] == pytest.approx(260.0)
    assert r["speedup"] == pytest.approx(40.0 / 10.5)
    assert r["speedup_limit"] == pytest.approx(26.0)
    assert r["full_vs_predicted"] == pytest.approx(40.0 / 260.0)
    assert r["single_vs_backbone"] == pytest.approx(1.05)


def test_spread_reports_median_and_p10_p90_in_ms():
    s = timing.spread([i / 1000 for i in range(1, 12)])  # 1..11 ms
    assert (s["median_ms"], s["p10_ms"], s["p90_ms"], s["min_ms"], s["repeats"]) == pytest.approx((6, 2, 10, 1, 11))


def test_time_call_warms_up_before_timing_and_times_each_repeat():
    calls = []
    result = timing.time_call(lambda: calls.append(1), warmup=3, repeats=7)
    assert len(calls) == 10 and result["repeats"] == 7


def test_interleaved_timing_rotates_the_order_every_round():
    order = []
    result = timing.time_interleaved({name: (lambda name=name: order.append(name)) for name in "abc"},
                                     warmup=1, repeats=3)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: r["repeats"] for name, r in result.items()} == {"a": 3, "b": 3, "c": 3}


def test_the_gemv_probe_is_a_head_of_about_the_buffer_size_that_reads_every_row(tmp_path):
    path = benchmark.write_gemv_probe(tmp_path, mib=16)
    session = ort.InferenceSession(str(path), providers=CPU)
    (logits,) = session.run(None, {"features": np.ones((1, benchmark.PROBE_D), np.float32)})
    assert logits.shape == (1, 16 * 2**20 // (4 * benchmark.PROBE_D))
    assert np.all(logits == benchmark.PROBE_D)  # ones . ones: every weight was read
    assert (tmp_path / "head.weights").stat().st_size >= 16 * 2**20


def test_bandwidth_is_the_fastest_best_read_of_the_three_probes(tmp_path, monkeypatch):
    path = benchmark.write_gemv_probe(tmp_path, mib=16)
    n, d = 16 * 2**20 // (4 * benchmark.PROBE_D), benchmark.PROBE_D
    nbytes = 4 * n * (d + 1)
    best_ms = iter([2.0, 1.0, 4.0])  # onnxruntime, torch, numpy: torch is fastest here
    results = []

    def fixed_time(call, warmup, repeats):  # run each probe once, report its best and a median twice as long
        results.append(call())
        best = next(best_ms)
        return {"median_ms": 2 * best, "min_ms": best}

    monkeypatch.setattr(timing, "time_call", fixed_time)
    bandwidth = timing.memory_bandwidth(path, timing.session_settings(1, False, CPU), repeats=3)
    gemv, torch_sum, numpy_sum = results
    assert gemv[0].shape == (1, n) and float(torch_sum) == float(numpy_sum) == nbytes // 4  # each read it all
    assert bandwidth["gbps"] == pytest.approx(nbytes / 1e-3 / 1e9)
    assert bandwidth["probes"]["onnxruntime_gemv"] == pytest.approx({"best_gbps": nbytes / 2e-3 / 1e9,
                                                                     "median_gbps": nbytes / 4e-3 / 1e9})
    assert bandwidth["probes"]["numpy_sum"]["best_gbps"] == pytest.approx(nbytes / 4e-3 / 1e9)


def test_measured_bandwidth_bounds_every_probe_numpy_included_and_leaves_torchs_threads_as_they_were(tmp_path):
    import torch

    threads = torch.get_num_threads()
    path = benchmark.write_gemv_probe(tmp_path, mib=16)
    bandwidth = timing.memory_bandwidth(path, timing.session_settings(1, False, CPU), repeats=3)
    probes = bandwidth["probes"]
    assert set(probes) == {"onnxruntime_gemv", "torch_sum", "numpy_sum"}
    assert all(0.5 < p["median_gbps"] <= p["best_gbps"] < 1000 for p in probes.values())  # GB/s
    assert bandwidth["gbps"] == max(p["best_gbps"] for p in probes.values()) >= probes["numpy_sum"]["best_gbps"]
    assert torch.get_num_threads() == threads


def test_a_faster_bandwidth_lowers_the_floor_so_the_floor_at_the_best_read_is_the_lowest():
    floors = [benchmark.predicted_ms(50.0, 2048, 400_000, gbps) for gbps in (10.0, 20.0, 40.0)]
    assert floors == sorted(floors, reverse=True) and floors[-1] > 50.0


def test_benchmark_chooses_providers_by_servings_rule(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [sessions.CUDA, sessions.CPU])
    monkeypatch.setattr(sessions, "cuda_device_count", lambda: 0)
    assert benchmark.session_providers("auto") == [sessions.CPU]
    monkeypatch.setattr(sessions, "cuda_device_count", lambda: 1)
    assert benchmark.session_providers("auto") == [sessions.CUDA, sessions.CPU]


@pytest.mark.parametrize("setting", [["NoSuchExecutionProvider"], "cuda", []])
def test_bad_benchmark_providers_are_a_params_error_naming_the_value_and_the_available_ones(setting):
    with pytest.raises(ConfigError, match=rf"^benchmark.providers = {re.escape(repr(setting))} is invalid: "
                                          rf".*available.*CPUExecutionProvider"):
        benchmark.session_providers(setting)


def test_session_records_the_provider_it_really_used(tmp_path):
    path = tmp_path / "backbone.onnx"
    onnx.save(tiny_backbone(4), path)
    _, used = timing.open_session(path, timing.session_settings(1, False, CPU))
    assert used == CPU


def test_peak_rss_rises_by_the_memory_touched_and_a_reset_brings_it_back_down():
    if not peak_memory.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here: the peak cannot be reset")
    size = 128 << 20
    before = peak_memory.peak_rss_gb()
    block = np.ones(size, np.uint8)  # ones are written to every page, so every page is resident
    peak = peak_memory.peak_rss_gb()
    del block
    peak_memory.reset_peak_rss()
    after = peak_memory.peak_rss_gb()
    assert peak - before == pytest.approx(size / 1e9, rel=0.1)
    assert peak - after == pytest.approx(size / 1e9, rel=0.1)


def test_benchmark_params_reject_an_empty_k_list():
    with pytest.raises(ConfigError, match="benchmark.num_classes"):
        BenchmarkConfig(**{**SETTINGS, "num_classes": []})


def measured(median: float) -> dict:
    return {"median_ms": median, "p10_ms": median * 0.9, "p90_ms": median * 1.1, "min_ms": median * 0.8,
            "mean_ms": median, "repeats": 30, "load_s": 0.1, "providers_used": CPU}


def measured_architectures(single_vs_backbone: float = 1.0, full_vs_predicted: float = 1.0,
                           at_k: int | None = None) -> dict[str, Architecture]:
    """ResNet-50 at three k with round numbers: backbone 50 ms, 16 GB/s; the single logit model and
    the full one at these multiples of the backbone and of the prediction (at `at_k` only, if given)."""
    per_k = {}
    for k in (1, 16384, 400_000):
        single_ratio, full_ratio = (single_vs_backbone, full_vs_predicted) if at_k in (None, k) else (1.0, 1.0)
        single, full = 50.0 * single_ratio, benchmark.predicted_ms(50.0, 2048, k, 16.0) * full_ratio
        per_k[k] = {"backbone": measured(50.0), "single_logit": measured(single), "full": measured(full),
                    **benchmark.compare(50.0, full, single, 2048, k, 16.0),
                    "peak_rss_gb": 1.0 + 4 * 2048 * k / 1e9, "head_gb": 4 * 2048 * k / 1e9}
    return {"resnet50": Architecture(d=2048, input_shape=[3, 224, 224], k=per_k)}


def trained_export(full_vs_predicted: float = 1.3) -> dict[str, Architecture]:
    """A trained run's export at its own k = 400,000 (d = 256, 20 ms backbone), its full model
    `full_vs_predicted` times the floor at 16 GB/s."""
    k, d, backbone = 400_000, 256, 20.0
    full = benchmark.predicted_ms(backbone, d, k, 16.0) * full_vs_predicted
    at_k = {"backbone": measured(backbone), "single_logit": measured(20.2), "full": measured(full),
            **benchmark.compare(backbone, full, 20.2, d, k, 16.0), "peak_rss_gb": 1.5, "head_gb": 4 * d * k / 1e9}
    return {"bce-s0": Architecture(d=d, input_shape=[1, 28, 168], k={k: at_k})}


def fixed_results(exports: dict[str, Architecture] | None = None) -> SpeedupResults:
    """The stage's results for `measured_architectures()`: the head at its floor, every goal met."""
    architectures, exports = measured_architectures(), exports or {}
    settings = {**SETTINGS, "session": timing.session_settings(2, False, CPU)}
    return SpeedupResults(**{"machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 24.0, "gpu": None, "onnxruntime": "1.0",
                        "torch": "2.0", "load_average": [0.1, 0.1, 0.1]},
            "settings": settings, "architectures": architectures, "exports": exports,
            "bandwidth": {"gbps": 16.0, "method": "test probe"},
            "goals": benchmark.goals(architectures, exports)})


@pytest.mark.parametrize("k, label", [(16384, "2^14"), (262144, "2^18"), (370727, "2^18.5"), (400_000, "400,000"),
                                      (1, "1")])
def test_k_is_labelled_as_in_the_paper(k, label):
    assert speedup_report.k_label(k) == label


def test_table_puts_ours_the_limit_and_the_papers_side_by_side():
    lines = speedup_report.table2_markdown(fixed_results()).splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["architecture", "SLC time", "k = 1", "k = 2^14", "k = 400,000"]
    assert cells[2] == ["resnet50 (ours)", "50.0 ms", "x1.00", "x1.17", "x5.10"]
    assert cells[3] == ["resnet50 (bandwidth floor)", "50.0 ms (backbone)", "x1.00", "x1.17", "x5.10"]
    assert cells[4] == ["resnet50 (paper)", "6.1 ms", "—", "x1.08", "—"]


def test_goals_hold_for_figures_within_their_bounds():
    goals = benchmark.goals(measured_architectures(single_vs_backbone=1.04, full_vs_predicted=1.14), {})
    assert goals["single_within_1.05x_of_backbone"] is True and goals["full_within_1.15x_of_prediction"] is True
    assert (goals["max_single_vs_backbone"], goals["max_full_vs_predicted"]) == pytest.approx((1.04, 1.14))
    assert fixed_results().goals["resnet50_speedup_at_400000"] == pytest.approx(1 + 3.2768 / 16 * 1e3 / 50)


@pytest.mark.parametrize("figures, missed, kept", [
    (dict(single_vs_backbone=1.06), "single_within_1.05x_of_backbone", "full_within_1.15x_of_prediction"),
    (dict(full_vs_predicted=1.2), "full_within_1.15x_of_prediction", "single_within_1.05x_of_backbone"),
])
def test_a_goal_missed_at_a_single_k_is_reported_missed(figures, missed, kept):
    goals = benchmark.goals(measured_architectures(**figures, at_k=16384), {})
    assert goals[missed] is False and goals[kept] is True
    worst = "max_single_vs_backbone" if "single_vs_backbone" in figures else "max_full_vs_predicted"
    assert goals[worst] == pytest.approx(next(iter(figures.values())))


@pytest.mark.parametrize("full_vs_predicted, at_k, held", [
    (1.0, None, True),      # at the floor
    (0.97, 400_000, True),  # 8 ms under a 255 ms floor: within the backbone's 10 ms spread, i.e. noise
    (0.9, 1, True),         # k = 1: the head is microseconds, full and backbone differ by noise only
    (0.8, 400_000, False),  # 51 ms under the floor: the head was read faster than B, so B under-reads
])
def test_a_full_model_faster_than_the_floor_by_more_than_the_noise_breaks_the_bound(full_vs_predicted, at_k, held):
    goals = benchmark.goals(measured_architectures(full_vs_predicted=full_vs_predicted, at_k=at_k), {})
    assert goals["full_at_or_above_bandwidth_floor"] is held
    assert goals["min_full_vs_predicted"] == pytest.approx(full_vs_predicted)


def test_a_trained_export_faster_than_its_floor_breaks_the_bound_too():
    assert benchmark.goals(measured_architectures(), trained_export(1.3))["full_at_or_above_bandwidth_floor"] is True
    goals = benchmark.goals(measured_architectures(), trained_export(0.7))
    assert goals["full_at_or_above_bandwidth_floor"] is False and goals["min_full_vs_predicted"] == pytest.approx(0.7)


def test_the_floor_speedup_is_at_most_the_measured_one_for_a_full_model_at_or_above_the_floor():
    r = trained_export(1.3)["bce-s0"].largest
    assert r.speedup >= r.speedup_limit * r.backbone.median_ms / r.single_logit.median_ms


def test_report_states_machine_settings_and_bandwidth_above_the_table():
    text = speedup_report.speedup_markdown(fixed_results())
    header = text.split("## Full k-class")[0]
    for expected in ("Test CPU", "2 cores", "onnxruntime 1.0", "CPUExecutionProvider", "2 intra-op threads",
                     "prepacking off", "5 warm-up then 30 timed runs", "16.0 GB/s"):
        assert expected in header
    assert "x1.08" in text and "No trained exports" in text


def test_trained_exports_get_their_own_table_beside_the_random_heads():
    text = speedup_report.speedup_markdown(fixed_results(trained_export()))
    section = text.split("## The trained runs' exports")[1]
    (row,) = [line for line in section.splitlines() if line.startswith("| bce-s0")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    r = trained_export()["bce-s0"].largest
    assert cells[:3] == ["bce-s0", "400,000", "0.41"]
    assert cells[9:11] == [f"x{r.speedup:.2f}", f"x{r.speedup_limit:.2f}"]
    assert "No trained exports" not in text


def test_trained_exports_are_drawn_but_stay_out_of_the_csv_of_the_random_heads(tmp_path):
    speedup_report.write_outputs(fixed_results(trained_export()), tmp_path / "speedup.json", tmp_path / "speedup.md",
                                 tmp_path / "p")
    assert (tmp_path / "p" / "speedup.png").stat().st_size > 0
    assert len((tmp_path / "p" / "speedup.csv").read_text().splitlines()) == 4
    assert read_speedup(tmp_path / "speedup.json").exports == trained_export()


def test_each_trained_export_is_timed_at_its_own_k_and_judged_by_the_same_floor(tmp_path):
    torch.manual_seed(0)
    k, shape = 5000, (1, 8, 8)
    model = build_model(ModelConfig("mlp", 16, 4, None, "linear", None), shape, k).eval()
    info = {"run_name": "bce-s0", "loss": "bce", "dataset": "tiny", "class_names": [f"c{i}" for i in range(k)],
            "input_shape": list(shape), "normalisation": {"mean": [0.5], "std": [0.25]}, "pixel_scale": 255.0}
    export_model(model, tmp_path / "exports" / "bce-s0", info, None, torch.randn(4, *shape), classes=2)
    (tmp_path / "exports" / "not-an-export").mkdir()
    cfg = BenchmarkConfig(**{**SETTINGS, "warmup": 1, "repeats": 3, "batch_size": 2})
    exports = benchmark.time_exports(tmp_path / "exports", cfg, timing.session_settings(1, False, CPU), gbps=20.0)
    assert list(exports) == ["bce-s0"]
    run = exports["bce-s0"]
    assert (run.d, run.input_shape, list(run.k)) == (16, [1, 8, 8], [k])
    r = run.largest
    assert all(t.repeats == 3 and t.median_ms > 0 for t in (r.backbone, r.full, r.single_logit))
    assert r.speedup == pytest.approx(r.full.median_ms / r.single_logit.median_ms)
    assert r.predicted_full_ms == pytest.approx(benchmark.predicted_ms(r.backbone.median_ms, 16, k, 20.0))
    assert r.head_gb == pytest.approx(4 * 16 * k / 1e9) and r.peak_rss_gb > 0


def test_outputs_are_written_where_asked(tmp_path):
    speedup_report.write_outputs(fixed_results(), tmp_path / "m" / "speedup.json", tmp_path / "r" / "speedup.md",
                                 tmp_path / "p")
    assert (tmp_path / "p" / "speedup.png").stat().st_size > 0
    assert (tmp_path / "p" / "speedup.csv").read_text().splitlines()[0].startswith("architecture,k,")
    assert len((tmp_path / "p" / "speedup.csv").read_text().splitlines()) == 4
    assert '"max_full_vs_predicted"' in (tmp_path / "m" / "speedup.json").read_text()
