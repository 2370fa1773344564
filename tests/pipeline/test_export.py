"""The export stage: single-logit ONNX files that match PyTorch, share weights, and refuse tampering."""
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pipeline import export as stage
from serving.errors import ExportError
from serving.manifest import SIGNATURE, read_manifest
from serving.registry import download
from serving.signing import SIGNING_KEY_ENV
from slc.core.config import ModelConfig
from slc.core.errors import ConfigError
from slc.core.sampling import seeded_sample
from slc.data.preparation import prepare
from slc.export import exporting, verify
from slc.export.exporting import export_model, export_runs
from slc.export.onnx_graphs import SyntheticRows, write_single_logit
from slc.nn.models import build_model
from slc.nn.trained import save_trained
from tests.conftest import write_params
from tests.formats import write_idx_gz

K = 5
# One of each kind of network: the paper's two and a torchvision one (squeezenet: its head is
# built by surgery, and FitInput upsamples and repeats channels inside the graph), and a cosine head
# (its normalisation in the backbone's graph, its scaled unit rows in the head's).
NETWORKS = {"mlp": (ModelConfig("mlp", 16, 4, None, "linear", None), (1, 12, 12)),
            "mlp_cosine": (ModelConfig("mlp", 16, 4, None, "cosine", 7.0), (1, 12, 12)),
            "conv6": (ModelConfig("conv6", 16, 4, None, "linear", None), (1, 8, 8)),
            "squeezenet1_1": (ModelConfig("squeezenet1_1", 16, 4, None, "linear", None), (3, 16, 16))}
MANIFEST_KEYS = {"format_version", "run_name", "loss", "dataset", "class_names", "num_classes", "feature_dim",
                 "input", "normalisation", "opset", "thresholds", "class_id_range", "models", "files",
                 "max_abs_diff"}


def info_for(shape, k=K):
    return {"run_name": "bce-s0", "loss": "bce", "dataset": "tiny", "class_names": [f"c{i}" for i in range(k)],
            "input_shape": list(shape), "normalisation": {"mean": [0.5] * shape[0], "std": [0.25] * shape[0]},
            "pixel_scale": 255.0}


def tiny_model(name="mlp", seed=0):
    cfg, shape = NETWORKS[name]
    torch.manual_seed(seed)
    return build_model(cfg, shape, K).eval(), shape


def images(shape, n=6, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *shape), dtype=np.float32))


THRESHOLDS = {"0.9": [0.5] * K, "0.99": [-1.0] * (K - 1) + [float("nan")]}


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """Each network exported once per module (an export costs seconds), shared by the tests."""
    done = {}

    def get(name):
        if name not in done:
            model, shape = tiny_model(name)
            out = tmp_path_factory.mktemp(name) / "bce-s0"
            done[name] = model, out, export_model(model, out, info_for(shape), THRESHOLDS, images(shape)), shape
        return done[name]
    return get


@pytest.fixture(params=sorted(NETWORKS))
def exported(request, export_of):
    return export_of(request.param)


@pytest.fixture
def mlp_copy(export_of, tmp_path):
    """A copy of the mlp export that a test may damage."""
    return Path(shutil.copytree(export_of("mlp")[1], tmp_path / "bce-s0"))


