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
from slc.bench.results import Architecture, SpeedupResults, Timing, read_speedup
from slc.core import peak_memory
from slc.core.config import BenchmarkConfig, ModelConfig
from slc.core.errors import ConfigError
from slc.export.exporting import export_model
from slc.export.onnx_graphs import SyntheticRows
from slc.nn.models import build_model

CPU = ["CPUExecutionProvider"]
SETTINGS = dict(architectures=["resnet50"], num_classes=[1, 16384, 400_000], batch_size=1, threads=2, warmup=5,
                repeats=30, rounds=6, providers="auto", prepacking=False, bandwidth_mib=1024)


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


def rounds_timing(rounds_ms: list[float]) -> dict:
    median = float(np.median(rounds_ms))
    return {"median_ms": median, "p10_ms": min(rounds_ms), "p90_ms": max(rounds_ms), "min_ms": min(rounds_ms),
            "mean_ms": median, "repeats": 30, "runs_per_sample": 1, "rounds_ms": rounds_ms, "load_s": 0.1,
            "providers_used": CPU}


def paired(backbone: list[float], full: list[float], single: list[float], head: list[float], gbps: list[float],
           d: int = 1000, k: int = 1_000_000, control: list[float] | None = None):
    """One k's figures from each round's times; the control (the backbone's second session) equal to the
    backbone unless given."""
    times = {kind: Timing(**rounds_timing(ms)) for kind, ms in
             (("backbone", backbone), ("control", control or backbone), ("full", full), ("single_logit", single),
              ("head", head))}
    return benchmark.at_k(times, gbps, d, k).model_copy(update={"peak_rss_gb": 1.0})  # this process's peak varies


def test_each_round_has_its_own_floor_from_its_backbone_and_its_fastest_read():
    # 4 GB head (d 1000, k 1e6): at 16 GB/s 250 ms; round 2's head alone read it at 20 GB/s (200 ms)
    r = paired(backbone=[10, 20, 10], full=[260, 230, 300], single=[10.5, 21, 10], head=[300, 200, 300],
               gbps=[16, 16, 8])
    assert r.gbps == pytest.approx([16, 20, 13.333333])
    floors = [10 + 250, 20 + 200, 10 + 300]
    assert r.full_vs_floor.rounds == pytest.approx([260 / floors[0], 230 / floors[1], 300 / floors[2]])
    assert r.predicted_full_ms == pytest.approx(260)
    assert r.full_vs_backbone_plus_head.rounds == pytest.approx([260 / 310, 230 / 220, 300 / 310])
    assert r.single_vs_backbone.rounds == pytest.approx([1.05, 1.05, 1.0])
    assert (r.single_vs_backbone.median, r.single_vs_backbone.min, r.single_vs_backbone.max) == pytest.approx(
        (1.05, 1.0, 1.05))
    assert r.speedup == pytest.approx(260 / 10.5) and r.speedup_limit == pytest.approx(260 / 10)


def test_a_round_whose_backbone_swung_is_an_outlier_and_left_out_of_median_and_min_but_kept_in_rounds():
    backbone = [100, 102, 98, 101, 160, 99]  # round 4's backbone swung: beyond Tukey's upper fence
    full = [b + 80 for b in backbone]
    full[4] = 150  # below that round's floor: the round says more about the machine than the models
    r = paired(backbone, full, backbone, [80] * 6, [1.0] * 6, d=1000, k=20_000)  # 80 MB head, read at 1 GB/s
    assert r.full_vs_floor.outliers == [4] and len(r.full_vs_floor.rounds) == 6
    assert r.full_vs_floor.rounds[4] == pytest.approx(150 / 240)
    assert (r.full_vs_floor.median, r.full_vs_floor.min, r.full_vs_floor.max) == pytest.approx((1.0, 1.0, 1.0))


@pytest.mark.parametrize("backbone, outliers", [([100, 102, 98], []),  # fewer than 4 rounds: no quartiles
                                                ([100, 100, 100, 100], []), ([100, 101, 99, 100, 40], [4])])
def test_outlier_rule_needs_four_rounds_and_names_rounds_beyond_the_fences(backbone, outliers):
    backbone = np.asarray(backbone, float)
    assert benchmark.outlier_rounds(backbone, control_ms=backbone) == outliers


