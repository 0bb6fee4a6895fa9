"""clmae-pretrain end to end: 2 real ranks (gloo, CPU), the tiny model, real FFCV digits, a real MLflow store.

Every run here is the real console entry point, with two rank processes started directly as the
deepspeed launcher would (RANK / WORLD_SIZE / MASTER_*), so each rank's exit code is visible and
`kill -9` hits a rank, not a supervisor. The reference for every resume is one uninterrupted run of
STEPS optimiser steps; each interrupted run must end with bitwise the same weights of both modules and
the same logged losses, each step logged exactly once in one MLflow run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from clmae.checkpoint import checkpoint_root, find_latest, read_client_state
from clmae.config import load_config
from clmae.runlock import LOCK_FILE
from clmae.tracking import RUN_RECORD
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
        file_size_limit: int = 0,
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
            # The file-size limit on the last rank only: a rank failing alone is the harder case to agree on.
            limit = partial(_limit_file_size, file_size_limit) if file_size_limit and rank == ranks - 1 else None
            with open(log, "w") as handle:
                self.procs.append(
                    subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, preexec_fn=limit)
                )

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


def _limit_file_size(limit: int) -> None:
    """RLIMIT_FSIZE: a write past `limit` bytes fails with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


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
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}", "train.on_nonfinite=stop"], fault="nan_loss@3")
    assert run.wait() == [1, 1], run.output()[-3000:]
    expected = "global step 3 (epoch 0): grad_norm/mae, mae/loss; train.on_nonfinite=stop"
    assert f"error: non-finite loss or gradient at {expected}" in run.output()
    assert find_latest(run_dir).name == "step_000000002"
    assert not (checkpoint_root(run_dir) / "step_000000003").exists()


def test_nan_rolls_back_skips_the_batches_and_matches_a_run_told_to_skip_them(tmp_path, digits):
    """NaN at step 4 on rank 1: both ranks reload step 2 in-process and skip steps 3-4; the result is bitwise
    the run given train.skip_steps=[3,4]; the record survives a requeue (max_rollbacks counts it)."""
    run_dir, reference = tmp_path / "rollback", tmp_path / "skipping"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"], fault="nan_loss@4")
    assert run.wait() == [0, 0], run.output()[-3000:]
    output = run.output()
    summary = "step 4: grad_norm/mae, mae/loss non-finite; restored step_000000002, skipped steps 3-4"
    assert output.count("rollback 1 of at most 3: " + summary) == 1, output[-3000:]
    assert f"reached train.stop_at_step={STEPS}" in output
    state = read_client_state(find_latest(run_dir))
    assert state.global_step == STEPS and state.skip_steps == [3, 4]
    assert state.rollbacks == [{"step": 4, "terms": ["grad_norm/mae", "mae/loss"], "from_step": 2, "skipped": [3, 4]}]
    told = Run(reference, digits, [f"train.stop_at_step={STEPS}", "train.skip_steps=[3,4]"])
    assert told.wait() == [0, 0], told.output()[-3000:]

    got, want = weights(run_dir), weights(reference)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    run_id, history = metric_history(run_dir)
    _, reference_history = metric_history(reference)
    for key, points in history.items():
        # Step 3 was logged before the NaN and is not logged again; 4 (the NaN) never was.
        assert [step for step, _ in points] == [1, 2, 3, 5, 6], key
        assert [p for p in points if p[0] != 3] == reference_history[key], key
    tags = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["rollbacks"] == "1" and tags["rollback.1"] == summary

    # A requeue continues with the recorded rollback: a second NaN exceeds max_rollbacks=1 and stops as before.
    overrides = [f"train.stop_at_step={STEPS + 2}", "train.max_rollbacks=1"]
    again = Run(run_dir, digits, overrides, fault=f"nan_loss@{STEPS + 2}")
    assert again.wait() == [1, 1], again.output()[-3000:]
    assert "train.max_rollbacks=1 reached (earlier rollbacks at steps 4)" in again.output()
    assert find_latest(run_dir).name == f"step_{STEPS:09d}"


