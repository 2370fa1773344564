"""The search benchmark (pipeline.search_bench, slc.bench.search*): its figures from tiny real exports and
data, the quality figure that must be 0 and must not be when the thresholds move, and its report."""
import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline import search_bench
from serving.index_build import build
from serving.model import SingleLogitModel
from serving.search import SearchIndex
from slc.bench import search, search_quality, timing
from slc.bench.benchmarking import write_gemv_probe
from slc.bench.search_report import report_markdown, write_example, write_outputs
from slc.core.config import ModelConfig
from slc.core.errors import ConfigError
from slc.evaluate.evaluation import evaluate_features
from slc.evaluate.scoring import Head
from slc.export.exporting import export_model
from slc.nn.models import build_model, predict_features
from tests.conftest import prepared_synthetic, write_params

MLP = ModelConfig(name="mlp", hidden=16, channels=4, weights=None, head="linear", scale=None)
RECALLS = [0.9, 0.99]
RUNS = {"ce-s0": ("ce", 0), "batch_ce-s0": ("batch_ce", 1)}


@pytest.fixture(scope="module")
def pipeline_outputs(params, tmp_path_factory):
    """What `make run` leaves for the benchmark, in small: prepared synthetic data (5 classes of 8x8), two runs
    (random MLPs) exported with thresholds from evaluate's own code on val, and evaluate's thresholds_test.json."""
    root = tmp_path_factory.mktemp("pipeline")
    data = prepared_synthetic(params, root, num_classes=5, train_per_class=4, test_per_class=40, image_size=8)
    stage = {}
    for run, (loss, seed) in RUNS.items():
        torch.manual_seed(seed)
        model = build_model(MLP, data.input_shape, data.num_classes).eval()
        val, test = data.split("val"), data.split("test")
        result = evaluate_features(predict_features(model, val), val.labels, predict_features(model, test),
                                   test.labels, Head.of(model), None, RECALLS, 10)
        info = {"run_name": run, "loss": loss, "dataset": "synthetic", "class_names": data.class_names,
                "input_shape": list(data.input_shape), "normalisation": data.meta["normalisation"],
                "pixel_scale": data.meta["pixel_scale"]}
        export_model(model, root / "exports" / run, info, result.thresholds, torch.stack([test[i][0] for i in range(4)]),
                     classes=[0])
        stage[run] = result.thresholds_test
    (root / "thresholds_test.json").write_text(json.dumps(stage))
    return root


@pytest.fixture
def split(pipeline_outputs, tmp_path):
    images, labels = search_quality.split_source(pipeline_outputs / "prepared", "test", tmp_path / "test.npy")
    return tmp_path / "test.npy", images, labels


@pytest.fixture
def index(pipeline_outputs, split, tmp_path) -> SearchIndex:
    build(pipeline_outputs / "exports" / "ce-s0", split[0], tmp_path / "index")
    return SearchIndex.open(tmp_path / "index")


def test_a_split_becomes_an_index_source_with_its_raw_images_and_labels(pipeline_outputs, split):
    _, images, labels = split
    stored = np.load(pipeline_outputs / "prepared" / "test_images.npy")
    assert images.dtype == np.uint8 and np.array_equal(images, stored)
    assert np.array_equal(labels, np.repeat(np.arange(5), 40))


def test_search_has_evaluates_precision_and_recall_exactly(index, split, pipeline_outputs):
    _, images, labels = split
    stage = json.loads((pipeline_outputs / "thresholds_test.json").read_text())["ce-s0"]
    result = search_quality.run_quality(index, images, labels, np.arange(5), stage)
    assert result["max_abs_diff"] == 0 and result["max_abs_diff_evaluate_file"] == 0
    assert list(result["recalls"]) == ["0.9", "0.99"]
    found = [row["found"] for row in result["recalls"].values()]
    assert all(0 < f < 5 * len(labels) for f in found), "every search found all or nothing: the test would pass on anything"
    assert any(p < 1 for p in result["precision"]["0.9"].values()), "no wrong image found: precision cannot differ"


def test_one_image_more_or_less_in_a_search_shows_in_the_quality_figure(index, split):
    _, images, labels = split
    thresholds = {key: index.model.thresholds(float(key)).copy() for key in ("0.9", "0.99")}
    class_id = next(c for c in range(5) if np.count_nonzero(labels[index.search(c, recall=0.9).ids] == c) > 1)
    hits = index.search(class_id, recall=0.9)
    thresholds["0.9"][class_id] = np.nextafter(hits.logits.min(), np.inf)  # the last image found is left out
    result = search_quality.run_quality(index, images, labels, np.arange(5), thresholds=thresholds)
    right = np.count_nonzero(labels[hits.ids] == class_id)
    assert result["recalls"]["0.99"]["max_abs_diff"] == 0
    assert result["recalls"]["0.9"]["max_abs_diff"] >= min(1 / 40, abs(right / len(hits.ids) - right / (len(hits.ids) - 1)))