@pytest.mark.parametrize("control, outliers", [
    ([1.0, 1.0, 1.0], []),
    ([1.05, 0.96, 1.0], []),        # within 1/0.95 either way: the round resolves the tolerance
    ([1.06, 0.94, 1.0], [0, 1]),    # the same work timed 6% apart: it cannot
])
def test_a_round_whose_two_backbone_sessions_disagree_beyond_the_tolerance_is_an_outlier(control, outliers):
    backbone = np.full(3, 0.1)
    assert benchmark.outlier_rounds(backbone, backbone * np.asarray(control)) == outliers


def test_a_noisy_round_is_left_out_of_the_floors_figures_unless_every_round_is():
    # 0.1 ms models, k = 10: the floor is the backbone; round 1's backbone ran slow against its own control
    backbone, full = [0.100, 0.120, 0.100, 0.100], [0.101, 0.102, 0.100, 0.103]
    r = paired(backbone, full, backbone, [0.001] * 4, [30.0] * 4, d=256, k=10, control=[0.100, 0.100, 0.101, 0.099])
    assert r.full_vs_floor.outliers == [1] and r.full_vs_floor.rounds[1] < 0.95
    assert r.full_vs_floor.min > 0.99
    every = paired(backbone, full, backbone, [0.001] * 4, [30.0] * 4, d=256, k=10, control=[0.2] * 4)
    assert every.full_vs_floor.outliers == [] and every.full_vs_floor.min < 0.95


def test_spread_reports_median_and_p10_p90_in_ms():
    s = timing.spread([i / 1000 for i in range(1, 12)])  # 1..11 ms
    assert (s["median_ms"], s["p10_ms"], s["p90_ms"], s["min_ms"], s["repeats"]) == pytest.approx((6, 2, 10, 1, 11))


def test_time_call_warms_up_before_timing_and_times_each_repeat():
    calls = []
    result = timing.time_call(lambda: calls.append(1), warmup=3, repeats=7)
    assert len(calls) == 10 and result["repeats"] == 7


def test_interleaved_timing_runs_each_call_twice_a_sweep_in_a_changing_seeded_order():
    def sweeps():
        order = []
        result = timing.time_interleaved({name: (lambda name=name: order.append(name)) for name in "abcd"},
                                         warmup=0, repeats=6)
        assert {name: r["repeats"] for name, r in result.items()} == dict.fromkeys("abcd", 6)
        timed = ["".join(order[i:i + 8]) for i in range(0, len(order), 8)]
        assert all(sorted(sweep) == sorted("aabbccdd") and all(sweep[i] == sweep[i + 1] for i in range(0, 8, 2))
                   for sweep in timed)  # each timed run right after an untimed run of the same call
        return timed

    first = sweeps()
    assert len(set(first)) > 1  # no call always runs after the same one
    assert sweeps() == first  # seeded: a rerun times in the same order


def test_a_fast_calls_sample_averages_back_to_back_runs_as_long_as_the_minimum(monkeypatch):
    clock, runs = [0.0], {"fast": 0, "slow": 0}

    def call(name: str, seconds: float):
        runs[name] += 1
        clock[0] += seconds

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    result = timing.time_interleaved({"fast": lambda: call("fast", 0.002), "slow": lambda: call("slow", 0.050)},
                                     warmup=2, repeats=4, rounds=2)
    assert timing.MIN_SAMPLE_S == 0.005  # so a 2 ms call is timed 3 at a time, a 50 ms one alone
    assert result["fast"]["runs_per_sample"] == 3 and result["slow"]["runs_per_sample"] == 1
    assert runs == {"fast": 2 + 4 * (1 + 3), "slow": 2 + 4 * (1 + 1)}  # warm-up, then an untimed run per sample
    assert result["fast"]["median_ms"] == pytest.approx(2.0) and result["fast"]["rounds_ms"] == pytest.approx([2, 2])
    assert result["slow"]["median_ms"] == pytest.approx(50.0)


def test_rounds_are_consecutive_blocks_of_sweeps_each_with_its_own_median(monkeypatch):
    clock = iter(np.arange(0.0, 100.0, 0.5))  # each call to perf_counter advances 0.5 s
    slow = {"n": 0}

    def call():
        slow["n"] += 1

    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    result = timing.time_interleaved({"a": call, "b": call}, warmup=0, repeats=7, rounds=3)
    assert result["a"]["repeats"] == 7 and len(result["a"]["rounds_ms"]) == 3  # blocks of 3, 2, 2 sweeps
    assert result["a"]["rounds_ms"] == pytest.approx([500.0] * 3)


