"""The evaluate stage: thresholds from validation, the PoLS table, plots DVC reads, MLflow logging."""
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import evaluate as stage
from slc.core.config import RunConfig
from slc.core.records import RecordError, read_trials
from slc.data.preparation import prepare
from slc.data.prepared import PreparedData, renormalisation
from slc.evaluate import evaluation
from slc.evaluate.metrics import slc_metrics
from slc.evaluate.scoring import Head
from slc.nn.trained import save_trained, trained_info
from slc.train.training import train_one
from tests.conftest import shrunken

REAL = Path("data/prepared")
RECALLS = [0.9, 0.99]


# ---------- fast: the numbers, on hand-made logits ----------

def separable_logits(labels: np.ndarray, k: int, overlap: bool, seed: int = 0) -> np.ndarray:
    """True logits around 5, false ones around 0; with `overlap`, a per-example shift blurs the
    two (what CE allows), without it every true logit beats every false one (PoLS)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 0.3, size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += 5
    if overlap:
        logits += rng.normal(0, 4, size=(len(labels), 1))
    return logits.astype(np.float32)


def from_logits(val: np.ndarray, val_labels, test: np.ndarray, test_labels, hist_bins: int = 20,
                classes=None) -> evaluation.RunResult:
    """evaluate_features on logits given as features with an identity head (x * 1 + 0 is exact)."""
    k = val.shape[1]
    return evaluation.evaluate_features(torch.from_numpy(val), val_labels, torch.from_numpy(test), test_labels,
                                        Head(torch.eye(k), torch.zeros(k)), classes, RECALLS, hist_bins)


def test_thresholds_are_chosen_on_validation_and_measured_on_test():
    val_labels, test_labels = np.arange(40) % 4, np.arange(80) % 4
    val, test = separable_logits(val_labels, 4, True, 1), separable_logits(test_labels, 4, True, 2)
    result = from_logits(val, val_labels, test, test_labels, hist_bins=10)
    expected = slc_metrics(val, val_labels, RECALLS)["threshold_at_recall_0.9"]
    np.testing.assert_array_equal(result.thresholds["0.9"], expected)
    positives = test[np.arange(80), test_labels][test_labels == 0]
    assert result.thresholds_test["0.9"]["recall"][0] == pytest.approx(np.mean(positives >= expected[0]))
    assert result.metrics["1-auprc"] == pytest.approx(1 - slc_metrics(test, test_labels)["mean_auprc"])


def test_pols_aligned_losses_beat_the_others_when_their_logits_separate():
    labels = np.arange(200) % 5
    results, losses = {}, {}
    for loss, overlap in (("ce", True), ("bce", False), ("batch_ce", False)):
        for seed in (0, 1):
            run = f"{loss}-s{seed}"
            logits = separable_logits(labels, 5, overlap, seed)
            results[run] = from_logits(logits, labels, logits, labels)
            losses.setdefault(loss, []).append(run)
    slc = evaluation.summarise_runs(results, losses, RECALLS)
    assert slc["summary"]["1-auprc"]["pols"] == 0.0 < slc["summary"]["1-auprc"]["non_pols"]
    assert slc["summary"]["1-p_at_0.99"]["relative_improvement"] == 1.0
    assert slc["losses"]["ce"]["seeds"] == 2 and slc["losses"]["ce"]["1-auprc_std"] > 0
    assert set(slc["runs"]) == set(results)


def test_no_summary_without_both_kinds_of_loss():
    labels = np.arange(50) % 5
    logits = separable_logits(labels, 5, True)
    results = {"ce-s0": from_logits(logits, labels, logits, labels)}
    assert evaluation.summarise_runs(results, {"ce": ["ce-s0"]}, RECALLS)["summary"] == {}


def test_renormalisation_gives_the_models_inputs():
    pixels = torch.rand(4, 3, 2, 2)
    data = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.4, 0.3]}
    model = {"mean": [0.3, 0.2, 0.1], "std": [0.2, 0.3, 0.4]}
    as_tensor = lambda norm, key: torch.tensor(norm[key])[:, None, None]
    scale, shift = renormalisation(data, model)
    seen = (pixels - as_tensor(data, "mean")) / as_tensor(data, "std") * scale + shift
    wanted = (pixels - as_tensor(model, "mean")) / as_tensor(model, "std")
    torch.testing.assert_close(seen, wanted)


def test_trials_with_an_unknown_status_are_refused(tmp_path):
    path = tmp_path / "trials.json"
    path.write_text(json.dumps([{"run_name": "ce-s0", "loss": "ce", "seed": 0, "status": "running"}]))
    with pytest.raises(RecordError, match="status"):
        read_trials(path)


# ---------- slow: the stage on a tiny grid trained on real Fashion-MNIST ----------

def subset_prepared(src: Path, dst: Path, sizes: dict[str, int]) -> Path:
    """The first `sizes[split]` images of each split of a prepared dataset, same meta otherwise."""
    dst.mkdir(parents=True)
    meta = json.loads((src / "meta.json").read_text())
    for split, n in sizes.items():
        for kind in ("images", "labels"):
            np.save(dst / f"{split}_{kind}.npy", np.load(src / f"{split}_{kind}.npy", mmap_mode="r")[:n])
    meta["splits"] = dict(sizes)
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def grid(tmp_path_factory, params):
    """ce (2 seeds), bce, batch_ce: 1 epoch on 600 images, plus one failed nce trial."""
    root = tmp_path_factory.mktemp("grid")
    real = REAL
    if not (REAL / "meta.json").exists():  # a fresh clone: prepare the real Fashion-MNIST here
        real = root / "full"
        prepare(params.data, real)
    data = PreparedData(subset_prepared(real, root / "prepared", {"train": 600, "val": 300, "test": 1000}))
    tiny = shrunken(params, root)
    model, train = tiny.model, tiny.train
    trials = []
    for loss, seed in (("ce", 0), ("ce", 1), ("bce", 0), ("batch_ce", 0)):
        config = RunConfig(loss, seed, model, train)
        result = train_one(config, data, root / "work" / config.run_name, progress=False)
        save_trained(result.model, root / "models" / config.run_name, trained_info(config, data))
        trials.append({"run_name": config.run_name, "loss": loss, "seed": seed, "status": "finished",
                       "mlflow_run_id": None, "wall_time_s": result.wall_s, "samples_per_s": 0.0,
                       "epochs": 1, "error": None, "model_dir": f"models/{config.run_name}"})
    trials.append({"run_name": "nce-s0", "loss": "nce", "seed": 0, "status": "failed", "mlflow_run_id": None,
                   "wall_time_s": 0.1, "samples_per_s": None, "epochs": 0,
                   "error": "Traceback ...\nNonFiniteLoss: loss became nan", "model_dir": None})
    return root, data, trials


def write_trials(out: Path, trials: list[dict]) -> Path:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "trials.json").write_text(json.dumps(trials))
    return out / "results" / "trials.json"


def run_cli(root: Path, trials: list[dict], data: Path, out: Path, *extra: str) -> Path:
    """The stage as dvc.yaml runs it: `python -m pipeline.evaluate` with every path given."""
    stage.main(["--trials", str(write_trials(out, trials)), "--models", str(root / "models"),
                "--data", str(data), "--metrics", str(out / "metrics/slc.json"),
                "--table", str(out / "results/table1.md"), "--thresholds", str(out / "results/thresholds.json"),
                "--thresholds-test", str(out / "results/thresholds_test.json"),
                "--plots", str(out / "plots"), *extra])
    return out


def run_direct(root: Path, trials: list[dict], data: Path, out: Path, params) -> dict:
    outputs = evaluation.Outputs(out / "slc.json", out / "table1.md", out / "thresholds.json",
                            out / "thresholds_test.json", out / "plots")
    return evaluation.evaluate(write_trials(out, trials), root / "models", data, params.evaluate, outputs)["slc"]


DVC_YAML = """\
metrics:
  - metrics/slc.json
