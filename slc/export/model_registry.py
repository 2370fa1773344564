"""Which exported run to deploy, and its hand-off to the MLflow Model Registry.

The best run is the exported run with the lowest mean 1-AUPRC over classes on the test split
(metrics/slc.json's `runs`): the single-logit figure Table 1 ranks the losses by, over every loss,
PoLS-aligned or not, since a deployment wants the best model whatever trained it. It is chosen
on the test split that also reports it, so its figure is the best of several, not a fresh estimate.
`make serve` serves it by default; the export stage registers its export directory (manifest and
ONNX files, as `serving` loads them) as a new version of a registered model and points an alias at
it, so `slc serve models:/<name>@<alias>` (serving.registry) deploys what the pipeline chose.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from serving.signing import DIGEST_TAG, manifest_digest
from slc.core import tracking
from slc.core.config import ExportConfig
from slc.core.errors import PipelineError

log = logging.getLogger(__name__)


class NothingToServeError(PipelineError):
    """No metrics to rank the runs by, or no exported run: the stages before serving have not run."""


def best_run(metrics_path: Path, exports: Path) -> str:
    """The exported run whose single logits rank best (lowest mean 1-AUPRC over classes)."""
    try:
        runs = json.loads(Path(metrics_path).read_text())["runs"]
    except FileNotFoundError:
        raise NothingToServeError(f"{metrics_path} not found, so no run can be chosen to serve: "
                                  f"run the pipeline first (`make run` or `dvc repro`)") from None
    exported = {run: m["1-auprc"] for run, m in runs.items() if (Path(exports) / run / "manifest.json").exists()}
    if not exported:
        raise NothingToServeError(f"no exported run of {metrics_path} under {exports}/ (none has a "
                                  f"manifest.json): run `dvc repro export` first")
    return min(exported, key=exported.get)


def register_best(uri: str, experiment: str, cfg: ExportConfig, metrics_path: Path, exports: Path, trials: list):
    """The best run's export as a new version of `cfg.registered_model`, with `cfg.registered_alias`
    moved to it; returns the ModelVersion. The files are an MLflow 3 logged model of the trial's run
    (the experiment's Models tab), registered from there. As the stage's other MLflow logging, a
    registry that fails is a warning (returning None), never a reason to lose the exports."""
    from mlflow.exceptions import MlflowException

    run = best_run(metrics_path, exports)
    name, alias = cfg.registered_model, cfg.registered_alias
    try:
        client = tracking.mlflow_client(uri)
        run_id = tracking.trial_runs(uri, trials, {run}).get(run)
        model = client.create_logged_model(tracking.experiment_id(uri, experiment), name=run, source_run_id=run_id,
                                           model_type="slc-export", tags={"run_name": run})
        client.log_model_artifacts(model.model_id, str(Path(exports) / run))
        client.finalize_logged_model(model.model_id, "READY")
        try:
            client.create_registered_model(name, description="Single-logit ONNX exports of the SLC pipeline "
                                                              "(`slc serve models:/<name>@<alias>` serves one)")
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # the files' location, not models:/<model id>: MLflow's registry would look that up in the
        # process's global tracking store, not in the one at `uri`
        # the manifest's sha256 on the version: `slc serve models:/...` refuses files whose manifest differs
        version = client.create_model_version(name, model.artifact_location, run_id=run_id,
                                              tags={"run_name": run, DIGEST_TAG: manifest_digest(Path(exports) / run)},
                                              description=f"the export of {run}: the lowest test 1-AUPRC of the "
                                                          f"exported runs in {metrics_path}")
        client.set_registered_model_alias(name, alias, version.version)
    except Exception as error:  # an unreachable server, a store that refuses: report, keep the exports
        warnings.warn(f"could not register {run}'s export as {name}@{alias} in the MLflow registry at {uri}: "
                      f"{error}; the exports are written, `dvc repro --force export` registers it again", stacklevel=2)
        return None
    log.info("registered %s's export as %s version %s, alias %s: `slc serve models:/%s@%s` serves it",
             run, name, version.version, alias, name, alias)
    return version
