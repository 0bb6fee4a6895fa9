"""`clmae-pretrain`: CL-MAE pre-training, launched by torchrun, the deepspeed launcher or srun.

    torchrun --nproc_per_node 2 -m clmae.train --config tiny_digits
    srun --ntasks-per-node 8 clmae-pretrain --config vith data.batch_size=128

`train()` below is the whole procedure, top to bottom: `set_up` (data, models, engines, resume, tracking),
then `train_one_epoch` until done: for every iteration one MAE step and the masking strategy's own step
(the CMM step) on the same batch (SPEC section 6, clmae/step.py), with the NaN guard, metrics, checkpoints
and preemption handled at optimiser-step boundaries. The loop's state is a `TrainState`; the decisions it
takes at a boundary are `agree` (one collective), `MetricsWindow.report` and `checkpoint_reason`.

Exit codes: 0 finished (or `train.stop_at_step` reached), 75 preempted and checkpointed (the SLURM
scripts requeue on it), 124 hung (clmae/watchdog.py: no step within dist.step_timeout_s; the scripts requeue it as
a crash), 2 bad input, 1 a crash or a diverged loss.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clmae import watchdog
from clmae.cli import add_config_arguments, run_main

EXIT_REQUEUE = 75  # sysexits EX_TEMPFAIL: "try again later", what a preempted run asks of its scheduler

# Set by SIGUSR1 / SIGTERM and read at step boundaries, where no collective is in flight. The handler
# is installed before the heavy imports, so that an early signal never kills a rank outright.
_stop_signal: list[int] = []


def _request_stop(signum, _frame) -> None:
    _stop_signal.append(signum)
    watchdog.signalled()  # a rank that cannot reach the step boundary within the grace period dumps and exits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clmae-pretrain",
        description="Pre-train a CL-MAE (MAE + curriculum masking module) with two DeepSpeed engines.",
        epilog="example: torchrun --nproc_per_node 2 -m clmae.train --config tiny_digits optim.base_lr=1e-3",
    )
    add_config_arguments(parser)
    return parser


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or inf; the last good checkpoint stays `latest`."""


def main() -> None:
    from clmae.dist import exit_with_launcher

    exit_with_launcher()  # no orphaned ranks: a rank dies with its launcher (issue 18, section 3)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _request_stop)
    # DeepSpeed 0.19 calls a torch collective that torch 2.14 deprecates, once per step per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    run_main(_main, skip_teardown=True)


def _main() -> int:
    args = build_parser().parse_args()
    from clmae.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    from clmae.preflight import check_pretrain

    check_pretrain(cfg)  # bad input fails here, in seconds, before any process group or model exists
    return train(cfg)


# torch, DeepSpeed and the rest are imported inside the functions below, not at the top: `main` installs the
# signal handlers first, so that a signal during those (long) imports is a stop request, not a dead rank.