def run(path, **feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ---------- what an export holds ----------

def test_manifest_follows_the_contract(exported):
    model, out, manifest, shape = exported
    assert set(dataclasses.asdict(manifest)) == MANIFEST_KEYS
    assert json.loads((out / "manifest.json").read_text()) == dataclasses.asdict(manifest)
    assert manifest.num_classes == K and manifest.class_id_range == [0, K - 1]
    assert manifest.feature_dim == model.head.in_features
    assert manifest.input == {"name": "image", "shape": list(shape), "dtype": "float32"}
    assert manifest.normalisation["pixel_scale"] == 255.0
    assert manifest.thresholds["0.99"][-1] is None, "a NaN threshold is written as JSON null"
    assert manifest.models["classes"] == {str(c): f"class_{c}.onnx" for c in range(K)}
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(manifest.files) == on_disk


def test_every_model_matched_pytorch_within_atol_at_export(exported):
    _, out, manifest, _ = exported
    onnx_files = {p.name for p in out.glob("*.onnx")}
    assert set(manifest.max_abs_diff) == onnx_files
    assert all(0 <= diff <= 1e-4 for diff in manifest.max_abs_diff.values())


def test_onnxruntime_reproduces_pytorch_on_new_images(exported):
    model, out, _, shape = exported
    x = images(shape, n=3, seed=7)
    with torch.inference_mode():
        features, logits = model.features(x).numpy(), model(x).numpy()
    class_id = np.array([4, 0, 2])
    np.testing.assert_allclose(run(out / "backbone.onnx", image=x.numpy()), features, atol=1e-4)
    np.testing.assert_allclose(run(out / "model.onnx", image=x.numpy()), logits, atol=1e-4)
    np.testing.assert_allclose(run(out / "single_logit.onnx", image=x.numpy(), class_id=class_id),
                               logits[np.arange(3), class_id], atol=1e-4)
    np.testing.assert_allclose(run(out / "class_3.onnx", image=x.numpy()), logits[:, 3], atol=1e-4)


def test_every_model_passes_the_checker_and_has_a_dynamic_batch(exported):
    _, out, _, _ = exported
    for path in out.glob("*.onnx"):
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
        for value in [*graph.input, *graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{path.name}:{value.name} has a fixed batch"


def external_locations(model):
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def inline_bytes(model):
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if not t.external_data)


def test_class_files_share_the_backbone_weights_and_add_d_plus_1_floats(exported):
    _, out, manifest, _ = exported
    backbone = onnx.load(str(out / "backbone.onnx"), load_external_data=False)
    for name in manifest.models["classes"].values():
        model = onnx.load(str(out / name), load_external_data=False)
        assert external_locations(model) == external_locations(backbone) == {"backbone.weights"}
        assert inline_bytes(model) - inline_bytes(backbone) == 4 * (manifest.feature_dim + 1)


def test_external_data_stays_in_the_export_folder(exported):
    _, out, _, _ = exported
    for path in out.glob("*.onnx"):
        for location in external_locations(onnx.load(str(path), load_external_data=False)):
            assert "/" not in location and ".." not in location and (out / location).is_file()


def test_an_intact_export_passes_read_manifest(exported):
    _, out, manifest, _ = exported
    assert read_manifest(out) == manifest


# ---------- choices and failures of export_model ----------

def test_classes_none_writes_no_class_files_but_single_logit_covers_every_class(tmp_path):
    model, shape = tiny_model()
    manifest = export_model(model, tmp_path / "run", info_for(shape), None, images(shape), classes="none")
    assert manifest.models["classes"] == {} and not list((tmp_path / "run").glob("class_*"))
    assert manifest.thresholds == {} and "single_logit.onnx" in manifest.max_abs_diff


def test_a_list_of_classes_exports_only_those(tmp_path):
    model, shape = tiny_model()
    manifest = export_model(model, tmp_path / "run", info_for(shape), None, images(shape), classes=[3, 1])
    assert manifest.models["classes"] == {"1": "class_1.onnx", "3": "class_3.onnx"}


def test_a_class_id_out_of_range_is_refused_with_the_valid_range(tmp_path):
    model, shape = tiny_model()
    with pytest.raises(ExportError, match=r"\[5\].*\[0, 4\]"):
        export_model(model, tmp_path / "run", info_for(shape), None, images(shape), classes=[0, 5])


def test_thresholds_for_another_number_of_classes_are_refused(tmp_path):
    model, shape = tiny_model()
    with pytest.raises(ExportError, match="3 values, the model has 5 classes"):
        export_model(model, tmp_path / "run", info_for(shape), {"0.9": [0.0] * 3}, images(shape))


def test_info_without_the_normalisation_is_refused(tmp_path):
    model, shape = tiny_model()
    info = {k: v for k, v in info_for(shape).items() if k != "normalisation"}
    with pytest.raises(ExportError, match="lacks normalisation"):
        export_model(model, tmp_path / "run", info, None, images(shape))


def test_a_file_that_disagrees_with_pytorch_fails_naming_it_and_keeps_the_old_export(mlp_copy, monkeypatch):
    model, shape = tiny_model()
    out, before = mlp_copy, (mlp_copy / "manifest.json").read_text()

    def shifted_head(out_dir, weight, bias, **kwargs):
        return write_single_logit(out_dir, weight, bias + 0.01, **kwargs)
    monkeypatch.setattr(exporting, "write_single_logit", shifted_head)
    with pytest.raises(ExportError, match=r"model\.onnx differs from PyTorch by 0\.01 .*verify_atol"):
        export_model(model, out, info_for(shape), None, images(shape), classes="none")
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in out.parent.iterdir()] == [out.name], "temp folder left behind"


