"""`models:/<name>@<alias>` and `models:/<name>/<version>`: an export from the MLflow Model Registry.

The export stage registers the best run's export directory (manifest and ONNX files) as a model
version (slc.export.model_registry), so a version's files are an export like exports/<run>/: downloaded, they
load with the same checks, every file's sha256 included, after their manifest is checked against
the sha256 the version records (serving.signing), on every start, from the cache too. The registry is the one any MLflow client
finds: MLFLOW_TRACKING_URI (or MLFLOW_REGISTRY_URI), else ./mlflow.db, the pipeline's store when
run from the repository root. Only such a source needs MLflow, so it is imported late, and what
cannot be resolved is refused before anything is served.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from serving.errors import ExportError, SetupError
from serving.manifest import MANIFEST
from serving.signing import DIGEST_TAG, check_manifest_digest

PREFIX = "models:/"
SOURCE = re.compile(rf"{PREFIX}(?P<name>[^/@:']+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")
REACH_TIMEOUT_S = 10  # an unreachable server is refused after this, not after MLflow's minutes of retries


def resolve(source: str | Path) -> str | Path:
    """A `models:/` source as the local directory of its export; any other source unchanged."""
    return download(str(source)) if str(source).startswith(PREFIX) else source


def download(source: str, cache: Path | None = None) -> Path:
    """The registered export `source` names, as a directory of `cache` (default: cache_dir()).
    A version's files never change, so a later start finds them there instead of downloading again;
    a registry made anew numbers its versions again, so the directory is named after where the
    version's files are stored too."""
    match = SOURCE.fullmatch(source)
    if match is None:
        raise SetupError(f"{source!r} is not a registry source: write models:/<name>@<alias> (e.g. "
                         f"models:/slc@champion) or models:/<name>/<version> (e.g. models:/slc/3)")
    mlflow = _mlflow()
    uri = registry_uri()
    _check_reachable(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = match["name"]
    version = client.get_model_version(name, _version(client, uri, name, match["alias"], match["version"]))
    cache = cache_dir() if cache is None else Path(cache)
    target = cache / f"{name}-v{version.version}-{hashlib.sha256(version.source.encode()).hexdigest()[:12]}"
    if not (target / MANIFEST).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))  # renamed when complete
        try:
            # from where the version's files are (not models:/..., which MLflow resolves in its global store)
            files = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(partial),
                                                        tracking_uri=uri)
            os.replace(files, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    # the cache is reused once a manifest is there: the registry's digest says whether it is still the one registered
    check_manifest_digest(target, version.tags.get(DIGEST_TAG), f"{source} (version {version.version})")
    return target


def registry_uri() -> str:
    """MLFLOW_REGISTRY_URI, else MLFLOW_TRACKING_URI, else MLflow's default store ./mlflow.db: read from
    the environment, not from MLflow's process-wide setting, which code run before may have changed."""
    return os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def cache_dir() -> Path:
    """Where registered exports are kept: $XDG_CACHE_HOME/slc/registry (~/.cache/...); delete it to free the space."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slc" / "registry"


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise SetupError("serving a models:/ source needs MLflow, which is not installed: "
                         "pip install 'slc-pipeline[registry]' (or mlflow)") from None
    return mlflow


def _check_reachable(uri: str) -> None:
    """A server that does not answer, or a sqlite store that is not there (MLflow would create an
    empty one), is refused with its address."""
    hint = "set MLFLOW_TRACKING_URI to the registry the export stage registered into"
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACH_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: reachable (the MLflow calls say whether it lets us in)
        except (urllib.error.URLError, OSError) as error:
            raise ExportError(f"cannot reach the MLflow registry at {uri} ({getattr(error, 'reason', error)}): "
                              f"start it, or {hint}") from None
    elif uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ExportError(f"no MLflow store at {uri}: run from the repository root (its mlflow.db), or {hint}")


def _version(client, uri: str, name: str, alias: str | None, version: str | None) -> str:
    """The version `alias` points to, or `version` once it is known to exist."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ExportError(f"cannot read the MLflow registry at {uri}: {error.message}") from None
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise ExportError(f"the MLflow registry at {uri} has no registered model {name!r}; it has "
                          f"{', '.join(map(repr, known)) or 'none'} (the export stage registers one when "
                          f"export.registered_model is set in params.yaml)") from None
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    aliases = ", ".join(f"@{a} (version {v})" for a, v in sorted(model.aliases.items())) or "none"
    if alias is not None and alias not in model.aliases:
        raise ExportError(f"registered model {name!r} has no alias {alias!r}; its aliases: {aliases}; its versions: "
                          f"{', '.join(versions) or 'none'} (serve models:/{name}/<version>, or set the alias)")
    if version is not None and version not in versions:
        raise ExportError(f"registered model {name!r} has no version {version}; its versions: "
                          f"{', '.join(versions) or 'none'}; its aliases: {aliases}")
    return str(model.aliases[alias]) if alias is not None else version