@dataclass
class TrainState:
    """Where training is; what a checkpoint records and a resume restores."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # optimiser steps already done in that epoch
    global_step: int = 0  # optimiser steps done in total
    # Global steps whose batches are consumed but not trained on (train.skip_steps + rollbacks), and the
    # rollbacks so far ({"step", "terms", "from_step", "skipped": [first, last]}): part of the data order.
    skip_steps: list[int] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)


@dataclass
class Setup:
    """Everything the loop works with, built once by `set_up`."""

    cfg: Any
    env: Any  # clmae.dist.DistEnv
    run_dir: Path
    loader: Any  # clmae.data pre-training loader
    steps_per_epoch: int
    engines: Any  # clmae.ds_engines.Engines
    tracker: Any  # clmae.tracking.Tracker
    val_images: Any  # (8, 3, H, W) for the mask pictures, or None
    flops: dict[str, float]  # per image, of each step (clmae.masking.iteration_flops)
    started_fresh: bool  # from step 0 (no checkpoint resumed): a rollback may rebuild the initial state
    compiled: bool = False  # train.compile: the first step (which compiles) is done


def train(cfg) -> int:
    """Pre-train per `cfg` on the ranks of this launch; returns the exit code."""
    from clmae import dist
    from clmae.runlock import hold_run_dir

    env = dist.init(cfg.dist.backend, cfg.dist.timeout_minutes)
    run = run_lock = None
    try:
        # One writer per run directory: taken before anything in it is read or written.
        run_lock = hold_run_dir(Path(cfg.run.output_dir) / cfg.run.name, cfg.run.lock_timeout_seconds)
        run, state = set_up(cfg, env)
        if state.epoch >= cfg.train.epochs:
            dist.log(f"nothing to do: the run already finished its {cfg.train.epochs} epochs")
            run.tracker.finish()
            return 0
        window = MetricsWindow(env.device)
        watchdog.start(cfg.dist, env.rank, before_exit=lambda: run.tracker.mark_ended("FAILED"))
        while state.epoch < cfg.train.epochs:
            code = train_one_epoch(run, state, window)
            if code is not None:
                return code
        if run.val_images is not None:
            record_curriculum(run, state)
        dist.log(f"training finished: {cfg.train.epochs} epochs, {state.global_step} steps")
        run.tracker.finish()
        return 0
    except TrainingDiverged as err:
        dist.log(f"error: {err}")
        if run is not None:
            run.tracker.finish("FAILED")
        return 1
    except BaseException:
        if run is not None:
            run.tracker.finish("FAILED")  # the process ends without the interpreter's teardown (clmae.cli)
        raise
    finally:
        watchdog.stop()
        if run_lock is not None:
            run_lock.release()
        dist.shutdown()


def train_one_epoch(run: Setup, state: TrainState, window: MetricsWindow) -> int | None:
    """The rest of `state.epoch`: one optimiser step of each engine per iteration (SPEC section 6), then at
    the step boundary the NaN guard, metrics, checkpoints and stop requests. Returns an exit code when the
    run must end now, None at the end of the epoch."""
    import torch

    from clmae import dist, faults
    from clmae.masking import masking_step_due
    from clmae.step import optimizer_step

    cfg, env, accum = run.cfg, run.env, run.cfg.train.accum_steps
    if run.val_images is not None and state.step_in_epoch == 0:
        record_curriculum(run, state)
    batches = run.loader.iterate_epoch(state.epoch, skip_batches=state.step_in_epoch * accum)
    steps = range(state.step_in_epoch, run.steps_per_epoch)
    progress = dist.progress(steps, total=run.steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch}")
    for _ in progress:
        lam = curriculum_lambda(cfg, state.epoch, state.step_in_epoch / run.steps_per_epoch)
        # fp32 images: the MAE casts them to its dtype for the forward; the pixel targets stay fp32. On CPU a
        # batch is a view into FFCV's ring buffer, which the prefetcher refills: micro-batches held while the
        # next ones are read must be copies (a view-only .to() is free when nothing is held).
        micro_batches = [next(batches)[0].to(torch.float32, copy=accum > 1) for _ in range(accum)]
        metrics = {}  # a skipped step (train.skip_steps, rollbacks) consumes its batches and nothing else
        due = masking_step_due(cfg, state.global_step + 1)
        if state.global_step + 1 not in state.skip_steps:
            poison = faults.at_step(env.rank, env.world_size, state.global_step + 1)
            started = time.perf_counter()
            metrics = optimizer_step(
                run.engines, micro_batches, lam, cfg, window.timer, poison_mae_loss=poison, masking_step=due
            )
            if cfg.train.compile and not run.compiled:
                run.compiled = True  # the first step of this process compiles the blocks
                dist.log(f"train.compile: the first step compiled the blocks in {time.perf_counter() - started:.1f} s")
        state.step_in_epoch += 1
        state.global_step += 1

        non_finite, stop = agree(metrics, stop_requested=bool(_stop_signal), device=env.device)
        watchdog.step_done()  # every rank got through the step's collectives
        if non_finite:
            roll_back(run, state, window, non_finite)  # raises TrainingDiverged when it may not
            batches.close()
            return None  # train() calls again: the restored epoch, from the restored position
        if metrics:
            window.add(metrics, masking_step=due)
        epoch_done = state.step_in_epoch == run.steps_per_epoch
        if (state.global_step % cfg.train.log_every == 0 or epoch_done) and window.steps:
            # A window without the strategy's step (masking.cmm_every > log_every) has none of its metrics to show.
            strategy = run.engines.strategy if window.masking_steps else None
            report = window.report(run, state)
            run.tracker.log_metrics(report, step=state.global_step)
            dist.log(_format_report(state.global_step, state.epoch, report, strategy))
        if epoch_done:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0

        reason = checkpoint_reason(cfg, state, stop, epoch_done)
        if reason is not None:
            save(run, state, reason)
        if stop:
            by = f"signal {_stop_signal[0]}" if _stop_signal else "a signal on another rank"
            dist.log(f"stopped by {by}; exiting with {EXIT_REQUEUE} to be requeued")
            run.tracker.finish("KILLED")
            return EXIT_REQUEUE
        if stop_at_reached(cfg, state):
            dist.log(f"reached train.stop_at_step={cfg.train.stop_at_step}")
            run.tracker.finish("KILLED")
            return 0
    return None


def roll_back(run: Setup, state: TrainState, window: MetricsWindow, non_finite: list[str]) -> None:
    """After a non-finite loss term or gradient norm (on any rank; every rank calls this): reload the last good
    checkpoint into the same engines (before the first one: rebuild the run's initial state from its seed) and
    mark the steps from its position up to the one that diverged, plus train.rollback_skip_margin, as skipped;
    `state` is then the checkpoint's (or step 0), with the longer skip list. Raises TrainingDiverged instead
    with train.on_nonfinite=stop, after train.max_rollbacks rollbacks, or when a run resumed from a checkpoint
    has none left that verifies."""
    from clmae import checkpoint, dist, elastic

    cfg, diverged = run.cfg, state.global_step
    what = f"non-finite loss or gradient at global step {diverged} (epoch {state.epoch}): {', '.join(non_finite)}"
    kept = f"the last good checkpoint stays 'latest' in {checkpoint.checkpoint_root(run.run_dir)}"
    if cfg.train.on_nonfinite == "stop":
        raise TrainingDiverged(f"{what}; train.on_nonfinite=stop: stopping without saving, {kept}")
    done = state.rollbacks
    if len(done) >= cfg.train.max_rollbacks:
        earlier = ", ".join(str(r["step"]) for r in done) or "none"
        raise TrainingDiverged(
            f"{what}; train.max_rollbacks={cfg.train.max_rollbacks} reached (earlier rollbacks at steps {earlier}): "
            f"stopping without saving, {kept}"
        )
    good = checkpoint.newest_verified(run.run_dir, cfg.checkpoint.verify, set_aside=True)
    if good is not None:
        # After an elastic resume the good checkpoint may be the one of the other world size resumed from.
        plan = elastic.prepare(checkpoint.read_client_state(good), cfg, run.env.world_size, good)
        engines = run.engines.as_dict()
        restored = checkpoint.load(good, engines, resharded=plan.resharded)  # weights, optimiser, LR schedule, RNG
        elastic.after_load(plan, engines, cfg.run.seed, run.env.rank, restored, run.steps_per_epoch)
        epoch, step_in_epoch, from_step = restored.epoch, restored.step_in_epoch, restored.global_step
        source = f"restored {good.name}"
    elif run.started_fresh:
        # Before the first checkpoint: the run's initial state, which its seed determines. Rebuilt as set_up built
        # it (the old engines released first: two ZeRO engines of a large model need not fit at once).
        import gc

        run.engines = None
        gc.collect()
        run.engines = initial_engines(cfg, run.env, run.steps_per_epoch)
        epoch, step_in_epoch, from_step = 0, 0, 0
        source = "rebuilt the initial state"
    else:
        raise TrainingDiverged(f"{what}; no checkpoint verifies, and this start resumed from one: stopping")
    first, last = from_step + 1, diverged + cfg.train.rollback_skip_margin
    record = {"step": diverged, "terms": non_finite, "from_step": from_step, "skipped": [first, last]}
    state.epoch, state.step_in_epoch, state.global_step = epoch, step_in_epoch, from_step
    state.skip_steps = sorted(set(state.skip_steps) | set(range(first, last + 1)))
    state.rollbacks = [*done, record]
    window.discard()
    n = len(state.rollbacks)
    summary = f"step {diverged}: {', '.join(non_finite)} non-finite; {source}, skipped steps {first}-{last}"
    dist.log(f"rollback {n} of at most {cfg.train.max_rollbacks}: {summary}")
    # Tags, not metrics: setting one again (a requeue before the rollback was saved) changes nothing.
    run.tracker.set_tags({f"rollback.{n}": summary, "rollbacks": str(n)})


# ---- the loop's decisions ----------------------------------------------------------------------------


def curriculum_lambda(cfg, epoch: int, epoch_fraction: float = 0.0) -> float:
    """lambda at a training position, with the run's curriculum.schedule and curriculum.granularity."""
    from clmae.curriculum import curriculum_factor

    return curriculum_factor(
        epoch,
        cfg.train.epochs,
        epoch_fraction,
        schedule=cfg.curriculum.schedule,
        granularity=cfg.curriculum.granularity,
    )


def last_lambda(cfg, state: TrainState, steps_per_epoch: int) -> float | None:
    """The lambda of the last step trained before `state`'s position (None before the first)."""
    if state.global_step == 0:
        return None
    if state.step_in_epoch == 0:
        return curriculum_lambda(cfg, state.epoch - 1, (steps_per_epoch - 1) / steps_per_epoch)
    return curriculum_lambda(cfg, state.epoch, (state.step_in_epoch - 1) / steps_per_epoch)


def agree(metrics: dict, stop_requested: bool, device: str = "cpu") -> tuple[list[str], bool]:
    """What every rank must decide the same way after a step, in one collective: the metrics that are
    non-finite on any rank (sorted names), and whether any rank was asked to stop. `metrics` is empty for
    a skipped step."""
    import torch
    import torch.distributed as tdist

    names = sorted(metrics)
    values = torch.stack([metrics[n].float() for n in names]) if names else torch.zeros(0, device=device)
    stop = torch.tensor([float(stop_requested)], device=values.device)
    status = torch.cat([(~torch.isfinite(values)).float(), stop])
    tdist.all_reduce(status, op=tdist.ReduceOp.MAX)
    flags = status.tolist()
    return [n for n, flag in zip(names, flags[:-1], strict=True) if flag], flags[-1] > 0


def stop_at_reached(cfg, state: TrainState) -> bool:
    return cfg.train.stop_at_step is not None and state.global_step >= cfg.train.stop_at_step


def checkpoint_reason(cfg, state: TrainState, stop: bool, epoch_done: bool) -> str | None:
    """Why the step that just ended saves a checkpoint (the first reason that applies), or None.
    `state` is already past the step (and into the next epoch when `epoch_done`)."""
    reasons = (
        ("preemption signal", stop),
        ("finished", state.epoch >= cfg.train.epochs),
        ("stop_at_step", stop_at_reached(cfg, state)),
        ("epoch end", epoch_done),
        ("periodic", state.global_step % cfg.checkpoint.every_steps == 0),
        # The end of a rollback's skipped steps: the rollback is on disk before anything is trained again.
        ("rollback", bool(state.rollbacks) and state.global_step == state.rollbacks[-1]["skipped"][-1]),
    )
    return next((name for name, due in reasons if due), None)


class MetricsWindow:
    """The metrics of the steps since the last report, summed on the device (read once per report), and the
    time spent in each engine's steps."""

    def __init__(self, device: str):
        import torch

        from clmae.step import StepTimer

        self.timer = StepTimer(torch.device(device))
        self._reset()

    def discard(self) -> None:
        """Forget the window (the steps a rollback undid), timings included."""
        self.timer.read()
        self._reset()

    def _reset(self) -> None:
        self.sums: dict = {}
        self.counts: dict[str, int] = {}  # steps that gave each metric (the CMM's: masking.cmm_every)
        self.steps = 0
        self.masking_steps = 0  # steps in which the masking strategy took its own step
        self.start = time.perf_counter()

    def add(self, metrics: dict, masking_step: bool = True) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0) + value.float()
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1
        self.masking_steps += masking_step

    def report(self, run: Setup, state: TrainState) -> dict[str, float]:
        """Each metric's mean over the window and the ranks (one all_reduce), then throughput, TFLOP/s,
        MFU, learning rates and progress; starts a new window."""
        import torch
        import torch.distributed as tdist

        names = sorted(self.sums)
        summed = torch.stack([self.sums[n] / self.counts[n] for n in names])
        tdist.all_reduce(summed)
        world, engines = run.env.world_size, run.engines
        report = dict(zip(names, (summed / world).tolist(), strict=True))
        elapsed = time.perf_counter() - self.start
        mae_seconds, masking_seconds = self.timer.read()
        images_done = self.steps * engines.global_batch
        report["perf/images_per_s"] = images_done / elapsed
        report["perf/mae_tflops"] = run.flops["mae"] * images_done / world / mae_seconds / 1e12
        if run.cfg.train.peak_tflops:
            report["perf/mae_mfu"] = report["perf/mae_tflops"] / run.cfg.train.peak_tflops
        if engines.masking:
            report["perf/cmm_step_share"] = masking_seconds / (mae_seconds + masking_seconds)
        report.update(engines.lrs())
        report["progress/epoch"] = state.epoch + state.step_in_epoch / run.steps_per_epoch
        self._reset()
        return report