def test_the_tolerance_grows_with_the_logits_size_as_in_numpys_allclose(tmp_path, monkeypatch):
    model, shape = tiny_model()
    with torch.no_grad():
        model.head.bias += 1000.0  # logits of about a thousand, as a cosine head's at a large scale

    def shifted_head(out_dir, weight, bias, **kwargs):  # off by 0.005: 5e-6 of a logit, 50x atol
        return write_single_logit(out_dir, weight, bias + 0.005, **kwargs)
    monkeypatch.setattr(exporting, "write_single_logit", shifted_head)
    manifest = export_model(model, tmp_path / "ok", info_for(shape), None, images(shape), classes="none",
                            atol=1e-4, rtol=1e-5)
    assert manifest.max_abs_diff["model.onnx"] == pytest.approx(0.005, rel=0.05)
    with pytest.raises(ExportError, match=r"model\.onnx differs from PyTorch by 0\.005 .*verify_rtol = 0 "):
        export_model(model, tmp_path / "refused", info_for(shape), None, images(shape), classes="none", atol=1e-4, rtol=0)


# ---------- read_manifest refuses what was changed ----------

def test_a_truncated_file_is_refused(mlp_copy):
    weights = mlp_copy / "backbone.weights"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ExportError, match=r"backbone\.weights has \d+ bytes, the manifest says \d+"):
        read_manifest(mlp_copy)


def test_a_corrupt_file_of_the_right_size_is_refused(mlp_copy):
    weights = mlp_copy / "head.weights"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"head\.weights has sha256 \w+, the manifest says"):
        read_manifest(mlp_copy)


def test_a_manifest_whose_hash_does_not_match_is_refused(mlp_copy):
    manifest = json.loads((mlp_copy / "manifest.json").read_text())
    manifest["files"]["single_logit.onnx"]["sha256"] = "0" * 64
    (mlp_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"single_logit\.onnx has sha256"):
        read_manifest(mlp_copy)


def test_a_missing_file_is_refused(mlp_copy):
    (mlp_copy / "class_2.onnx").unlink()
    with pytest.raises(ExportError, match=r"class_2\.onnx is missing from the export"):
        read_manifest(mlp_copy)


def test_a_manifest_that_is_not_json_is_refused(mlp_copy):
    (mlp_copy / "manifest.json").write_text('{"format_version": 1, "files": {')
    with pytest.raises(ExportError, match="is not valid JSON"):
        read_manifest(mlp_copy)


# ---------- the stage ----------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, params):
    """Tiny prepared Fashion-MNIST-format data and two saved mlp runs, as train leaves them."""
    root = tmp_path_factory.mktemp("stage")
    write_idx_gz(root / "raw" / "FashionMNIST" / "raw", n_train=40, n_test=12)
    data_cfg = dataclasses.replace(params.data, name="fashion_mnist", root=str(root / "raw"))
    meta = prepare(data_cfg, root / "prepared")
    cfg = ModelConfig("mlp", 8, 4, None, "linear", None)
    for seed in (0, 1):
        torch.manual_seed(seed)
        info = {"run_name": f"bce-s{seed}", "loss": "bce", "seed": seed, "model": dataclasses.asdict(cfg),
                "train": dataclasses.asdict(params.train), "dataset": meta["dataset"],
                "input_shape": meta["input_shape"], "num_classes": 10, "class_names": meta["class_names"],
                "normalisation": meta["normalisation"]}
        save_trained(build_model(cfg, tuple(meta["input_shape"]), 10), root / "models" / f"bce-s{seed}", info)
    (root / "thresholds.json").write_text(json.dumps({f"bce-s{s}": {"0.9": [0.0] * 10} for s in (0, 1)}))
    return root


def stage_config(params, **changes):
    return dataclasses.replace(params.export, **{"classes": [0], "verify_images": 4, **changes})