@pytest.mark.parametrize("rounds", [0, 4])
def test_more_rounds_than_runs_is_refused(rounds):
    with pytest.raises(ValueError, match="rounds"):
        timing.time_interleaved({"a": lambda: None}, warmup=0, repeats=3, rounds=rounds)


def test_the_gemv_probe_is_a_head_of_about_the_buffer_size_that_reads_every_row(tmp_path):
    path = benchmark.write_gemv_probe(tmp_path, mib=16)
    session = ort.InferenceSession(str(path), providers=CPU)
    (logits,) = session.run(None, {"features": np.ones((1, benchmark.PROBE_D), np.float32)})
    assert logits.shape == (1, 16 * 2**20 // (4 * benchmark.PROBE_D))
    assert np.all(logits == benchmark.PROBE_D)  # ones . ones: every weight was read
    assert (tmp_path / "head.weights").stat().st_size >= 16 * 2**20


def test_the_bandwidth_read_reads_every_byte_of_the_probe(tmp_path):
    path = benchmark.write_gemv_probe(tmp_path, mib=16)
    n, d = 16 * 2**20 // (4 * benchmark.PROBE_D), benchmark.PROBE_D
    with timing.bandwidth_reads(path, timing.session_settings(1, False, CPU)) as (nbytes, reads):
        assert set(reads) == {"onnxruntime_gemv"} and nbytes == 4 * n * (d + 1)
        (logits,) = reads["onnxruntime_gemv"]()
        assert logits.shape == (1, n) and np.all(logits == d)  # ones . ones: every weight read


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


def measured_architectures(single_vs_backbone: float = 1.0, full_vs_floor: float = 1.0,
                           at_k: int | None = None) -> dict[str, Architecture]:
    """ResNet-50 at three k with round numbers: backbone 50 ms, 16 GB/s in every one of 6 rounds, the
    head alone at that rate; the single logit model and the full one at these multiples of the backbone
    and of the floor (at `at_k` only, if given)."""
    per_k = {}
    for k in (1, 16384, 400_000):
        single_ratio, full_ratio = (single_vs_backbone, full_vs_floor) if at_k in (None, k) else (1.0, 1.0)
        head = 4 * 2048 * k / 16e6
        per_k[k] = paired(backbone=[50.0] * 6, full=[(50.0 + head) * full_ratio] * 6, single=[50.0 * single_ratio] * 6,
                          head=[head] * 6, gbps=[16.0] * 6, d=2048, k=k)
    return {"resnet50": Architecture(d=2048, input_shape=[3, 224, 224], k=per_k)}


def trained_export(full_vs_floor: float = 1.3) -> dict[str, Architecture]:
    """A trained run's export at its own k = 400,000 (d = 256, 20 ms backbone), its full model
    `full_vs_floor` times the floor at 16 GB/s."""
    k, d, backbone = 400_000, 256, 20.0
    head = 4 * d * k / 16e6
    at_k = paired(backbone=[backbone] * 6, full=[(backbone + head) * full_vs_floor] * 6, single=[20.2] * 6,
                  head=[head] * 6, gbps=[16.0] * 6, d=d, k=k)
    return {"bce-s0": Architecture(d=d, input_shape=[1, 28, 168], k={k: at_k})}


def fixed_results(exports: dict[str, Architecture] | None = None) -> SpeedupResults:
    """The stage's results for `measured_architectures()`: the head at its floor, every goal met."""
    architectures, exports = measured_architectures(), exports or {}
    settings = {**SETTINGS, "session": timing.session_settings(2, False, CPU)}
    return SpeedupResults(**{"machine": {"cpu": "Test CPU", "cores": 2, "memory_gb": 24.0, "gpu": None, "onnxruntime": "1.0",
                        "torch": "2.0", "load_average": [0.1, 0.1, 0.1]},
            "settings": settings, "architectures": architectures, "exports": exports,
            "bandwidth": benchmark.bandwidth_summary([r.gbps for a in (*architectures.values(), *exports.values())
                                                      for r in a.k.values()], 2**30, 2),
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
    goals = benchmark.goals(measured_architectures(single_vs_backbone=1.04, full_vs_floor=1.14), {})
    assert goals["single_within_1.05x_of_backbone"] is True and goals["full_within_1.15x_of_floor"] is True
    assert (goals["max_single_vs_backbone"], goals["max_full_vs_floor"]) == pytest.approx((1.04, 1.14))
    assert fixed_results().goals["resnet50_speedup_at_400000"] == pytest.approx(1 + 3.2768 / 16 * 1e3 / 50)


@pytest.mark.parametrize("figures, missed, kept", [
    (dict(single_vs_backbone=1.06), "single_within_1.05x_of_backbone", "full_within_1.15x_of_floor"),
    (dict(full_vs_floor=1.2), "full_within_1.15x_of_floor", "single_within_1.05x_of_backbone"),
])
def test_a_goal_missed_at_a_single_k_is_reported_missed(figures, missed, kept):
    goals = benchmark.goals(measured_architectures(**figures, at_k=16384), {})
    assert goals[missed] is False and goals[kept] is True
    worst = "max_single_vs_backbone" if "single_vs_backbone" in figures else "max_full_vs_floor"
    assert goals[worst] == pytest.approx(next(iter(figures.values())))


@pytest.mark.parametrize("full_vs_floor, at_k, held", [
    (1.0, None, True),      # at the floor
    (0.96, 400_000, True),  # within the tolerance of every round
    (0.9, 1, False),        # k = 1 too: full below its own round's backbone by a tenth
    (0.8, 400_000, False),  # the head was read faster than B, so B under-reads
])
def test_a_full_model_below_095_of_the_floor_in_a_round_breaks_the_bound(full_vs_floor, at_k, held):
    goals = benchmark.goals(measured_architectures(full_vs_floor=full_vs_floor, at_k=at_k), {})
    assert goals["full_at_or_above_0.95_of_floor"] is held
    assert goals["min_full_vs_floor"] == pytest.approx(full_vs_floor)


def test_a_trained_export_below_its_floor_breaks_the_bound_too():
    assert benchmark.goals(measured_architectures(), trained_export(1.3))["full_at_or_above_0.95_of_floor"] is True
    goals = benchmark.goals(measured_architectures(), trained_export(0.7))
    assert goals["full_at_or_above_0.95_of_floor"] is False and goals["min_full_vs_floor"] == pytest.approx(0.7)


def test_the_floor_speedup_is_at_most_the_measured_one_for_a_full_model_at_or_above_the_floor():
    r = trained_export(1.3)["bce-s0"].largest
    assert r.speedup >= r.speedup_limit * r.backbone.median_ms / r.single_logit.median_ms


def test_the_rounds_of_a_k_below_the_tolerance_are_shown_not_one_number():
    assert "Every round of every k" in speedup_report.rounds_markdown(fixed_results())
    text = speedup_report.rounds_markdown(fixed_results(trained_export(0.7)))
    (row,) = [line for line in text.splitlines() if line.startswith("| trained bce-s0")]
    assert "0.70 0.70 0.70 0.70 0.70 0.70" in row and "16.0 16.0" in row


def test_report_states_machine_settings_and_bandwidth_above_the_table():
    text = speedup_report.speedup_markdown(fixed_results())
    header = text.split("## Full k-class")[0]
    for expected in ("Test CPU", "2 cores", "onnxruntime 1.0", "CPUExecutionProvider", "2 intra-op threads",
                     "prepacking off", "5 warm-up then 30 timed runs per model in 6 rounds", "median of 18 rounds 16.0",
                     "Tukey's fences"):
        assert expected in header
    assert "x1.08" in text and "No trained exports" in text


def test_trained_exports_get_their_own_table_beside_the_random_heads():
    text = speedup_report.speedup_markdown(fixed_results(trained_export()))
    section = text.split("## The trained runs' exports")[1]
    (row,) = [line for line in section.splitlines() if line.startswith("| bce-s0")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    r = trained_export()["bce-s0"].largest
    assert cells[:3] == ["bce-s0", "400,000", "0.41"]
    assert cells[8] == "1.30 (1.30–1.30)"
    assert cells[11:13] == [f"x{r.speedup:.2f}", f"x{r.speedup_limit:.2f}"]
    assert "No trained exports" not in text


def test_trained_exports_are_drawn_but_stay_out_of_the_csv_of_the_random_heads(tmp_path):
    speedup_report.write_outputs(fixed_results(trained_export()), tmp_path / "speedup.json", tmp_path / "speedup.md",
                                 tmp_path / "p")
    assert (tmp_path / "p" / "speedup.png").stat().st_size > 0
    assert len((tmp_path / "p" / "speedup.csv").read_text().splitlines()) == 4
    assert read_speedup(tmp_path / "speedup.json").exports == trained_export()


def test_each_trained_export_is_timed_at_its_own_k_in_rounds_with_its_head_alone(tmp_path):
    torch.manual_seed(0)
    k, shape = 5000, (1, 8, 8)
    model = build_model(ModelConfig("mlp", 16, 4, None, "linear", None), shape, k).eval()
    info = {"run_name": "bce-s0", "loss": "bce", "dataset": "tiny", "class_names": [f"c{i}" for i in range(k)],
            "input_shape": list(shape), "normalisation": {"mean": [0.5], "std": [0.25]}, "pixel_scale": 255.0}
    export_model(model, tmp_path / "exports" / "bce-s0", info, None, torch.randn(4, *shape), classes=2)
    (tmp_path / "exports" / "not-an-export").mkdir()
    before = sorted(p.name for p in (tmp_path / "exports" / "bce-s0").iterdir())
    cfg = BenchmarkConfig(**{**SETTINGS, "warmup": 1, "repeats": 4, "rounds": 2, "batch_size": 2})
    settings = timing.session_settings(1, False, CPU)
    with timing.bandwidth_reads(benchmark.write_gemv_probe(tmp_path, mib=4), settings) as reads:
        exports = benchmark.time_exports(tmp_path / "exports", cfg, settings, reads)
    assert list(exports) == ["bce-s0"]
    assert sorted(p.name for p in (tmp_path / "exports" / "bce-s0").iterdir()) == before  # nothing written there
    run = exports["bce-s0"]
    assert (run.d, run.input_shape, list(run.k)) == (16, [1, 8, 8], [k])
    r = run.largest
    assert all(t.repeats == 4 and len(t.rounds_ms) == 2 and t.median_ms > 0
               for t in (r.backbone, r.full, r.single_logit, r.head))
    assert len(r.gbps) == 2 and len(r.full_vs_floor.rounds) == 2
    assert r.speedup == pytest.approx(r.full.median_ms / r.single_logit.median_ms)
    floors = benchmark.predicted_ms(np.asarray(r.backbone.rounds_ms), 16, k, np.asarray(r.gbps))
    assert r.full_vs_floor.rounds == pytest.approx(list(np.asarray(r.full.rounds_ms) / floors))
    assert r.head_gb == pytest.approx(4 * 16 * k / 1e9) and r.peak_rss_gb > 0


def test_the_head_alone_computes_the_full_models_logits_from_the_mapped_weights(tmp_path):
    d, k = 4, 8
    weight, bias = benchmark.write_head(tmp_path, k, d)
    paths = benchmark.write_models(tmp_path, tiny_backbone(d), weight, bias, 5)
    call, used = benchmark.head_alone(paths["full"], batch=3, settings=timing.session_settings(1, False, CPU))
    (logits,) = call()
    assert used == CPU and not (tmp_path / "head_alone.onnx").exists()
    np.testing.assert_allclose(logits.numpy(), np.ones((3, d), np.float32) @ SyntheticRows(k, d)[:5].T, rtol=1e-5)


def test_outputs_are_written_where_asked(tmp_path):
    speedup_report.write_outputs(fixed_results(), tmp_path / "m" / "speedup.json", tmp_path / "r" / "speedup.md",
                                 tmp_path / "p")
    assert (tmp_path / "p" / "speedup.png").stat().st_size > 0
    assert (tmp_path / "p" / "speedup.csv").read_text().splitlines()[0].startswith("architecture,k,")
    assert len((tmp_path / "p" / "speedup.csv").read_text().splitlines()) == 4
    figures = (tmp_path / "m" / "speedup.json").read_text()
    assert '"max_full_vs_floor"' in figures and '"full_vs_floor"' in figures
    assert len((tmp_path / "p" / "speedup.csv").read_text().splitlines()[1].split(",")) == len(speedup_report.PLOT_FIELDS)