def save(run: Setup, state: TrainState, reason: str) -> None:
    """A checkpoint of every engine and of `state` (collective: every rank calls it)."""
    from clmae import checkpoint, dist

    cfg = run.cfg
    client = checkpoint.ClientState(
        epoch=state.epoch,
        step_in_epoch=state.step_in_epoch,
        global_step=state.global_step,
        world_size=run.env.world_size,
        mlflow_run_id=run.tracker.run_id,
        config=cfg.to_dict(),
        curriculum_lambda=last_lambda(cfg, state, run.steps_per_epoch),
        skip_steps=state.skip_steps,
        rollbacks=state.rollbacks,
    )
    path = checkpoint.save(run.run_dir, run.engines.as_dict(), client, cfg.checkpoint.keep_last)
    dist.log(f"checkpoint ({reason}): {path}")


def record_curriculum(run: Setup, state: TrainState) -> None:
    """At an epoch boundary (after `state.epoch` epochs): the masks' statistics on the fixed validation images,
    and every tracking.mask_images_every_epochs (and at the end) their picture labelled with the epoch and the
    lambda the masking module last trained with; to MLflow and to <run_dir>/curriculum/, which checkpoint
    pruning never touches (clmae-viz curriculum draws it). Collective under ZeRO-3: every rank calls it."""
    import torch

    from clmae.viz import curriculum_label, label_band, mask_statistics, render_masks, save_curriculum_snapshot

    cfg, engines = run.cfg, run.engines
    scorer = engines.strategy.scorer(engines.masking_module)
    lam = last_lambda(cfg, state, run.steps_per_epoch)
    # A picture draws masks (random ones, or the tie-break's order): from a forked RNG, so that training does not
    # depend on whether or how often pictures are taken.
    devices = [torch.device(run.env.device)] if run.env.device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        picture = None
        if state.epoch % cfg.tracking.mask_images_every_epochs == 0 or state.epoch == cfg.train.epochs:
            picture = render_masks(engines.mae.module, scorer, run.val_images, cfg.model.norm_pix_loss)
            picture = label_band(picture, curriculum_label(state.epoch, lam))
            run.tracker.log_image(picture, f"masks/epoch_{state.epoch:05d}.png")
        stats = None
        if scorer is not None:
            stats = mask_statistics(engines.mae.module, scorer, run.val_images, cfg.model.norm_pix_loss)
    if run.env.is_main:
        save_curriculum_snapshot(run.run_dir, state.epoch, lam, stats, picture)