def test_kill_9_of_every_rank_before_the_first_checkpoint_keeps_one_mlflow_run(uninterrupted, tmp_path, digits):
    """Every rank dies as step 2 begins (step 1 logged, the first checkpoint due after step 2): the relaunch
    starts from step 0 and continues the same MLflow run, logging each step once; the weights are the
    uninterrupted run's. A relaunch with another config and still no checkpoint gets a new run instead."""
    run_dir = tmp_path / "killed_early"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"], fault="kill_all@2")
    assert run.wait() == [-signal.SIGKILL, -signal.SIGKILL], run.output()[-3000:]
    assert find_latest(run_dir) is None
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    first_id, history = metric_history(run_dir)
    assert [step for step, _ in history["mae/loss"]] == [1]
    assert client.get_run(first_id).info.status == "RUNNING"  # nothing was left alive to say otherwise
    assert json.loads((run_dir / RUN_RECORD).read_text())["run_id"] == first_id

    relaunch = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert relaunch.wait() == [0, 0], relaunch.output()[-3000:]
    assert f"run {first_id} (adopted from {RUN_RECORD}" in relaunch.output()
    assert_same_training(run_dir, uninterrupted[0])  # one MLflow run, steps 1-6 once, the reference's values
    assert read_client_state(find_latest(run_dir)).mlflow_run_id == first_id
    assert client.get_run(first_id).info.status == "KILLED"  # train.stop_at_step: stopped on purpose

    changed_dir = tmp_path / "killed_early_changed"
    killed = Run(changed_dir, digits, [f"train.stop_at_step={STEPS}"], fault="kill_all@2")
    assert killed.wait() == [-signal.SIGKILL, -signal.SIGKILL], killed.output()[-3000:]
    abandoned = json.loads((changed_dir / RUN_RECORD).read_text())["run_id"]
    changed = Run(changed_dir, digits, ["train.stop_at_step=1", "optim.base_lr=5e-4"])
    assert changed.wait() == [0, 0], changed.output()[-3000:]
    assert f"(new: the config changed since run {abandoned}" in changed.output()
    store = MlflowClient(tracking_uri=f"sqlite:///{changed_dir / 'mlflow.db'}")
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    assert {r.info.run_id: r.info.status for r in runs} == {
        abandoned: "KILLED",
        read_client_state(find_latest(changed_dir)).mlflow_run_id: "KILLED",
    }


def test_kill_9_of_every_rank_in_a_save_then_after_the_last_step(uninterrupted, tmp_path, digits):
    """Every rank dies with checkpoint 4's shards written and its COMPLETE not; the relaunch resumes from 2 and
    every rank dies again after the last step, as the final checkpoint begins; the third launch resumes from 4
    and finishes: the uninterrupted run's weights, one MLflow run, each step once."""
    run_dir = tmp_path / "killed_in_saves"
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    for fault, resumes_at in (("kill_all_in_save@4", None), (f"kill_before_save@{STEPS}", 2)):
        run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"], fault=fault)
        assert run.wait() == [-signal.SIGKILL, -signal.SIGKILL], run.output()[-3000:]
        if resumes_at is not None:
            assert f"global step {resumes_at})" in run.output()
        run_id, _ = metric_history(run_dir)
        assert client.get_run(run_id).info.status == "RUNNING"
    assert find_latest(run_dir).name == "step_000000004"
    resumed = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert resumed.wait() == [0, 0], resumed.output()[-3000:]
    assert "global step 4)" in resumed.output()
    assert_same_training(run_dir, uninterrupted[0])
    assert client.get_run(run_id).info.status == "KILLED"  # ended by train.stop_at_step, on purpose


def test_nan_before_the_first_checkpoint_rolls_back_to_the_initial_state(tmp_path, digits):
    """NaN at step 2, before the first checkpoint (due after step 2): the initial state is rebuilt from the
    seed and steps 1-2 are skipped; bitwise the run told train.skip_steps=[1,2]."""
    run_dir, reference = tmp_path / "early_nan", tmp_path / "skipping_first"
    run = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"], fault="nan_loss@2")
    assert run.wait() == [0, 0], run.output()[-3000:]
    summary = "step 2: grad_norm/mae, mae/loss non-finite; rebuilt the initial state, skipped steps 1-2"
    assert run.output().count("rollback 1 of at most 3: " + summary) == 1, run.output()[-3000:]
    state = read_client_state(find_latest(run_dir))
    assert state.global_step == STEPS and state.skip_steps == [1, 2]
    assert state.rollbacks == [{"step": 2, "terms": ["grad_norm/mae", "mae/loss"], "from_step": 0, "skipped": [1, 2]}]
    told = Run(reference, digits, [f"train.stop_at_step={STEPS}", "train.skip_steps=[1,2]"])
    assert told.wait() == [0, 0], told.output()[-3000:]

    got, want = weights(run_dir), weights(reference)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    _, history = metric_history(run_dir)
    _, reference_history = metric_history(reference)
    for key, points in history.items():
        assert [step for step, _ in points] == [1, 3, 4, 5, 6], key  # step 1 was logged before the NaN
        assert points[1:] == reference_history[key], key


CHEAPER_CURRICULUM = ["masking.cmm_every=2", "masking.cmm_batch_fraction=0.5", "curriculum.granularity=step"]


