"""`clmae-pretrain`: CL-MAE pre-training, launched by torchrun, the deepspeed launcher or srun.

    torchrun --nproc_per_node 2 -m clmae.train --config tiny_digits
    srun --ntasks-per-node 8 clmae-pretrain --config vith data.batch_size=128

`train()` below is the whole procedure, top to bottom: set up, resume, then for every iteration one
MAE step and one masking-module step on the same batch (SPEC section 6), with metrics, checkpoints
and preemption handled at optimiser-step boundaries.

Exit codes: 0 finished (or `train.stop_at_step` reached), 75 preempted and checkpointed (the SLURM
scripts requeue on it), 2 bad input, 1 a crash or a diverged loss.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from pathlib import Path

import yaml

from clmae.cli import add_config_arguments, run_main

EXIT_REQUEUE = 75  # sysexits EX_TEMPFAIL: "try again later", what a preempted run asks of its scheduler

# Set by SIGUSR1 / SIGTERM and read at step boundaries, where no collective is in flight. The handler
# is installed before the heavy imports, so that an early signal never kills a rank outright.
_stop_signal: list[int] = []


def _request_stop(signum, _frame) -> None:
    _stop_signal.append(signum)


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
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _request_stop)
    # DeepSpeed 0.19 calls a torch collective that torch 2.14 deprecates, once per step per rank.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    run_main(_main)


def _main() -> int:
    args = build_parser().parse_args()
    from clmae.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    return train(cfg)


def train(cfg) -> int:
    import torch
    import torch.distributed as tdist

    from clmae import checkpoint, dist, elastic, faults
    from clmae.config import save_config
    from clmae.curriculum import curriculum_factor
    from clmae.data import build_eval_loader, build_pretrain_loader
    from clmae.engine import build_engines
    from clmae.method import iteration_flops
    from clmae.models import build_models
    from clmae.tracking import Tracker, redact_uri
    from clmae.viz import render_masks

    env = dist.init(cfg.dist.backend, cfg.dist.timeout_minutes)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    tracker = None
    try:
        # ---- set up: data, models, engines, resume, tracking ------------------------------------------
        device = torch.device(env.device)
        resume_from = checkpoint.resolve_resume(cfg, run_dir)
        saved = checkpoint.read_client_state(resume_from) if resume_from else None
        plan = None
        if saved is not None:
            checkpoint.check_compatible(saved, cfg, resume_from)
            plan = elastic.plan_resume(saved, cfg, env.world_size, resume_from)
            cfg = plan.apply(cfg)  # the accumulation this world size needs; saved with the next checkpoint
            if plan.batch_changed:
                new_step_in_epoch = elastic.step_in_new_batch(plan, saved.step_in_epoch, resume_from)
            if plan.resharded:
                elastic.convert_to_universal(resume_from)

        loader = build_pretrain_loader(cfg, env, device)
        accum = cfg.train.accum_steps
        steps_per_epoch = loader.batches_per_epoch // accum
        if steps_per_epoch < 1:
            raise checkpoint.ConfigError(
                f"data.batch_size={cfg.data.batch_size} x train.accum_steps={accum} x {env.world_size} ranks "
                f"needs more than the {loader.num_images} images of {cfg.data.train_path}"
            )

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        mae, cmm = build_models(cfg)
        if cfg.checkpoint.init_from and saved is None:
            checkpoint.load_mae_weights(mae, cfg.checkpoint.init_from)
            dist.log(f"MAE initialised from {cfg.checkpoint.init_from}")
        resharded = plan is not None and plan.resharded
        engines = build_engines(
            cfg, mae.to(device), cmm.to(device) if cmm else None, steps_per_epoch, env.world_size, resharded
        )
        torch.manual_seed(cfg.run.seed * 1000 + env.rank)  # per-rank stream for random masking

        epoch, step_in_epoch, global_step, run_id = 0, 0, 0, None
        if saved is not None:
            state = checkpoint.load(
                resume_from, engines.as_dict(), resharded=resharded, load_schedules=not plan.batch_changed
            )
            epoch, step_in_epoch, global_step, run_id = (
                state.epoch,
                state.step_in_epoch,
                state.global_step,
                state.mlflow_run_id,
            )
            dist.log(
                f"resumed from {resume_from} (epoch {epoch}, step {step_in_epoch} of it, global step {global_step})"
            )
            if resharded:
                elastic.reseed_rank_streams(cfg.run.seed, env.rank, global_step)
            if plan.batch_changed:
                step_in_epoch = new_step_in_epoch
                elastic.restart_schedules(engines.as_dict(), epoch * steps_per_epoch + step_in_epoch)

        tracker = Tracker(cfg, run_dir, env.is_main, run_id)
        if plan is not None and (plan.resharded or plan.batch_changed):
            change = elastic.describe(plan, saved.config["train"]["accum_steps"], global_step, epoch)
            dist.log(change)
            tracker.set_tags({f"resharded.step_{global_step:09d}": change, "world_size": str(env.world_size)})
        if env.is_main:
            config_path = save_config(cfg, run_dir / "config.yaml")
            if run_id is None:
                tracker.log_artifact(config_path)
                tracker.log_artifact(_write_json(run_dir / "ds_config.json", engines.ds_config))
        dist.log(
            f"{cfg.model.name} ({cfg.masking.mode} masking), {env.world_size} ranks ({env.launcher}, {env.backend}), "
            f"global batch {engines.global_batch}, {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, "
            f"run directory {run_dir.resolve()}, "
            + (f"MLflow {redact_uri(tracker.uri)} run {tracker.run_id}" if tracker.active else "MLflow off")
        )
        val_images = None
        if cfg.tracking.mask_images_every_epochs:
            # The same images at every picture (the first of the validation file, on every rank: under
            # ZeRO-3 the forward is collective) so that the pictures show the masks change over training.
            first_batches = build_eval_loader(cfg, dist.DistEnv.single(), device).iterate_epoch(0)
            val_images = next(first_batches)[0][:8].clone()
            first_batches.close()
        flops = iteration_flops(cfg)
        cmm_module = engines.cmm.module if engines.cmm is not None else None

        def save(reason: str) -> None:
            lam = curriculum_factor(
                min(epoch, cfg.train.epochs - 1), cfg.train.epochs, schedule=cfg.curriculum.schedule
            )
            client = checkpoint.ClientState(
                epoch=epoch,
                step_in_epoch=step_in_epoch,
                global_step=global_step,
                world_size=env.world_size,
                mlflow_run_id=tracker.run_id,
                config=cfg.to_dict(),
                curriculum_lambda=lam,
            )
            path = checkpoint.save(run_dir, engines.as_dict(), client, cfg.checkpoint.keep_last)
            dist.log(f"checkpoint ({reason}): {path}")

        def log_mask_picture() -> None:
            picture = render_masks(engines.mae.module, cmm_module, val_images, cfg.model.norm_pix_loss)
            tracker.log_image(picture, f"masks/epoch_{epoch:05d}.png")

        if epoch >= cfg.train.epochs:
            dist.log(f"nothing to do: the run already finished its {cfg.train.epochs} epochs")
            tracker.finish()
            return 0

        # ---- the loop ---------------------------------------------------------------------------------
        timer = _StepTimer(device)
        window: dict[str, torch.Tensor] = {}
        window_steps, window_start = 0, time.perf_counter()
        while epoch < cfg.train.epochs:
            if val_images is not None and step_in_epoch == 0 and epoch % cfg.tracking.mask_images_every_epochs == 0:
                log_mask_picture()
            batches = loader.iterate_epoch(epoch, skip_batches=step_in_epoch * accum)
            steps_left = range(step_in_epoch, steps_per_epoch)
            for _ in dist.progress(steps_left, total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}"):
                lam = curriculum_factor(
                    epoch,
                    cfg.train.epochs,
                    step_in_epoch / steps_per_epoch,
                    schedule=cfg.curriculum.schedule,
                    smooth=cfg.curriculum.smooth,
                )
                # Copied when accumulating: a CPU batch is a view into FFCV's ring buffers, which the
                # prefetcher refills while the first micro-batches wait for the last to be drawn.
                micro_batches = [next(batches)[0].to(engines.dtype, copy=accum > 1) for _ in range(accum)]
                poison = env.rank == env.world_size - 1 and faults.armed("nan_loss", global_step + 1)
                metrics = optimizer_step(engines, micro_batches, lam, cfg, timer, poison_mae_loss=poison)
                step_in_epoch += 1
                global_step += 1

                # One collective per step: which terms are non-finite on any rank, and whether any rank
                # was asked to stop. Both must be decided together by all ranks.
                names = sorted(metrics)
                values = torch.stack([metrics[n].float() for n in names])
                status = torch.cat([(~torch.isfinite(values)).float(), torch.tensor([float(bool(_stop_signal))])])
                tdist.all_reduce(status, op=tdist.ReduceOp.MAX)
                bad = [n for n, flag in zip(names, status[:-1].tolist(), strict=True) if flag]
                if bad:
                    raise TrainingDiverged(
                        f"non-finite loss at global step {global_step} (epoch {epoch}): {', '.join(bad)}; "
                        f"stopping without saving, the last good checkpoint stays 'latest' in "
                        f"{checkpoint.checkpoint_root(run_dir)}"
                    )
                for name, value in metrics.items():
                    window[name] = window.get(name, 0) + value.float()
                window_steps += 1

                if global_step % cfg.train.log_every == 0 or step_in_epoch == steps_per_epoch:
                    summed = torch.stack([window[n] for n in names]) / window_steps
                    tdist.all_reduce(summed)
                    report = dict(zip(names, (summed / env.world_size).tolist(), strict=True))
                    elapsed = time.perf_counter() - window_start
                    mae_seconds, cmm_seconds = timer.read()
                    images_done = window_steps * engines.global_batch
                    report["perf/images_per_s"] = images_done / elapsed
                    report["perf/mae_tflops"] = flops["mae"] * images_done / env.world_size / mae_seconds / 1e12
                    if cfg.train.peak_tflops:
                        report["perf/mae_mfu"] = report["perf/mae_tflops"] / cfg.train.peak_tflops
                    if engines.cmm is not None:
                        report["perf/cmm_step_share"] = cmm_seconds / (mae_seconds + cmm_seconds)
                    report.update(engines.lrs())
                    report.update(_grad_norms(engines))
                    report["progress/epoch"] = epoch + step_in_epoch / steps_per_epoch
                    tracker.log_metrics(report, step=global_step)
                    dist.log(_format_report(global_step, epoch, report))
                    window, window_steps, window_start = {}, 0, time.perf_counter()

                epoch_done = step_in_epoch == steps_per_epoch
                if epoch_done:
                    epoch, step_in_epoch = epoch + 1, 0
                finished = epoch >= cfg.train.epochs
                stop_now = status[-1].item() > 0
                stop_at = cfg.train.stop_at_step is not None and global_step >= cfg.train.stop_at_step
                reasons = [
                    ("preemption signal", stop_now),
                    ("finished", finished),
                    ("stop_at_step", stop_at),
                    ("epoch end", epoch_done),
                    ("periodic", global_step % cfg.checkpoint.every_steps == 0),
                ]
                reason = next((name for name, due in reasons if due), None)
                if reason is not None:
                    save(reason)
                if stop_now:
                    by = f"signal {_stop_signal[0]}" if _stop_signal else "a signal on another rank"
                    dist.log(f"stopped by {by}; exiting with {EXIT_REQUEUE} to be requeued")
                    tracker.finish("KILLED")
                    return EXIT_REQUEUE
                if stop_at:
                    dist.log(f"reached train.stop_at_step={cfg.train.stop_at_step}")
                    tracker.finish("KILLED")
                    return 0
                if epoch_done:
                    break
        if val_images is not None:
            log_mask_picture()
        dist.log(f"training finished: {cfg.train.epochs} epochs, {global_step} steps")
        tracker.finish()
        return 0
    except TrainingDiverged as err:
        dist.log(f"error: {err}")
        if tracker is not None:
            tracker.finish("FAILED")
        return 1
    finally:
        dist.shutdown()


def optimizer_step(
    engines, micro_batches: list, lam: float, cfg, timer: _StepTimer | None = None, poison_mae_loss: bool = False
) -> dict:
    """One optimiser step of each engine on the same images (SPEC section 6); returns the metrics
    ({"mae/loss", "cmm/<term>"}, detached), averaged over the micro-batches.

    micro_batches: train.accum_steps tensors (B, 3, H, W). The MAE accumulates over all of them and steps,
    then the CMM accumulates over the same images against the updated MAE and steps: the same order as
    one large batch. (Interleaving the two per micro-batch would let the first CMM micro-steps see the
    MAE from before its update and the last one after it.)
    poison_mae_loss: make the MAE loss NaN (fault injection for the NaN guard's test, clmae/faults.py).
    """
    from clmae.method import cmm_step, mae_step

    totals: dict = {}

    def accumulate(name, value):
        totals[name] = totals.get(name, 0) + value.detach() / len(micro_batches)

    if timer is not None:
        timer.start()
    for images in micro_batches:
        # MAE step: hard top-k masks of the (frozen, no_grad) masking module.
        mae_loss, _ = mae_step(engines.mae, engines.cmm.module if engines.cmm is not None else None, images, cfg)
        if poison_mae_loss:
            mae_loss = mae_loss * float("nan")
        engines.mae.backward(mae_loss)
        engines.mae.step()  # DeepSpeed applies the update at the last micro-batch only
        # Log what was backpropagated, so that the NaN guard sees exactly that.
        accumulate("mae/loss", mae_loss)
    if timer is not None:
        timer.mae_done()
    if engines.cmm is not None:
        for images in micro_batches:
            # CMM step: soft masks through the frozen MAE's plain module (see clmae/engine.py).
            cmm_loss, cmm_metrics = cmm_step(engines.mae.module, engines.cmm, images, lam, cfg)
            engines.cmm.backward(cmm_loss)
            engines.cmm.step()
            for name, value in cmm_metrics.items():
                accumulate(f"cmm/{name}", value)
    if timer is not None:
        timer.cmm_done()
    return totals


class _StepTimer:
    """Time spent in the MAE step and the CMM step. CUDA events on GPU (no sync until read), wall clock
    on CPU, where every op has finished when it returns."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.pending: list = []
        self.mae_seconds = self.cmm_seconds = 0.0

    def _mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.pending.append([self._mark()])

    def mae_done(self) -> None:
        self.pending[-1].append(self._mark())

    def cmm_done(self) -> None:
        self.pending[-1].append(self._mark())

    def read(self) -> tuple[float, float]:
        """Seconds in (MAE steps, CMM steps) since the last read."""
        if self.cuda:
            self.torch.cuda.synchronize()
        for start, mae_end, cmm_end in self.pending:
            if self.cuda:
                self.mae_seconds += start.elapsed_time(mae_end) / 1e3
                self.cmm_seconds += mae_end.elapsed_time(cmm_end) / 1e3
            else:
                self.mae_seconds += mae_end - start
                self.cmm_seconds += cmm_end - mae_end
        result = (max(self.mae_seconds, 1e-9), self.cmm_seconds)
        self.pending, self.mae_seconds, self.cmm_seconds = [], 0.0, 0.0
        return result


def _grad_norms(engines) -> dict[str, float]:
    norms = {}
    for name, engine in engines.as_dict().items():
        value = engine.get_global_grad_norm()
        if value is not None:
            norms[f"grad_norm/{name}"] = float(value)
    return norms


def _format_report(step: int, epoch: int, report: dict[str, float]) -> str:
    parts = [f"step {step} (epoch {epoch})", f"mae {report['mae/loss']:.4f}"]
    if "cmm/loss_cmm" in report:
        parts.append(f"cmm {report['cmm/loss_cmm']:.4f} (lambda {report['cmm/lambda']:+.2f})")
    parts.append(f"lr {report['lr/mae']:.2e}")
    parts.append(f"{report['perf/images_per_s']:.1f} img/s")
    parts.append(f"{report['perf/mae_tflops']:.2f} TFLOP/s (MAE step)")
    if "perf/mae_mfu" in report:
        parts.append(f"MFU {100 * report['perf/mae_mfu']:.1f}%")
    return " | ".join(parts)


def _write_json(path: Path, data: dict) -> Path:
    import json

    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


if __name__ == "__main__":
    main()