def test_the_stage_exports_every_run_and_logs_it_to_the_trials_mlflow_run(trained, tmp_path, monkeypatch, params,
                                                                          request):
    import mlflow
    from mlflow import MlflowClient

    write_params(dataclasses.replace(params, export=stage_config(params, classes=[9])), tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # runs:/ below resolves in MLflow's process-wide store, which an earlier test may have set
    previous = mlflow.get_tracking_uri()
    request.addfinalizer(lambda: mlflow.set_tracking_uri(previous))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("slc-test", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment, run_name="bce-s1").info.run_id
    client.set_terminated(run_id, "FINISHED")  # as the train stage leaves it
    trials = [{"run_name": "bce-s0", "mlflow_run_id": None}, {"run_name": "bce-s1", "mlflow_run_id": run_id}]
    (tmp_path / "trials.json").write_text(json.dumps(
        [{**t, "loss": "bce", "seed": i, "status": "finished"} for i, t in enumerate(trials)]))
    (tmp_path / "slc.json").write_text(json.dumps({"runs": {"bce-s0": {"1-auprc": 0.2}, "bce-s1": {"1-auprc": 0.1}}}))
    stage.main(["--params", str(tmp_path / "params.yaml"), "--models", str(trained / "models"),
                "--thresholds", str(trained / "thresholds.json"), "--data", str(trained / "prepared"),
                "--out", str(tmp_path / "exports"), "--trials", str(tmp_path / "trials.json"),
                "--metrics", str(tmp_path / "export.json"), "--evaluation", str(tmp_path / "slc.json")])
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == ["bce-s0", "bce-s1"]

    # what each export cost, for scaling studies: every byte on disk, the manifest's too
    costs = json.loads((tmp_path / "export.json").read_text())
    for run in ("bce-s0", "bce-s1"):
        on_disk = list((tmp_path / "exports" / run).iterdir())
        assert costs["runs"][run]["bytes"] == sum(p.stat().st_size for p in on_disk)
        assert costs["runs"][run]["files"] == len(on_disk) and costs["runs"][run]["class_files"] == 1
        assert costs["runs"][run]["wall_s"] > 0 and costs["runs"][run]["peak_rss_gb"] > 0
    assert costs["bytes"] == sum(c["bytes"] for c in costs["runs"].values())
    manifest = read_manifest(tmp_path / "exports" / "bce-s1")
    assert manifest.run_name == "bce-s1" and manifest.thresholds == {"0.9": [0.0] * 10}
    assert manifest.normalisation["pixel_scale"] == 255.0 and list(manifest.models["classes"]) == ["9"]

    # the run's MLflow entry: both models load back as pyfuncs and answer as onnxruntime does
    assert "export/manifest.json" in {a.path for a in client.list_artifacts(run_id, "export")}
    images = np.random.default_rng(0).normal(size=(3, 1, 28, 28)).astype(np.float32)
    ids = np.array([9, 0, 4], dtype=np.int64)
    export = tmp_path / "exports" / "bce-s1"
    full = ort.InferenceSession(str(export / "model.onnx")).run(None, {"image": images})[0]
    single = mlflow.pyfunc.load_model(f"runs:/{run_id}/onnx_single_logit")
    assert [i.name for i in single.metadata.get_input_schema().inputs] == ["image", "class_id"]
    np.testing.assert_allclose(single.predict({"image": images, "class_id": ids})["logit"],
                               full[np.arange(3), ids], atol=1e-5)
    logged_full = mlflow.pyfunc.load_model(f"runs:/{run_id}/onnx_model")
    np.testing.assert_allclose(logged_full.predict({"image": images})["logits"], full, atol=1e-5)

    # the best export (bce-s1, the lower 1-AUPRC) is registered: models:/slc@champion holds its files
    name, alias = params.export.registered_model, params.export.registered_alias
    version = client.get_model_version_by_alias(name, alias)
    assert version.tags["run_name"] == "bce-s1" and version.run_id == run_id
    assert read_manifest(download(f"models:/{name}@{alias}", tmp_path / "champion")) == manifest


def test_the_stage_signs_each_export_with_the_key_of_the_environment_or_params(trained, tmp_path, params,
                                                                              monkeypatch):
    from serving.model import SingleLogitModel
    from tests.serving.conftest import write_key_pair

    env_key, env_public = write_key_pair(tmp_path, "env")
    params_key, params_public = write_key_pair(tmp_path, "params")
    monkeypatch.setenv(SIGNING_KEY_ENV, str(env_key))
    config = stage_config(params, runs=["bce-s0"], signing_key=str(params_key))
    export_runs(config, trained / "models", trained / "thresholds.json", trained / "prepared", tmp_path / "env",
                tmp_path / "export.json")
    assert SingleLogitModel.load(tmp_path / "env" / "bce-s0", public_key=env_public).run_name == "bce-s0"
    cost = json.loads((tmp_path / "export.json").read_text())["runs"]["bce-s0"]
    on_disk = list((tmp_path / "env" / "bce-s0").iterdir())
    assert cost["files"] == len(on_disk) and cost["bytes"] == sum(p.stat().st_size for p in on_disk)
    monkeypatch.delenv(SIGNING_KEY_ENV)
    export_runs(config, trained / "models", trained / "thresholds.json", trained / "prepared", tmp_path / "params")
    assert SingleLogitModel.load(tmp_path / "params" / "bce-s0", public_key=params_public).run_name == "bce-s0"
    export_runs(stage_config(params, runs=["bce-s0"]), trained / "models", trained / "thresholds.json",
                trained / "prepared", tmp_path / "unsigned")
    assert not (tmp_path / "unsigned" / "bce-s0" / SIGNATURE).exists()  # no key, no signature: as before


def test_unknown_runs_are_refused_listing_the_available_ones(trained, tmp_path, params):
    with pytest.raises(ExportError, match="ce-s0, not trained; available runs: bce-s0, bce-s1"):
        export_runs(stage_config(params, runs=["ce-s0"]), trained / "models", trained / "thresholds.json",
                    trained / "prepared", tmp_path / "exports")


def test_a_run_without_thresholds_asks_for_evaluate(trained, tmp_path, params):
    (tmp_path / "thresholds.json").write_text(json.dumps({"bce-s0": {"0.9": [0.0] * 10}}))
    with pytest.raises(ExportError, match=r"no thresholds for bce-s1: run `dvc repro evaluate`"):
        export_runs(stage_config(params), trained / "models", tmp_path / "thresholds.json",
                    trained / "prepared", tmp_path / "exports")
    with pytest.raises(ExportError, match=r"not found: run `dvc repro evaluate`"):
        export_runs(stage_config(params), trained / "models", tmp_path / "missing.json",
                    trained / "prepared", tmp_path / "exports")


# ---------- many classes ----------

MANY = 5000


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory, params):
    """A 5,000-class mlp (random weights) exported with params.yaml's export settings."""
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = build_model(ModelConfig("mlp", 16, 4, None, "linear", None), shape, MANY).eval()
    out = tmp_path_factory.mktemp("many") / "bce-s0"
    thresholds = {"0.99": np.linspace(-1, 1, MANY).tolist()}
    manifest = export_model(model, out, info_for(shape, MANY), thresholds, images(shape, n=8),
                            classes=params.export.classes, verify_classes=params.export.verify_classes)
    return model, out, manifest, shape