def test_cheaper_curriculum_trains_and_resumes_exactly(uninterrupted, tmp_path, digits):
    """The CMM's step on one iteration in 2, on half of each micro-batch, lambda per step: through clmae-pretrain
    on 2 ranks, and stopped after step 3 (the next step has no CMM step) then resumed, bitwise the uninterrupted
    run with the same settings, which differs from the paper's run (the `uninterrupted` fixture)."""
    reference = tmp_path / "reference"
    run = Run(reference, digits, [f"train.stop_at_step={STEPS}", *CHEAPER_CURRICULUM])
    assert run.wait() == [0, 0], run.output()[-3000:]
    note = "(curriculum masking; its step on 1 iteration in 2, on 8 of 16 images per micro-batch, lambda per step)"
    assert note in run.output()
    # The console's line shows the CMM's part for the steps it trained only.
    assert re.search(r"step 2 \(epoch 0\) \| mae [\d.]+ \| lr ", run.output()), run.output()[-3000:]
    assert re.search(r"step 3 \(epoch 0\) \| mae [\d.]+ \| cmm [\d.-]+ \(lambda ", run.output())
    run_dir = tmp_path / "resumed"
    first = Run(run_dir, digits, ["train.stop_at_step=3", *CHEAPER_CURRICULUM])
    assert first.wait() == [0, 0], first.output()[-3000:]
    second = Run(run_dir, digits, [f"train.stop_at_step={STEPS}", *CHEAPER_CURRICULUM])
    assert second.wait() == [0, 0], second.output()[-3000:]
    assert "global step 3)" in second.output()

    got, want = weights(run_dir), weights(reference)
    assert [name for name in want if not torch.equal(got[name], want[name])] == []
    paper = weights(uninterrupted[0])
    assert any(not torch.equal(paper[name], want[name]) for name in want if name.startswith("cmm."))
    _, history = metric_history(run_dir)
    _, reference_history = metric_history(reference)
    assert history == reference_history
    for key, points in history.items():
        steps = [step for step, _ in points]
        # The MAE and the learning rates every step; the CMM's metrics on the steps it trained: 1, 3, 5.
        assert steps == (list(range(1, STEPS + 1)) if key.startswith(("mae/", "lr/")) else [1, 3, 5]), key
    # lambda on the per-step line of 2 epochs of 46 steps: 1 - 2 t, t = (step - 1) / 92.
    assert [value for _, value in history["cmm/lambda"]] == pytest.approx([1 - 2 * s / 92 for s in (0, 2, 4)])


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
    # The last step a rollback skipped: the rollback is saved before training goes on.
    rolled = TrainState(0, 5, 5, [4, 5], [{"step": 4, "terms": ["mae/loss"], "from_step": 3, "skipped": [4, 5]}])
    assert checkpoint_reason(cfg, rolled, stop=False, epoch_done=False) == "rollback"
    rolled.global_step = rolled.step_in_epoch = 6
    assert checkpoint_reason(cfg, rolled, stop=False, epoch_done=False) is None


# --------------------------------------------------------------------------------------------------
# Issue 18: checkpoints that prove they are whole, a save that fails, one writer per run directory
# --------------------------------------------------------------------------------------------------


def copy_of(reference: Path, run_dir: Path, keep_up_to: int) -> Path:
    """The reference run directory with its checkpoints after step `keep_up_to` removed (as if it had
    stopped there); its MLflow run already holds every step, so nothing is logged twice."""
    import shutil

    shutil.copytree(reference, run_dir)
    for step_dir in checkpoint_root(run_dir).glob("step_*"):
        if int(step_dir.name.split("_")[1]) > keep_up_to:
            shutil.rmtree(step_dir)
    (checkpoint_root(run_dir) / "latest").write_text(f"step_{keep_up_to:09d}\n")
    return run_dir


