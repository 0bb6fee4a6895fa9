"""MLflow tracking from rank 0: params, metrics, artifacts, pictures; one MLflow run per training run.

The default store is a SQLite file in the run directory (no server needed; `mlflow ui
--backend-store-uri sqlite:///<run_dir>/mlflow.db` opens it). `MLFLOW_TRACKING_URI` or
`tracking.uri` point it at a server; credentials go in MLFLOW_TRACKING_USERNAME / _PASSWORD (or
_TOKEN), which MLflow reads itself, and any user:password in a URI is redacted before anything is
logged.

A resumed run continues the same MLflow run (its id is in the checkpoint). Steps between the
checkpoint and the moment the previous attempt died were already logged; they are re-computed
(identically, on CPU) but not logged again, so every metric has each step exactly once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from clmae.config import Config

METRIC_FOR_LAST_STEP = "mae/loss"  # logged at every log step; its last step says where logging stopped
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact_uri(uri: str) -> str:
    """`https://user:secret@host/x` -> `https://***@host/x`."""
    return _USERINFO.sub("***@", uri)


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def redacted_params(cfg: Config) -> dict[str, str]:
    params = {}
    for key, value in cfg.flat().items():
        text = "null" if value is None else str(value)
        params[key] = redact_uri(text) if key == "tracking.uri" else text
    return params


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


class Tracker:
    """MLflow on rank 0 when tracking is enabled; every method is a no-op elsewhere."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, run_id: str | None = None):
        self.active = is_main and cfg.tracking.enabled
        self.run_id: str | None = run_id
        self.uri = tracking_uri(cfg, run_dir)
        self.last_logged_step = -1
        if not self.active:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            # With the local default store, artifacts live beside it instead of in ./mlruns of the cwd.
            location = (run_dir / "mlartifacts").resolve().as_uri() if self.uri.startswith("sqlite:") else None
            experiment_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        if experiment is None or EXPERIMENT_KIND_TAG not in experiment.tags:
            # This is model training, not GenAI. (MLflow 3.17's UI picks its view from a setting of the browser,
            # GenAI by default, or from `?workflowType=machine_learning` in the address; other versions read this.)
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
        if run_id is not None:
            self.client.get_run(run_id)  # fails loudly if the checkpoint's run is not in this store
            history = self.client.get_metric_history(run_id, METRIC_FOR_LAST_STEP)
            self.last_logged_step = max((m.step for m in history), default=-1)
            mlflow.start_run(run_id=run_id, log_system_metrics=cfg.tracking.system_metrics)
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=cfg.run.name, log_system_metrics=cfg.tracking.system_metrics
            )
            self.run_id = run.info.run_id
            mlflow.log_params(redacted_params(cfg))

    def log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        """Metrics of a training step (each step once, see the module docstring), or with step=None a run's
        summary (final results, logged at MLflow's default step 0 whatever was logged before)."""
        if not self.active or (step is not None and step <= self.last_logged_step):
            return
        import mlflow

        mlflow.log_metrics(metrics, step=step, synchronous=True)
        if step is not None:
            self.last_logged_step = step

    def log_params(self, params: dict[str, Any]) -> None:
        """Extra params (values logged as text), beside the config's."""
        if self.active:
            import mlflow

            mlflow.log_params({key: str(value) for key, value in params.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_image(image, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(tags)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            import mlflow

            mlflow.end_run(status=status)
            self.active = False