plots:
  - plots/pr_curves:
      x: recall
      y: precision
  - plots/logit_hist:
      x: logit
      y: [true_logits, false_logits]
  - plots/pr_curves.png
  - plots/logit_hist.png
"""


@pytest.mark.slow
def test_the_stage_writes_every_file_and_dvc_reads_them(grid, tmp_path, monkeypatch, capsys):
    from dvc.cli import main as dvc_main

    root, data, trials = grid
    out = tmp_path / "repo"
    out.mkdir()
    run_cli(root, trials, data.root, out, "--no-mlflow")
    subprocess.run(["git", "init", "-q"], cwd=out, check=True)
    monkeypatch.chdir(out)
    assert dvc_main(["init", "-q"]) == 0
    (out / "dvc.yaml").write_text(DVC_YAML)

    slc = json.loads((out / "metrics/slc.json").read_text())
    assert set(slc["losses"]) == {"ce", "bce", "batch_ce"} and "nce-s0" not in slc["runs"]
    assert set(slc["summary"]) == {"1-auprc", "1-p_at_0.9", "1-p_at_0.99"}
    thresholds = json.loads((out / "results/thresholds.json").read_text())
    assert set(thresholds) == {"ce-s0", "ce-s1", "bce-s0", "batch_ce-s0"}
    assert all(len(thresholds[run][key]) == 10 for run in thresholds for key in ("0.9", "0.99"))
    table = (out / "results/table1.md").read_text()
    assert "| **relative improvement** |" in table and "paper MNIST" in table
    assert "| nce-s0 | NonFiniteLoss: loss became nan |" in table
    for loss in ("ce", "bce", "batch_ce"):
        assert (out / "plots/pr_curves" / f"{loss}.json").exists()
        assert (out / "plots/logit_hist" / f"{loss}.json").exists()

    def dvc(*args: str) -> dict:  # in-process: a dvc subprocess costs seconds of imports
        capsys.readouterr()
        assert dvc_main([*args, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    (workspace,) = dvc("metrics", "show").values()  # keyed "" while the repo has no commit
    shown = workspace["data"]["metrics/slc.json"]["data"]
    assert shown["summary"]["1-auprc"]["pols"] == pytest.approx(slc["summary"]["1-auprc"]["pols"])
    plots = dvc("plots", "show")
    assert not plots.get("errors")
    assert {"plots/pr_curves/bce.json", "plots/logit_hist/ce.json", "plots/pr_curves.png"} <= set(plots["data"])


@pytest.mark.slow
def test_metrics_reach_each_trials_mlflow_run(grid, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    root, data, trials = grid
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("slc-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="bce-s0").info.run_id
    trials = [{**t, "mlflow_run_id": run_id if t["run_name"] == "bce-s0" else None} for t in trials]
    out = run_cli(root, trials, data.root, tmp_path / "out")

    logged = client.get_run(run_id).data.metrics
    slc = json.loads((out / "metrics/slc.json").read_text())
    assert logged["evaluate/1-auprc"] == pytest.approx(slc["runs"]["bce-s0"]["1-auprc"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    assert {"evaluate/table1.md", "evaluate/slc.json", "evaluate/pr_curves.png",
            "evaluate/thresholds.json"} <= artifacts


@pytest.mark.slow
def test_other_data_with_the_same_classes_gives_the_same_test_errors(grid, tmp_path, params):
    """Same test images as an npz dataset: its own normalisation, yet the models see the same inputs."""
    root, data, trials = grid
    test = data.split("test")
    npz = tmp_path / "other.npz"
    val = data.split("val")  # other training images, so the npz gets a normalisation of its own
    np.savez(npz, x_train=np.asarray(val.stored.images[:, 0]), y_train=val.labels,
             x_test=np.asarray(test.stored.images[:, 0]), y_test=test.labels, class_names=np.array(data.class_names))
    cfg = dataclasses.replace(params.data, name="npz", npz_path=str(npz), train_limit=None)
    meta = prepare(cfg, tmp_path / "other")
    assert meta["normalisation"] != data.meta["normalisation"]

    ours = run_direct(root, trials, data.root, tmp_path / "ours", params)["runs"]
    theirs = run_direct(root, trials, tmp_path / "other", tmp_path / "theirs", params)["runs"]
    for run, metrics in ours.items():
        for name in ("1-auprc", "1-p_at_0.9", "1-p_at_0.99", "accuracy"):
            assert theirs[run][name] == pytest.approx(metrics[name], abs=1e-6)


@pytest.mark.slow
def test_data_with_other_classes_is_refused_with_the_names(grid, tmp_path, params):
    root, data, trials = grid
    other = tmp_path / "other"
    shutil.copytree(data.root, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["class_names"][3] = "Gown"
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(evaluation.EvaluateError, match=r"first difference at class 3.*same classes"):
        run_direct(root, trials, other, tmp_path / "out", params)


def test_over_a_sample_of_classes_every_class_still_gets_a_threshold_and_its_test_recall():
    rng = np.random.default_rng(5)
    val_labels, test_labels = np.arange(300) % 30, rng.integers(0, 30, 300)
    val, test = separable_logits(val_labels, 30, True, 1), separable_logits(test_labels, 30, True, 2)
    every = from_logits(val, val_labels, test, test_labels)
    classes = np.array([2, 3, 17])
    sample = from_logits(val, val_labels, test, test_labels, classes=classes)
    assert sample.thresholds == every.thresholds  # from validation positives only
    for key in ("0.9", "0.99"):
        precision = np.array(sample.thresholds_test[key]["precision"], dtype=float)
        np.testing.assert_array_equal(precision[classes], np.array(every.thresholds_test[key]["precision"])[classes])
        assert np.isnan(np.delete(precision, classes)).all()  # needs every image's logit: only sampled classes
        np.testing.assert_array_equal(sample.thresholds_test[key]["recall"], every.thresholds_test[key]["recall"])
    auprc = 1 - slc_metrics(test, test_labels)["auprc"][classes].mean()
    assert sample.metrics["1-auprc"] == pytest.approx(auprc)