# ---- set up: data, models, engines, resume, tracking ---------------------------------------------------


def set_up(cfg, env) -> tuple[Setup, TrainState]:
    """Everything before the first step, in an order that keeps the RNG streams of a resumed run identical
    to an uninterrupted one's. Returns the setup and the state to start from (restored on resume)."""
    import torch

    from clmae import checkpoint, dist, elastic
    from clmae.masking import iteration_flops

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    device = torch.device(env.device)
    resume_from = checkpoint.resolve_resume(cfg, run_dir)
    saved = checkpoint.read_client_state(resume_from) if resume_from else None
    plan = None
    if saved is not None:
        checkpoint.check_compatible(saved, cfg, resume_from)
        plan = elastic.prepare(saved, cfg, env.world_size, resume_from)  # another world size or global batch
        cfg = plan.apply(cfg)  # the accumulation this world size needs; saved with the next checkpoint
    loader, steps_per_epoch = _pretrain_loader(cfg, env, device)

    resharded = plan is not None and plan.resharded
    engines = initial_engines(cfg, env, steps_per_epoch, init_from=saved is None, resharded=resharded)

    state, run_id = TrainState(skip_steps=sorted(set(cfg.train.skip_steps))), None
    if saved is not None:
        restored = checkpoint.load(
            resume_from, engines.as_dict(), resharded=resharded, load_schedules=not plan.batch_changed
        )
        epoch, step_in_epoch = elastic.after_load(
            plan, engines.as_dict(), cfg.run.seed, env.rank, restored, steps_per_epoch
        )
        skip = sorted(set(cfg.train.skip_steps) | set(restored.skip_steps))  # the config may add more
        state = TrainState(epoch, step_in_epoch, restored.global_step, skip, restored.rollbacks)
        run_id = restored.mlflow_run_id
        dist.log(
            f"resumed from {resume_from} (epoch {state.epoch}, step {state.step_in_epoch} of it, "
            f"global step {state.global_step})"
        )
    tracker = _start_tracking(cfg, env, run_dir, engines, steps_per_epoch, run_id)
    if engines.masking_module is not None:
        from clmae.losses import kl_weight_warning
        from clmae.masking import masking_batch_size

        warning = kl_weight_warning(cfg.loss, masking_batch_size(cfg, cfg.data.batch_size))
        if warning:
            dist.log(f"warning: {warning}")
    if plan is not None:
        elastic.announce(plan, saved.config["train"]["accum_steps"], state.global_step, state.epoch, tracker)
    val_images = _mask_picture_images(cfg, device) if cfg.tracking.mask_images_every_epochs else None
    flops = iteration_flops(cfg)
    run = Setup(cfg, env, run_dir, loader, steps_per_epoch, engines, tracker, val_images, flops, saved is None)
    return run, state


