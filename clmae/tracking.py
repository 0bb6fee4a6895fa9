"""MLflow tracking from rank 0: params, metrics, artifacts, pictures; one MLflow run per training run.

The default store is a SQLite file in the run directory (no server needed; `mlflow ui
--backend-store-uri sqlite:///<run_dir>/mlflow.db` opens it). `MLFLOW_TRACKING_URI` or
`tracking.uri` point it at a server; credentials go in MLFLOW_TRACKING_USERNAME / _PASSWORD (or
_TOKEN), which MLflow reads itself, and any user:password in a URI is redacted before anything is
logged.

One run directory, one MLflow run, from its first second: the run's id is written to
<run_dir>/mlflow_run.json (atomically, by rank 0, under the run directory's lock) as soon as the run exists,
and every checkpoint records it too. A relaunch into the directory continues that run: from its newest
checkpoint, or, when the previous attempt died before its first checkpoint, from step 0 with the same config
and store (a changed config starts a new MLflow run and ends the abandoned one as KILLED). Steps between
where the relaunch starts and where the previous attempt died were already logged; they are re-computed
(identically, on CPU: same seeds, same data order) but not logged again, so every metric has each step once.

MLflow status of a run when its process ends: FINISHED (trained all its epochs), KILLED (stopped on purpose:
a preemption signal or train.stop_at_step, resumable), FAILED (a crash or a stop on a non-finite loss). A run
whose ranks were all killed (kill -9, a node's death) stays RUNNING until a relaunch adopts it.
"""

from __future__ import annotations

import hashlib
import json
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
RUN_RECORD = "mlflow_run.json"  # in the run directory: {"run_id", "tracking_uri" (redacted), "config_sha256"}


def config_digest(cfg: Config) -> str:
    """sha256 of the run's params as logged: two attempts with the same digest train the same way."""
    return hashlib.sha256(json.dumps(redacted_params(cfg), sort_keys=True).encode()).hexdigest()


def read_run_record(run_dir: Path) -> dict | None:
    """<run_dir>/mlflow_run.json, or None when there is none (or it is unreadable: a new run is started)."""
    try:
        record = json.loads((run_dir / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def write_run_record(run_dir: Path, run_id: str, uri: str, cfg: Config) -> None:
    from clmae.files import write_atomic

    record = {"run_id": run_id, "tracking_uri": redact_uri(uri), "config_sha256": config_digest(cfg)}
    if read_run_record(run_dir) != record:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / RUN_RECORD, json.dumps(record, indent=2) + "\n")


class Tracker:
    """MLflow on rank 0 when tracking is enabled; every method is a no-op elsewhere."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, run_id: str | None = None):
        """`run_id`: the MLflow run of the checkpoint being resumed; None for a start from step 0, which adopts
        the run of the directory's record when config and store match (see the module docstring)."""
        self.active = is_main and cfg.tracking.enabled
        self.run_id: str | None = run_id
        self.uri = tracking_uri(cfg, run_dir)
        self.last_logged_step = -1
        self.note = ""  # what happened to an earlier attempt's MLflow run, for the start-up line
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
        if run_id is None:
            run_id = self.run_id = self._adopt_recorded_run(cfg, run_dir)  # looked up in this store already
        else:
            self.client.get_run(run_id)  # fails loudly if the checkpoint's run is not in this store
        if run_id is not None:
            history = self.client.get_metric_history(run_id, METRIC_FOR_LAST_STEP)
            self.last_logged_step = max((m.step for m in history), default=-1)
            mlflow.start_run(run_id=run_id, log_system_metrics=cfg.tracking.system_metrics)
            write_run_record(run_dir, run_id, self.uri, cfg)  # a directory of an older version has none yet
        else:
            run = mlflow.start_run(
                experiment_id=experiment_id, run_name=cfg.run.name, log_system_metrics=cfg.tracking.system_metrics
            )
            self.run_id = run.info.run_id
            write_run_record(run_dir, self.run_id, self.uri, cfg)  # first: a kill from here on leaves a run
            mlflow.log_params(redacted_params(cfg))  # that the relaunch adopts

    def _adopt_recorded_run(self, cfg: Config, run_dir: Path) -> str | None:
        """The recorded run of an attempt that ended before its first checkpoint, when this start would train
        the same way into the same store; otherwise None (a new run), after ending an abandoned RUNNING one."""
        from mlflow.exceptions import MlflowException

        record = read_run_record(run_dir)
        if record is None or record.get("tracking_uri") != redact_uri(self.uri):
            return None  # no earlier attempt, or its run lives in another store
        try:
            earlier = self.client.get_run(record["run_id"])
        except MlflowException:
            return None  # deleted from the store
        if record.get("config_sha256") == config_digest(cfg):
            self.note = f" (adopted from {RUN_RECORD}: the earlier attempt ended before its first checkpoint)"
            return record["run_id"]
        if earlier.info.status == "RUNNING":
            self.client.set_terminated(record["run_id"], status="KILLED")
        self.note = f" (new: the config changed since run {record['run_id']}, which ended before its first checkpoint)"
        return None

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

    def mark_ended(self, status: str) -> None:
        """Set the run's status from any thread (the hang watchdog's: MLflow's active run is per thread)."""
        if self.active:
            self.client.set_terminated(self.run_id, status=status)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            import mlflow

            mlflow.end_run(status=status)
            self.active = False