def test_by_default_a_bounded_seeded_sample_of_classes_gets_its_own_file(many_classes, params):
    _, out, manifest, _ = many_classes
    assert params.export.classes == 32
    assert len(manifest.models["classes"]) == 32 == len(list(out.glob("class_*.onnx")))
    assert list(manifest.models["classes"]) == [str(c) for c in seeded_sample(MANY, 32)]


def test_the_many_class_head_is_on_disk_once_shared_by_both_graphs(many_classes):
    _, out, manifest, _ = many_classes
    head_bytes = 4 * MANY * (16 + 1)
    for name in ("model.onnx", "single_logit.onnx"):
        assert external_locations(onnx.load(str(out / name), load_external_data=False)) == {"backbone.weights",
                                                                                           "head.weights"}
    assert [name for name, f in manifest.files.items() if f["bytes"] >= head_bytes] == ["head.weights"]


def test_a_count_at_or_above_k_gives_every_class_its_file(tmp_path):
    model, shape = tiny_model()
    manifest = export_model(model, tmp_path / "run", info_for(shape), None, images(shape), classes=32)
    assert manifest.models["classes"] == {str(c): f"class_{c}.onnx" for c in range(K)}


def test_single_logit_answers_any_class_of_many_as_pytorch_does(many_classes):
    model, out, _, shape = many_classes
    x = images(shape, n=6, seed=3)
    class_id = np.array([0, MANY - 1, 1, 2500, 4321, 17])
    with torch.inference_mode():
        logits = model(x).numpy()
    np.testing.assert_allclose(run(out / "single_logit.onnx", image=x.numpy(), class_id=class_id),
                               logits[np.arange(6), class_id], atol=1e-5)