def initial_engines(cfg, env, steps_per_epoch: int, init_from: bool = True, resharded: bool = False):
    """The models at the run's initial state (from run.seed; checkpoint.init_from loaded when `init_from`) on
    their engines, and the per-rank RNG stream seeded: what step 1 starts from. `resharded`: a checkpoint of
    another world size is about to be loaded into them (clmae.elastic)."""
    import torch

    from clmae import dist
    from clmae.ds_engines import build_engines
    from clmae.masking import build_models
    from clmae.weights import load_mae_weights

    device = torch.device(env.device)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    mae, module = build_models(cfg)
    if cfg.checkpoint.init_from and init_from:
        load_mae_weights(mae, cfg.checkpoint.init_from)
        dist.log(f"MAE initialised from {cfg.checkpoint.init_from}")
    module = module.to(device) if module is not None else None
    engines = build_engines(cfg, mae.to(device), module, steps_per_epoch, env.world_size, resharded)
    torch.manual_seed(cfg.run.seed * 1000 + env.rank)  # per-rank stream for random masking
    return engines


def _pretrain_loader(cfg, env, device):
    from clmae.config import ConfigError
    from clmae.data import build_pretrain_loader

    loader = build_pretrain_loader(cfg, env, device)
    steps_per_epoch = loader.batches_per_epoch // cfg.train.accum_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} x train.accum_steps={cfg.train.accum_steps} x {env.world_size} "
            f"ranks needs more than the {loader.num_images} images of {cfg.data.train_path}"
        )
    return loader, steps_per_epoch