def test_undefined_on_one_side_only_is_the_largest_difference():
    nan = np.nan
    assert search_quality.worst_difference([nan, 0.5], [nan, 0.5]) == 0
    assert search_quality.worst_difference([0.25, 0.5], [0.5, 0.5]) == 0.25
    assert search_quality.worst_difference([nan, 0.5], [0.0, 0.5]) == 1.0


@pytest.fixture
def reads(tmp_path):
    """The benchmark's bandwidth read over 2 MiB: small, real, fast."""
    settings = timing.session_settings(1, False, ["CPUExecutionProvider"])
    with timing.bandwidth_reads(write_gemv_probe(tmp_path, 2), settings) as reads:
        yield reads


def test_a_query_finds_its_share_and_the_full_head_above_full_rows_is_the_slice_scaled(pipeline_outputs, reads,
                                                                                       tmp_path):
    model = SingleLogitModel.load(pipeline_outputs / "exports" / "ce-s0")
    cfg = search.QuerySettings(found=0.02, ks=[10, 5000], full_rows=100, slice_rows=50, slice_images=200,
                               chunk_images=300, warmup=1, repeats=3, rounds=1)
    q = search.time_queries(model, 1000, cfg, reads, tmp_path / "n")
    assert q["found_mean"] == pytest.approx(20, abs=1) and 0.5 <= q["compressed_recall"] <= 1
    assert q["full_extrapolated"] == {"10": False, "5000": True}
    slice_ms = q["timings"]["gemm_slice"]["rounds_ms"][0]
    assert q["full_ms"]["5000"] == pytest.approx(slice_ms * (1000 / 200) * (5000 / 50))
    assert q["full_ms"]["10"] == q["timings"]["full_10"]["median_ms"]
    gbps = reads[0] / q["timings"]["onnxruntime_gemv"]["rounds_ms"][0] / 1e6
    assert q["limit_ms"] == pytest.approx(1000 * 16 * 4 / gbps / 1e6) and q["gbps"] == [pytest.approx(gbps)]
    assert q["exact_p99_ms"] >= q["exact_ms"] > 0 and q["exact_qps"] == pytest.approx(1e3 / q["exact_ms"])
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["flat", "sq8"]


