"""clmae.tracking against a real MLflow SQLite store: one run per training run, credentials never logged."""

from __future__ import annotations

import subprocess
import sys

from mlflow.tracking import MlflowClient

from clmae.config import load_config
from clmae.tracking import Tracker, redact_uri, redacted_params, tracking_uri


def test_credentials_in_a_tracking_uri_are_redacted():
    assert redact_uri("https://alice:s3cret@mlflow.example.org/x") == "https://***@mlflow.example.org/x"
    assert redact_uri("https://token@host") == "https://***@host"
    assert redact_uri("sqlite:////runs/a/mlflow.db") == "sqlite:////runs/a/mlflow.db"
    cfg = load_config("tiny_digits", ["tracking.uri=https://alice:s3cret@mlflow.example.org"])
    params = redacted_params(cfg)
    assert params["tracking.uri"] == "https://***@mlflow.example.org"
    assert not any("s3cret" in value for value in params.values())


def test_default_store_is_inside_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(load_config("tiny_digits"), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(load_config("tiny_digits"), tmp_path) == "http://127.0.0.1:5000"


def test_a_resumed_tracker_continues_its_run_and_never_relogs_a_step(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("tiny_digits", ["tracking.system_metrics=false"])
    first = Tracker(cfg, tmp_path, is_main=True)
    for step in (1, 2, 3):
        first.log_metrics({"mae/loss": float(step)}, step)
    first.finish("KILLED")  # preempted after logging step 3; its checkpoint was at step 2

    resumed = Tracker(cfg, tmp_path, is_main=True, run_id=first.run_id)
    assert resumed.run_id == first.run_id and resumed.last_logged_step == 3
    for step in (3, 4):  # step 3 is recomputed after resuming from step 2: not logged again
        resumed.log_metrics({"mae/loss": 10.0 * step}, step)
    resumed.finish()

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = sorted((m.step, m.value) for m in client.get_metric_history(first.run_id, "mae/loss"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == "vit_tiny"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # MLflow 3's UI opens it in the model-training view, not the GenAI one.
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_other_ranks_and_disabled_tracking_log_nothing(tmp_path):
    cfg = load_config("tiny_digits")
    assert not Tracker(cfg, tmp_path, is_main=False).active
    assert not Tracker(load_config("tiny_digits", ["tracking.enabled=false"]), tmp_path, is_main=True).active
    assert not (tmp_path / "mlflow.db").exists()


def test_a_start_killed_before_its_first_checkpoint_is_adopted_and_ends_finished(tmp_path, monkeypatch):
    """The first attempt dies after logging step 1 with nothing to end its run (os._exit, as kill -9); the relaunch
    from step 0 adopts that run from the directory's record, logs each step once and ends it FINISHED."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = ["tracking.system_metrics=false"]
    attempt = (
        "import os, sys; from pathlib import Path; from clmae.config import load_config; "
        "from clmae.tracking import Tracker; "
        f"tracker = Tracker(load_config('tiny_digits', {overrides!r}), Path(sys.argv[1]), is_main=True); "
        "tracker.log_metrics({'mae/loss': 1.0}, 1); print(tracker.run_id, flush=True); os._exit(0)"
    )
    result = subprocess.run([sys.executable, "-c", attempt, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.split()[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(first).info.status == "RUNNING"

    relaunch = Tracker(load_config("tiny_digits", overrides), tmp_path, is_main=True)
    assert relaunch.run_id == first and relaunch.last_logged_step == 1 and "adopted" in relaunch.note
    for step in (1, 2, 3):  # training starts again from step 0: step 1 is already in the run
        relaunch.log_metrics({"mae/loss": float(step)}, step)
    relaunch.finish()
    history = sorted((m.step, m.value) for m in client.get_metric_history(first, "mae/loss"))
    assert history == [(1, 1.0), (2, 2.0), (3, 3.0)]
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