def _start_tracking(cfg, env, run_dir: Path, engines, steps_per_epoch: int, run_id: str | None):
    """The MLflow run (resumed when `run_id` is set); the config files as artifacts of a new one."""
    from clmae import dist
    from clmae.config import save_config
    from clmae.tracking import Tracker, redact_uri

    tracker = Tracker(cfg, run_dir, env.is_main, run_id)
    if env.is_main:
        config_path = save_config(cfg, run_dir / "config.yaml")
        if run_id is None:
            tracker.log_artifact(config_path)
            tracker.log_artifact(_write_json(run_dir / "ds_config.json", engines.ds_config))
    dist.log(
        f"{cfg.model.name} ({cfg.masking.mode} masking{_masking_note(cfg, engines)}), "
        f"{env.world_size} ranks ({env.launcher}, {env.backend}), "
        f"global batch {engines.global_batch}, {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, "
        f"run directory {run_dir.resolve()}, "
        + (f"MLflow {redact_uri(tracker.uri)} run {tracker.run_id}{tracker.note}" if tracker.active else "MLflow off")
    )
    return tracker


def _masking_note(cfg, engines) -> str:
    """What the start line says of the cheaper curriculum's settings; "" with the paper's (the defaults)."""
    from clmae.masking import masking_batch_size

    if not engines.masking:
        return ""
    parts = []
    if cfg.masking.cmm_every > 1:
        parts.append(f"its step on 1 iteration in {cfg.masking.cmm_every}")
    used = masking_batch_size(cfg, cfg.data.batch_size)
    if used < cfg.data.batch_size:
        parts.append(f"on {used} of {cfg.data.batch_size} images per micro-batch")
    if cfg.curriculum.granularity == "step":
        parts.append("lambda per step")
    return "; " + ", ".join(parts) if parts else ""


