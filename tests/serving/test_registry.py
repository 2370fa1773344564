"""The MLflow Model Registry, both ends, on a real sqlite store: the export stage registers the best
run's export under an alias (slc.export.model_registry), and `slc serve models:/<name>@<alias>` (serving.registry)
downloads it and answers exactly as the export directory does. What cannot be resolved (an
unknown model, alias or version, a registry that is not there) is refused before anything is served."""
import dataclasses
import json
import sys

import httpx
import mlflow
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from mlflow import MlflowClient

import serving.registry
from serving import cli
from serving.errors import ExportError, SetupError
from serving.loadtest import Server, free_port
from serving.model import SingleLogitModel
from serving.registry import download
from serving.signing import DIGEST_TAG, manifest_digest
from slc.core.records import TrialRecord
from slc.export.model_registry import register_best
from tests.conftest import repo_params
from tests.serving.conftest import edit_manifest, png, upload

EXPORT = dataclasses.replace(repo_params().export, registered_model="slc", registered_alias="champion")


def register(uri, exports, tmp_path, errors: dict[str, float], trials=()):
    """register_best as the export stage calls it, with evaluate's 1-AUPRC per run."""
    metrics = tmp_path / "slc.json"
    metrics.write_text(json.dumps({"runs": {run: {"1-auprc": error} for run, error in errors.items()}}))
    return register_best(uri, "slc-test", EXPORT, metrics, exports, list(trials))