def test_verification_asks_single_logit_a_seeded_sample_with_the_first_and_last_class(tmp_path, monkeypatch):
    asked, rounds = [], verify.class_id_rounds

    def recording(n, classes):
        out = rounds(n, classes)
        asked.extend(np.concatenate(out).tolist())
        return out
    monkeypatch.setattr(verify, "class_id_rounds", recording)
    torch.manual_seed(0)
    model = build_model(ModelConfig("mlp", 16, 4, None, "linear", None), (1, 8, 8), MANY).eval()
    export_model(model, tmp_path / "run", info_for((1, 8, 8), MANY), None, images((1, 8, 8), n=8), classes="none",
                 verify_classes=10)
    expected = verify.verified_classes(MANY, 10)
    assert sorted(set(asked)) == expected.tolist() and len(expected) == 10
    assert expected[0] == 0 and expected[-1] == MANY - 1
    np.testing.assert_array_equal(verify.verified_classes(MANY, 10), expected)  # the same sample every time
    np.testing.assert_array_equal(verify.verified_classes(7, 10), np.arange(7))


def test_all_classes_beyond_the_cap_are_refused_before_any_file_is_written(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig("mlp", 16, 4, None, "linear", None), (1, 8, 8), MANY).eval()
    with pytest.raises(ExportError, match=r"'all' asks for 5,000 class files: at least 0\.3 MB .*the count 5000 to mean all"):
        export_model(model, tmp_path / "run", info_for((1, 8, 8), MANY), None, images((1, 8, 8)), classes="all")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("changes, key", [({"classes": -1}, "export.classes"),
                                          ({"verify_classes": 1}, "export.verify_classes")])
def test_bad_export_class_settings_are_refused_naming_the_key(params, changes, key):
    with pytest.raises(ConfigError, match=rf"^{key} = "):
        dataclasses.replace(params.export, **changes)


def test_a_many_class_export_loads_in_serving_and_decides_any_class(many_classes):
    from serving.model import SingleLogitModel

    model, out, manifest, shape = many_classes
    served = SingleLogitModel.load(out, providers="CPUExecutionProvider")
    x = images(shape, n=1, seed=5)
    with torch.inference_mode():
        expected = model(x).numpy()[0, [0, 2500, MANY - 1]]
    result = served.classify(x.numpy(), [0, 2500, MANY - 1], recall=0.99)
    np.testing.assert_allclose(result.logits, expected, atol=1e-5)
    np.testing.assert_allclose(result.thresholds, [-1.0, manifest.thresholds["0.99"][2500], 1.0])
    assert not served.thresholds(0.99).flags.writeable  # one array shared by every request


# ---------- scale ----------

@pytest.mark.slow
def test_a_head_over_protobufs_2gb_limit_is_written_and_scored_from_external_data(tmp_path):
    """2048 x 270,000 float32 = 2.2 GB, written in chunks: never one protobuf, never one array."""
    d, k = 2048, 270_000
    rows = SyntheticRows(k, d, seed=0)
    bias = np.linspace(-1, 1, k, dtype=np.float32)
    path = write_single_logit(tmp_path, rows, bias, kinds=("single_logit",))["single_logit"]
    assert (tmp_path / "head.weights").stat().st_size > 2**31 and path.stat().st_size < 10_000
    onnx.checker.check_model(str(path))
    class_id = np.array([0, 1023, 1024, 150_000, k - 1], np.int64)
    features = np.random.default_rng(2).standard_normal((len(class_id), d), dtype=np.float32)
    logit = run(path, features=features, class_id=class_id)
    expected = np.einsum("nd,nd->n", features, rows.rows(class_id)) + bias[class_id]
    np.testing.assert_allclose(logit, expected, rtol=1e-5, atol=1e-5)