def _mask_picture_images(cfg, device):
    """The same images at every picture (the first of the validation file, on every rank: under ZeRO-3 the
    forward is collective) so that the pictures show the masks change over training."""
    from clmae import dist
    from clmae.data import build_eval_loader

    first_batches = build_eval_loader(cfg, dist.DistEnv.single(), device).iterate_epoch(0)
    images = next(first_batches)[0][:8].clone()
    first_batches.close()
    return images


def _format_report(step: int, epoch: int, report: dict[str, float], strategy) -> str:
    """The console's line of a report; `strategy`'s part only when given (its step was in the window)."""
    parts = [f"step {step} (epoch {epoch})", f"mae {report['mae/loss']:.4f}"]
    if strategy is not None:
        parts += strategy.report(report)
    parts.append(f"lr {report['lr/mae']:.2e}")
    parts.append(f"{report['perf/images_per_s']:.1f} img/s")
    parts.append(f"{report['perf/mae_tflops']:.2f} TFLOP/s (MAE step)")
    if "perf/mae_mfu" in report:
        parts.append(f"MFU {100 * report['perf/mae_mfu']:.1f}%")
    return " | ".join(parts)


def _write_json(path: Path, data: dict) -> Path:
    import json

    from clmae.files import write_atomic

    return write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