@pytest.fixture(scope="module")
def store(tmp_path_factory, exports) -> str:
    """A registry where version 1 of `slc`, alias champion, is ce-s0's export (the lower 1-AUPRC)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    register(uri, exports, root, {"ce-s0": 0.1, "bce-s1": 0.3, "nce-s0": 0.01})  # nce-s0 was not exported
    return uri


@pytest.fixture
def registry(store, monkeypatch, tmp_path) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where `slc serve` keeps what it downloads
    return store


def test_the_champion_is_the_best_exports_files_and_scores_as_the_export(registry, export_dir, tmp_path, pixels):
    path = download("models:/slc@champion", tmp_path / "champion")
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in export_dir.iterdir())
    served, exported = SingleLogitModel.load(path), SingleLogitModel.load(export_dir)
    assert served.run_name == "ce-s0" and served.manifest == exported.manifest
    for class_id in (0, 4):
        np.testing.assert_array_equal(served.score(pixels, class_id), exported.score(pixels, class_id))


def test_a_version_number_resolves_too(registry, tmp_path):
    assert SingleLogitModel.load(download("models:/slc/1", tmp_path / "v1")).run_name == "ce-s0"


def test_a_later_start_takes_the_files_from_the_cache_without_downloading(registry, tmp_path, monkeypatch):
    first = download("models:/slc@champion")
    assert first.parent == tmp_path / "cache" / "slc" / "registry" and first.name.startswith("slc-v1-")
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda *a, **k: pytest.fail("downloaded again"))
    assert download("models:/slc/1") == first and sorted(p.name for p in first.parent.iterdir()) == [first.name]


def test_the_version_is_a_logged_model_of_the_trials_run(exports, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("slc-test")).info.run_id
    trials = [TrialRecord(run_name="ce-s0", loss="ce", seed=0, status="finished", mlflow_run_id=run_id)]
    version = register(uri, exports, tmp_path, {"ce-s0": 0.1}, trials)
    assert version.run_id == run_id and version.tags["run_name"] == "ce-s0"
    (model,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])  # the experiment's Models tab
    assert model.source_run_id == run_id and model.name == "ce-s0" and version.source == model.artifact_location


def test_registering_again_makes_a_new_version_and_moves_the_alias(exports, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    register(uri, exports, tmp_path, {"ce-s0": 0.1, "bce-s1": 0.3})
    assert int(register(uri, exports, tmp_path, {"ce-s0": 0.4, "bce-s1": 0.3}).version) == 2
    assert SingleLogitModel.load(download("models:/slc@champion", tmp_path / "now")).run_name == "bce-s1"
    assert SingleLogitModel.load(download("models:/slc/1", tmp_path / "before")).run_name == "ce-s0"


def test_a_registry_that_fails_is_a_warning_and_not_a_lost_export(exports, tmp_path):
    (tmp_path / "file").write_text("")  # a store that cannot be created: its directory would be a file
    with pytest.warns(UserWarning, match=r"could not register ce-s0's export as slc@champion .*"
                                         r"`dvc repro --force export` registers it again"):
        assert register(f"sqlite:///{tmp_path}/file/mlflow.db", exports, tmp_path, {"ce-s0": 0.1}) is None


@pytest.mark.parametrize("source, message", [
    ("models:/slc@staging", r"registered model 'slc' has no alias 'staging'; its aliases: @champion \(version 1\); "
                            r"its versions: 1 \(serve models:/slc/<version>, or set the alias\)"),
    ("models:/slc/7", r"registered model 'slc' has no version 7; its versions: 1; its aliases: @champion"),
    ("models:/slx@champion", r"the MLflow registry at sqlite:///.*mlflow.db has no registered model 'slx'; "
                             r"it has 'slc' \(the export stage registers one when export.registered_model is set"),
])
def test_what_the_registry_does_not_hold_is_refused_naming_what_it_holds(registry, tmp_path, source, message):
    with pytest.raises(ExportError, match=message):
        download(source, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_an_unreachable_registry_is_refused_with_its_address(monkeypatch, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ExportError, match=rf"cannot reach the MLflow registry at {uri} \(.*refused.*\): start it"):
        download("models:/slc@champion")


def test_a_missing_sqlite_store_is_refused_and_not_created(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ExportError, match=r"no MLflow store at sqlite:///.*mlflow.db: run from the repository root"):
        download("models:/slc@champion")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("source", ["models:/slc", "models:/slc@", "models:/slc/latest", "models:/a/b@c"])
def test_a_malformed_registry_source_shows_the_two_forms(source):
    with pytest.raises(SetupError, match=r"write models:/<name>@<alias> .* or models:/<name>/<version>"):
        download(source)


def test_without_mlflow_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(SetupError, match=r"needs MLflow, which is not installed: pip install 'slc-pipeline\[registry\]'"):
        download("models:/slc@champion")


@pytest.mark.parametrize("source, code, message", [
    ("models:/slc@staging", 3, "has no alias 'staging'"),
    ("models:/slc", 2, "is not a registry source"),
])
def test_slc_serve_refuses_what_it_cannot_resolve_before_serving(registry, monkeypatch, capsys, source, code, message):
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(app))
    assert cli.main(["serve", source]) == code and not served
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_slc_serve_models_champion_answers_over_http_as_the_export(registry, export_dir, pixels):
    exported = SingleLogitModel.load(export_dir)
    with Server("models:/slc@champion") as server:
        response = httpx.post(f"{server.url}/v1/classes/2/score", files=upload(png(pixels[0])), timeout=30)
        runs = httpx.get(f"{server.url}/v1/runs", timeout=30).json()
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["logits"], exported.score(pixels[:1], 2), rtol=1e-6)
    assert runs["default"] == "ce-s0" and [run["run_name"] for run in runs["runs"]] == ["ce-s0"]


def test_the_version_records_its_manifest_s_sha256(registry, export_dir):
    version = MlflowClient(registry).get_model_version("slc", "1")
    assert version.tags[DIGEST_TAG] == manifest_digest(export_dir)


def test_a_threshold_edited_in_the_cache_is_refused_at_the_next_start(registry, capsys):
    cached = download("models:/slc@champion")
    edit_manifest(cached, lambda m: m["thresholds"]["0.99"].__setitem__(1, 9.0))
    with pytest.raises(ExportError, match=r"manifest.json has sha256 .*, the registry records .* for models:/slc@champion "
                                          r"\(version 1\): the copy was changed after download; delete .* to download"):
        download("models:/slc@champion")
    capsys.readouterr()
    assert cli.main(["info", "models:/slc@champion"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("slc info: ") and err.count("\n") == 1, err  # from the cache: no download, one line


def test_a_version_without_the_digest_is_refused(registry):
    MlflowClient(registry).delete_model_version_tag("slc", "1", DIGEST_TAG)
    try:
        with pytest.raises(ExportError, match=r"has no manifest_sha256 tag, .* register it again"):
            download("models:/slc/1")
    finally:
        MlflowClient(registry).set_model_version_tag("slc", "1", DIGEST_TAG, download_digest(registry))


def download_digest(uri) -> str:
    source = MlflowClient(uri).get_model_version("slc", "1").source
    return manifest_digest(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri))


def test_a_signed_export_goes_from_export_to_registry_to_slc_serve_and_a_changed_threshold_is_refused(
        signed_exports, keys, tmp_path, monkeypatch, capsys, pixels):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    register(uri, signed_exports, tmp_path, {"ce-s0": 0.1})
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    assert cli.main(["serve", "models:/slc@champion", "--public-key", str(keys[1])]) == 0
    response = TestClient(apps[0]).post("/v1/classes/2/score", files=upload(png(pixels[0])))
    assert response.status_code == 200, response.text
    expected = SingleLogitModel.load(signed_exports / "ce-s0").score(pixels[:1], 2)
    np.testing.assert_allclose(response.json()["logits"], expected, rtol=1e-6)
    cached = download("models:/slc@champion")
    edit_manifest(cached, lambda m: m["thresholds"]["0.99"].__setitem__(1, 9.0))
    monkeypatch.setattr(serving.registry, "check_manifest_digest", lambda *args: None)  # the signature alone refuses it
    capsys.readouterr()
    assert cli.main(["serve", "models:/slc@champion", "--public-key", str(keys[1])]) == 3 and len(apps) == 1
    assert "changed manifest.json" in capsys.readouterr().err
