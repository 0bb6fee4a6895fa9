"""clmae-pretrain end to end: 2 real ranks (gloo, CPU), the tiny model, real FFCV digits, a real MLflow store.

Every run here is the real console entry point, with two rank processes started directly as the
deepspeed launcher would (RANK / WORLD_SIZE / MASTER_*), so each rank's exit code is visible and
`kill -9` hits a rank, not a supervisor. The reference for every resume is one uninterrupted run of
STEPS optimiser steps; each interrupted run must end with bitwise the same weights of both modules and
the same logged losses, each step logged exactly once in one MLflow run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from clmae.checkpoint import checkpoint_root, find_latest, read_client_state
from clmae.config import load_config
from clmae.train import EXIT_REQUEUE, TrainState, checkpoint_reason
from clmae.weights import consolidated_state_dict

STEPS = 6
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Run:
    """One training launch: `ranks` rank processes (two by default) writing to log files."""

    def __init__(
        self,
        run_dir: Path,
        digits: Path,
        overrides: list[str],
        fault: str | None = None,
        ranks: int = 2,
        extra_env: dict[str, str] | None = None,
    ):
        self.run_dir = run_dir
        self.logs = [run_dir.parent / f"{run_dir.name}-rank{r}-{time.monotonic_ns()}.log" for r in range(ranks)]
        args = [
            sys.executable,
            "-m",
            "clmae.train",
            "--config",
            "tiny_digits",
            f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}",
            f"data.train_path={digits / 'train.beton'}",
            f"data.val_path={digits / 'val.beton'}",
            "data.batch_size=16",
            "train.epochs=2",
            "train.log_every=1",
            "checkpoint.every_steps=2",
            "tracking.system_metrics=false",
            "tracking.mask_images_every_epochs=0",
            *overrides,
        ]
        port = str(free_port())
        self.procs = []
        for rank, log in enumerate(self.logs):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks))
            env.update(LOCAL_WORLD_SIZE=str(ranks), **(extra_env or {}))
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            env.pop("CLMAE_FAULT", None)
            env.pop("MLFLOW_TRACKING_URI", None)  # the store in the run directory, which the checks read
            if fault:
                env["CLMAE_FAULT"] = fault
            with open(log, "w") as handle:
                self.procs.append(subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env))

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"training did not finish in {timeout} s:\n{self.output()[-3000:]}")
        return codes

    def wait_for_line(self, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if any(p.poll() is not None for p in self.procs):
                pytest.fail(f"a rank exited before printing {text!r}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {text!r} within {timeout} s:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = find_latest(run_dir)
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    return {f"{engine}.{k}": v for engine in ("mae", "cmm") for k, v in consolidated_state_dict(latest, engine).items()}


def metric_history(run_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """The run's single MLflow run id, and each loss metric's (step, value) points in step order."""
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    run_id = runs[0].info.run_id
    keys = ("mae/loss", "cmm/loss_cmm", "cmm/loss_kl", "cmm/lambda", "lr/mae", "lr/cmm")
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
    return run_id, history


def assert_same_training(run_dir: Path, reference: Path) -> None:
    got, want = weights(run_dir), weights(reference)
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    _, history = metric_history(run_dir)
    _, reference_history = metric_history(reference)
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert steps == list(range(1, STEPS + 1)), f"{key}: logged steps {steps} (duplicated or missing)"
        assert points == reference_history[key], f"{key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits):
    """The reference: STEPS steps in one go (mask pictures on, to check they reach MLflow)."""
    run_dir = tmp_path_factory.mktemp("train") / "uninterrupted"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}", "tracking.mask_images_every_epochs=1"])
    assert run.wait() == [0, 0], run.output()[-3000:]
    return run_dir, run.output()


def test_uninterrupted_run_trains_checkpoints_and_tracks(uninterrupted):
    run_dir, output = uninterrupted
    assert f"reached train.stop_at_step={STEPS}" in output
    assert "step 1 (epoch 0) | mae " in output and "TFLOP/s (MAE step)" in output
    state = read_client_state(find_latest(run_dir))
    assert (state.global_step, state.epoch, state.step_in_epoch, state.world_size) == (STEPS, 0, STEPS, 2)
    # checkpoint.every_steps=2 and keep_last=3: steps 2, 4, 6 remain.
    assert sorted(p.name for p in checkpoint_root(run_dir).glob("step_*")) == [
        "step_000000002",
        "step_000000004",
        "step_000000006",
    ]
    assert (run_dir / "config.yaml").is_file()
    run_id, history = metric_history(run_dir)
    assert state.mlflow_run_id == run_id
    losses = [value for _, value in history["mae/loss"]]
    assert len(losses) == STEPS and all(0 < v < 10 for v in losses), losses
    assert history["cmm/lambda"][0][1] == 1.0  # epoch 0 of 2: partner
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    params = client.get_run(run_id).data.params
    assert params["model.name"] == "vit_tiny" and params["data.batch_size"] == "16"
    artifacts = {a.path for a in client.list_artifacts(run_id, "masks")}
    assert "masks/epoch_00000.png" in artifacts


def test_stop_and_resume_is_bitwise_identical(uninterrupted, tmp_path, digits):
    run_dir = tmp_path / "resumed"
    first = Run(run_dir, digits, ["train.stop_at_step=3"])
    assert first.wait() == [0, 0], first.output()[-3000:]
    second = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert second.wait() == [0, 0], second.output()[-3000:]
    assert "resumed from" in second.output() and "global step 3)" in second.output()
    assert_same_training(run_dir, uninterrupted[0])


def test_kill_9_at_a_random_step_then_resume(uninterrupted, tmp_path, digits):
    run_dir = tmp_path / "killed"
    kill_after = random.Random(os.environ.get("PYTEST_SEED", "0")).randint(3, STEPS - 1)
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    run.wait_for_line(f"step {kill_after} (epoch 0)")
    run.kill(signal.SIGKILL)
    assert run.wait() == [-signal.SIGKILL, -signal.SIGKILL]
    resumed = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert resumed.wait() == [0, 0], resumed.output()[-3000:]
    assert_same_training(run_dir, uninterrupted[0])


def test_kill_during_a_save_leaves_latest_whole(uninterrupted, tmp_path, digits):
    run_dir = tmp_path / "killed_in_save"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"], fault="kill_in_save@4")
    codes = run.wait()
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, codes
    partial = checkpoint_root(run_dir) / "step_000000004"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    assert find_latest(run_dir).name == "step_000000002"
    resumed = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert resumed.wait() == [0, 0], resumed.output()[-3000:]
    assert "global step 2)" in resumed.output()
    assert_same_training(run_dir, uninterrupted[0])


def test_preemption_signal_checkpoints_and_exits_for_requeue(uninterrupted, tmp_path, digits):
    run_dir = tmp_path / "preempted"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    run.wait_for_line("step 1 (epoch 0)")
    run.kill(signal.SIGUSR1)
    assert run.wait() == [75, 75], run.output()[-3000:]
    stopped_at = read_client_state(find_latest(run_dir)).global_step
    assert 1 <= stopped_at < STEPS and "preemption signal" in run.output()
    resumed = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert resumed.wait() == [0, 0], resumed.output()[-3000:]
    assert_same_training(run_dir, uninterrupted[0])


def test_nan_guard_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path, digits):
    run_dir = tmp_path / "nan"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"], fault="nan_loss@3")
    assert run.wait() == [1, 1], run.output()[-3000:]
    assert "error: non-finite loss at global step 3 (epoch 0): mae/loss" in run.output()
    assert find_latest(run_dir).name == "step_000000002"
    assert not (checkpoint_root(run_dir) / "step_000000003").exists()


def test_resume_refuses_a_checkpoint_of_another_config(uninterrupted, tmp_path, digits):
    run_dir = tmp_path / "mismatch"
    first = Run(run_dir, digits, ["train.stop_at_step=2"])
    assert first.wait() == [0, 0], first.output()[-3000:]
    second = Run(run_dir, digits, [f"train.stop_at_step={STEPS}", "model.mask_ratio=0.5"])
    assert second.wait() == [2, 2]
    assert "model.mask_ratio: checkpoint 0.75 != now 0.5" in second.output()
    assert "refusing to resume" in second.output()


def test_requeue_exit_code_is_the_one_the_slurm_script_requeues_on():
    """clmae.train.EXIT_REQUEUE and slurm/lib/pretrain.sh's EXIT_REQUEUE are two spellings of one contract."""
    script = (Path(__file__).parent.parent / "slurm" / "lib" / "pretrain.sh").read_text()
    assert re.findall(r"^EXIT_REQUEUE=(\d+)\s*$", script, flags=re.MULTILINE) == [str(EXIT_REQUEUE)]
    assert "$EXIT_REQUEUE" in script


def test_checkpoint_reason_names_the_first_that_applies():
    cfg = load_config("tiny_digits", ["train.epochs=2", "checkpoint.every_steps=4", "train.stop_at_step=9"])
    assert checkpoint_reason(cfg, TrainState(0, 3, 3), stop=False, epoch_done=False) is None
    assert checkpoint_reason(cfg, TrainState(0, 4, 4), stop=False, epoch_done=False) == "periodic"
    assert checkpoint_reason(cfg, TrainState(1, 0, 4), stop=False, epoch_done=True) == "epoch end"
    assert checkpoint_reason(cfg, TrainState(1, 3, 9), stop=False, epoch_done=False) == "stop_at_step"
    assert checkpoint_reason(cfg, TrainState(2, 0, 8), stop=False, epoch_done=True) == "finished"
    assert checkpoint_reason(cfg, TrainState(2, 0, 8), stop=True, epoch_done=True) == "preemption signal"