def test_the_benchmark_end_to_end_writes_every_figure(pipeline_outputs, params, tmp_path):
    cheap = dataclasses.replace(params, benchmark=dataclasses.replace(params.benchmark, bandwidth_mib=2, threads=1))
    out = tmp_path / "out"
    search_bench.main(["--params", str(write_params(cheap, tmp_path / "params.yaml")),
                       "--exports", str(pipeline_outputs / "exports"), "--data", str(pipeline_outputs / "prepared"),
                       "--thresholds-test", str(pipeline_outputs / "thresholds_test.json"),
                       "--sizes", "1000", "2000", "--ks", "10", "5000", "--found", "0.01", "--full-rows", "100",
                       "--slice-rows", "50", "--slice-images", "200", "--chunk-images", "700", "--repeats", "3",
                       "--rounds", "1", "--warmup", "1", "--build-images", "60", "--no-ray", "--workdir", str(tmp_path),
                       "--metrics", str(out / "search.json"), "--table", str(out / "search.md"),
                       "--plot", str(out / "search.png"), "--example-plot", str(out / "example.png")])
    study = json.loads((out / "search.json").read_text())
    for n in ("1000", "2000"):
        q = study["queries"][n]
        assert {"exact_ms", "limit_ms", "compressed_ms"} <= set(q) and set(q["full_ms"]) == {"10", "5000"}
    assert study["quality"]["max_abs_diff"] == 0 and study["quality"]["max_abs_diff_evaluate_file"] == 0
    assert set(study["quality"]["losses"]) == {"ce", "batch_ce"} and set(study["quality"]["runs"]) == set(RUNS)
    assert study["build"]["single"]["images"] == 60 and "ray" not in study["build"]
    assert [e["run"] for e in study["example"]] == ["ce-s0", "batch_ce-s0"]
    assert study["goals"]["n"] == 2000 and study["goals"]["k"] == 5000 and study["goals"]["quality_within_1e-6"]
    assert (out / "search.png").stat().st_size > 0 and (out / "example.png").stat().st_size > 0
    assert "| 2,000 |" in (out / "search.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "params.yaml"], "the indexes were left behind"


def test_a_missing_run_or_empty_exports_folder_is_refused_by_name(pipeline_outputs, tmp_path):
    with pytest.raises(ConfigError, match="no export 'nce-s0' in .* it has batch_ce-s0, ce-s0"):
        search_bench.exports_in(pipeline_outputs / "exports", None, ["nce-s0"])
    with pytest.raises(ConfigError, match="holds no export .* run `make run` first"):
        search_bench.exports_in(tmp_path, None, [])


def study_of(quality_file_diff: float | None) -> dict:
    """A study as pipeline.search_bench makes it, with chosen figures."""
    q = {"n": 10**6, "d": 1024, "exact_ms": 400.0, "exact_p99_ms": 450.0, "exact_qps": 2.5, "limit_ms": 350.0,
         "exact_vs_limit": 1.14, "compressed_ms": 300.0, "compressed_p99_ms": 320.0, "compressed_qps": 3.3,
         "compressed_recall": 0.97, "full_ms": {"10": 500.0, "400000": 7.0e6},
         "full_extrapolated": {"10": False, "400000": True}, "full_vs_exact": {"10": 1.25, "400000": 17500.0},
         "predicted_full_vs_exact": {"10": 1.0, "400000": 20000.0}, "gbps": [11.7], "gemm_gflops": [120.0]}
    example = {"run": "ce-s0", "class_id": 6, "class_name": "Shirt", "recall_target": 0.9, "threshold": 1.5,
               "found": 2000, "right": 900, "positives": 1000, "best": [0, 1], "best_right": [True, False],
               "last": [2], "last_right": [False]}
    return {"machine": {"cpu": "a CPU", "cores": 2, "memory_gb": 23.0, "load_average": [1.0, 1.0, 1.0],
                        "faiss": "1.15", "numpy": "2.4", "onnxruntime": "1.25"},
            "bandwidth": {"method": "onnxruntime's GEMV"},
            "settings": {"run": "ce-s0", "d": 1024, "found": 0.001, "full_rows": 4096, "slice_images": 4096,
                         "slice_rows": 4096, "rounds": 6, "repeats": 90, "warmup": 5, "faiss_threads": 2,
                         "split": "test", "data": "data/prepared", "batch_size": 256, "quality_classes": 1000,
                         "thresholds_test": "results/thresholds_test.json", "example_plot": "docs/search_example.png"},
            "queries": {"1000000": q, "10000": {**copy.deepcopy(q), "exact_ms": 4.0}}, "gemm_gflops": 120.0,
            "build": {"single": {"images": 10000, "wall_s": 2.0, "images_per_s": 5000.0, "threads": 2},
                      "ray": {"images": 10000, "wall_s": 10.0, "images_per_s": 1000.0, "threads": 1},
                      "ray_init_s": 3.0, "same_index": True},
            "quality": {"max_abs_diff": 0.0, "losses": {"ce": {"runs": ["ce-s0"], "max_abs_diff": 0.0,
                                                               "max_abs_diff_evaluate_file": quality_file_diff}}},
            "example": [example, {**example, "run": "batch_ce-s0", "found": 1100, "right": 905}],
            "goals": search.goals({"1000000": q}, 0.0)}


def row(text: str, first: str, table: int = 0) -> list[str]:
    """The cells of the `table`-th Markdown table row of `text` whose first cell is `first`."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return [cells for cells in rows if cells[0] == first][table]


def test_the_report_puts_each_figure_beside_its_limit_and_says_what_is_extrapolated():
    text = report_markdown(study_of(None))
    assert text.index("| 10,000 ") < text.index("| 1,000,000 ")
    assert row(text, "1,000,000") == ["1,000,000", "400 (450)", "2.50", "350", "x1.14", "300 (320)", "3.30", "0.970"]
    assert row(text, "10,000")[1] == "4.00 (450)"
    assert row(text, "1,000,000", 1) == ["1,000,000", "500", "7,000,000 *", "x1.25 (x1.00)", "x17,500 (x20,000)"]
    assert row(text, "ce")[2:] == ["0", "not compared"] and "the two indexes are equal" in text
    assert row(text, "ce-s0") == ["ce-s0", "1.500", "2,000", "900", "0.450", "0.900"] and "class 6 (Shirt)" in text
    assert row(text, "ray") == ["ray", "10,000", "10.00", "1,000", "1 per actor"]
    assert "(goal >= k/20 = x20,000): x17,500; physics predicts x20,000" in text
    assert row(report_markdown(study_of(0.0012)), "ce")[3] == "1.2e-03"


def test_the_outputs_and_the_example_picture_are_written(tmp_path):
    study = study_of(0.0)
    write_outputs(study, tmp_path / "m.json", tmp_path / "r.md", tmp_path / "p.png")
    assert json.loads((tmp_path / "m.json").read_text())["goals"]["slc_at_least_k_over_20_faster"] is False
    write_example(study["example"], np.zeros((3, 1, 8, 8), np.uint8), tmp_path / "example.png")
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("p.png", "example.png"))


def test_the_example_class_is_the_one_searched_least_precisely():
    runs = [{"precision": {"0.9": {0: 0.9, 1: 0.5, 2: np.nan}}}, {"precision": {"0.9": {0: 0.8, 1: 0.7, 2: np.nan}}}]
    assert search_quality.hardest_class(runs, "0.9") == 1


@pytest.mark.slow
def test_the_ray_build_is_timed_apart_from_rays_start_and_builds_the_same_index(pipeline_outputs, split, tmp_path):
    pytest.importorskip("ray")
    builds = search.time_builds(pipeline_outputs / "exports" / "ce-s0", split[0], tmp_path / "build", threads=1,
                                batch_size=64, ray=True)
    assert builds["same_index"] and builds["ray"]["images"] == builds["single"]["images"] == 200
    assert builds["ray_init_s"] > 0 and builds["ray"]["threads"] == 1
