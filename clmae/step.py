"""One optimiser step of every engine on the same images (SPEC section 6), and the timer of its parts.

Imported by the training loop (clmae/train.py), the benchmarks and the tests, without the command line.
"""

from __future__ import annotations

import time

import torch

from clmae.ds_engines import Engines
from clmae.masking import accumulate, masking_images
from clmae.method import mae_step


def optimizer_step(
    engines: Engines,
    micro_batches: list[torch.Tensor],
    lam: float,
    cfg,
    timer: StepTimer | None = None,
    poison_mae_loss: bool = False,
    masking_step: bool = True,
) -> dict[str, torch.Tensor]:
    """One optimiser step of each engine on the same images; returns the metrics ({"mae/loss"} and the
    masking strategy's, e.g. {"cmm/<term>"}), detached, averaged over the micro-batches, and each engine's
    gradient norm ({"grad_norm/mae", "grad_norm/cmm"}): 0-d tensors on the device, nothing read on the host.

    micro_batches: train.accum_steps tensors (B, 3, H, W). The MAE accumulates over all of them and steps,
    then the masking strategy takes its own step (the CMM accumulates over the same images against the
    updated MAE and steps): the same order as one large batch. (Interleaving the two per micro-batch would
    let the first CMM micro-steps see the MAE from before its update and the last one after it.)
    lam: the curriculum factor of this step. poison_mae_loss: make the MAE loss NaN (fault injection for
    the NaN guard's test, clmae/faults.py). masking_step: whether the masking strategy takes its step on this
    iteration (clmae.masking.masking_step_due); when it does, on masking.cmm_batch_fraction of each
    micro-batch. Without it, the strategy's metrics and gradient norm are absent from the result.
    """
    totals: dict[str, torch.Tensor] = {}
    scorer = engines.strategy.scorer(engines.masking_module)
    if timer is not None:
        timer.start()
    for images in micro_batches:
        # MAE step: hard masks from the strategy's scorer (no_grad inside the MAE's forward).
        mae_loss, _ = mae_step(engines.mae, scorer, images, cfg)
        if poison_mae_loss:
            mae_loss = mae_loss * float("nan")
        engines.mae.backward(mae_loss)
        engines.mae.step()  # DeepSpeed applies the update at the last micro-batch only
        # Log what was backpropagated, so that the NaN guard sees exactly that.
        accumulate(totals, {"mae/loss": mae_loss}, len(micro_batches))
    if timer is not None:
        timer.mae_done()
    if masking_step:
        totals.update(engines.strategy.step(engines, [masking_images(cfg, images) for images in micro_batches], lam))
    if timer is not None:
        timer.cmm_done()
    stepped = engines.as_dict() if masking_step else {"mae": engines.mae}
    for name, engine in stepped.items():
        norm = grad_norm(engine, device=totals["mae/loss"].device)
        if norm is not None:
            totals[f"grad_norm/{name}"] = norm
    return totals


def grad_norm(engine, device: torch.device) -> torch.Tensor | None:
    """The global gradient norm of the engine's last step (before clipping), NaN where a gradient was not
    finite; None where DeepSpeed computes none (`zero_optimization.compute_grad_norm: false`) and for fp16.

    This is how the NaN guard (train.on_nonfinite) sees a non-finite gradient under a finite loss: the bf16
    configs turn DeepSpeed's per-tensor overflow check off (`bf16.check_grad_overflow: false`, a dozen kernels
    per parameter tensor), and the norm, computed anyway, carries the same information in one number.
    DeepSpeed reports a non-finite norm as -1 (ZeRO 1-3) or as float inf (a skipped bf16 ZeRO-1 step).
    """
    value = engine.get_global_grad_norm()
    if value is None or engine.fp16_enabled():
        # fp16's dynamic loss scaling skips a step whose gradients overflowed and lowers the scale: by design,
        # not a divergence, so fp16 runs leave gradient norms out of the guard (and of the metrics).
        return None
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    return torch.where(value >= 0, value, torch.full_like(value, float("nan")))


class StepTimer:
    """Time spent in the MAE step and the CMM step. CUDA events on GPU (no sync until read), wall clock
    on CPU, where every op has finished when it returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        self.mae_seconds = self.cmm_seconds = 0.0

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
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
            torch.cuda.synchronize()
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