def test_a_damaged_checkpoint_is_refused_by_export_and_eval_and_resume_falls_back(uninterrupted, tmp_path, digits):
    run_dir = copy_of(uninterrupted[0], tmp_path / "damaged", keep_up_to=STEPS)
    shard = checkpoint_root(run_dir) / f"step_{STEPS:09d}" / "mae" / "state" / "mp_rank_00_model_states.pt"
    with open(shard, "r+b") as handle:  # a shard cut short, as by a full quota on a shared filesystem
        handle.truncate(shard.stat().st_size // 2)
    for command in (
        ["clmae.export", str(run_dir), "--out", str(tmp_path / "encoder.safetensors")],
        ["clmae.evaluate", "knn", str(run_dir)],
    ):
        refused = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"error: {shard}: " in refused.stderr and "the manifest says" in refused.stderr, refused.stderr
    assert not (tmp_path / "encoder.safetensors").exists()

    resumed = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert resumed.wait() == [0, 0], resumed.output()[-3000:]
    output = resumed.output()
    assert f"warning: {shard}: " in output and "falling back to the previous complete checkpoint" in output
    assert "resumed from" in output and "global step 4)" in output
    assert len(list(checkpoint_root(run_dir).glob(f"damaged_step_{STEPS:09d}.*"))) == 1  # kept for inspection
    assert_same_training(run_dir, uninterrupted[0])


def test_a_save_that_fails_keeps_latest_and_older_checkpoints_and_names_path_and_cause(
    uninterrupted, tmp_path, digits
):
    from clmae.checkpoint import verify_checkpoint

    run_dir = copy_of(uninterrupted[0], tmp_path / "full", keep_up_to=2)
    shard_size = max(f.stat().st_size for f in (checkpoint_root(run_dir) / "step_000000002").rglob("*.pt"))
    # A real write failure: on rank 1, every write past this size fails with EFBIG, its shard of step 4
    # with it, while rank 0 writes its own files (tracking off: the MLflow store is not what is tested).
    failing = Run(
        run_dir,
        digits,
        [f"train.stop_at_step={STEPS}", "tracking.enabled=false"],
        file_size_limit=shard_size // 2,
    )
    assert failing.wait() == [2, 2], failing.output()[-3000:]
    output = failing.output()
    step4 = checkpoint_root(run_dir) / "step_000000004"
    assert f"error: checkpoint {step4} could not be saved and was removed (`latest` is still step_000000002)" in output
    assert f"rank 1: {step4 / 'mae'}: writing failed" in output, output[-3000:]
    assert f"file size limit (ulimit -f) {shard_size // 2:,} bytes" in output
    assert not step4.exists()
    assert find_latest(run_dir).name == "step_000000002" and verify_checkpoint(find_latest(run_dir)).verified
    resumed = Run(run_dir, digits, [f"train.stop_at_step={STEPS}"])
    assert resumed.wait() == [0, 0], resumed.output()[-3000:]
    assert_same_training(run_dir, uninterrupted[0])


def test_one_writer_per_run_directory_and_ranks_die_with_their_launcher(tmp_path, digits):
    import psutil

    run_dir = tmp_path / "one_writer"
    log = tmp_path / "first.log"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "clmae.train", "--config", "tiny_digits",
        f"run.output_dir={tmp_path}", f"run.name={run_dir.name}",
        f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'val.beton'}",
        "data.batch_size=16", "train.epochs=50", "train.log_every=1", "checkpoint.every_steps=2",
        "tracking.system_metrics=false", "tracking.mask_images_every_epochs=0",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLURM_JOB_ID="31337")
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as handle:
        launcher = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    workers: list = []
    try:
        deadline = time.monotonic() + 600
        while "step 3 (epoch 0)" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        workers = psutil.Process(launcher.pid).children(recursive=True)
        config_before = (run_dir / "config.yaml").stat().st_mtime_ns

        second = Run(run_dir, digits, ["run.lock_timeout_seconds=2", "train.epochs=50"])
        assert second.wait() == [2, 2], second.output()[-3000:]
        refusal = [line for line in second.output().splitlines() if line.startswith("error: ")]
        assert len(refusal) == 1 and "is in use by another live run (host " in refusal[0]
        assert second.output().count("error: ") == 1, second.output()[-3000:]  # rank 0 alone says it
        assert "job id 31337" in refusal[0] and "pid " in refusal[0]
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config_before
        metric_history(run_dir)  # still exactly one MLflow run

        launcher.send_signal(signal.SIGKILL)  # the launcher alone: its workers run in their own sessions
        launcher.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"ranks outlived their launcher: {alive}"
    finally:
        for proc in workers:
            if proc.is_running():
                proc.kill()
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
    stopped_at = read_client_state(find_latest(run_dir)).global_step
    lock_left_behind = (run_dir / LOCK_FILE).exists()
    third = Run(run_dir, digits, [f"train.stop_at_step={stopped_at + 2}", "train.epochs=50"])
    assert third.wait() == [0, 0], third.output()[-3000:]
    # Rank 0 held the lock. Either its launcher watch killed it, leaving the lock of a dead pid to take
    # over, or its peer's death reached it first as a failed collective and it released the lock on its
    # way out (a race; both happen). Either way the next launch neither waits nor is refused.
    output = third.output()
    assert "run directory is in use" not in output and "resumed from" in output
    if lock_left_behind:
        assert "took over from a dead run" in output
    _, history = metric_history(run_dir)
    steps = [step for step, _ in history["mae/loss"]]
    assert steps == list(range(1, stopped_at + 3)), f"steps logged twice or missing: {steps}"
