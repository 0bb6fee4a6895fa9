"""What the benchmark scripts share: the plain-torch MAE / CL-MAE iteration and process memory readings.

`build_iterations` is the iteration that step_cost.py times and memory.py measures: the MAE step
(clmae.method.mae_step) and, for CL-MAE, the CMM step (clmae.method.cmm_step), each module with its own AdamW,
forward + backward + step + zero_grad(set_to_none=True). The scripts import this file by name, which works when
they are run by path (`python benchmarks/NAME.py` puts benchmarks/ first on sys.path).
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clmae.config import Config, load_config
from clmae.masking import build_models
from clmae.method import cmm_step, mae_step

# The launcher variables that clmae.dist.detect reads: a benchmark's worker sees none, so it is a single process.
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
)


def add_iteration_arguments(parser, iters: int, iters_help: str) -> None:
    """The options of the scripts that run `build_iterations`: which models, what batch, which device."""
    from clmae.config import MODEL_NAMES

    parser.add_argument("--models", nargs="+", default=["vit_tiny", "vit_base_patch16"], choices=MODEL_NAMES)
    parser.add_argument("--batch-size", type=int, default=8, help="images per iteration")
    parser.add_argument("--iters", type=int, default=iters, help=iters_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (for CUDA; slow on most CPUs)")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adamw(module: nn.Module) -> torch.optim.AdamW:
    """The benchmarks' optimiser: AdamW with the recipe's betas and weight decay (its state is allocated
    lazily, at the first step)."""
    return torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


@dataclass
class Iterations:
    """The models, optimisers and batch of one benchmark, and its two kinds of iteration."""

    cfg: Config
    mae: nn.Module
    cmm: nn.Module | None
    optimizers: list[torch.optim.Optimizer]
    imgs: Tensor
    mae_iteration: Callable[[], None]  # plain MAE: random masks, MAE step
    clmae_iteration: Callable[[], None] | None  # CL-MAE: MAE step on the CMM's hard masks, then the CMM step

    def optimizer_state_bytes(self) -> int:
        """Bytes held by the optimisers' state tensors (AdamW: exp_avg, exp_avg_sq, step; none before a step)."""
        return sum(
            value.numel() * value.element_size()
            for optimizer in self.optimizers
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, Tensor)
        )

    def num_params(self) -> int:
        return sum(p.numel() for module in (self.mae, self.cmm) if module is not None for p in module.parameters())


def build_iterations(
    name: str, batch_size: int, device: torch.device, bf16: bool = False, with_cmm: bool = True
) -> Iterations:
    """Models (seeded), one AdamW per module and a random batch on `device`.

    with_cmm=False builds the plain MAE alone (masking.mode=random): no CMM weights, no `clmae_iteration`.
    bf16: bf16 autocast around each forward (fp32 weights and optimiser state).
    """
    overrides = [f"model.name={name}"] + ([] if with_cmm else ["masking.mode=random"])
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.run.seed)
    mae, cmm = build_models(cfg)
    mae = mae.to(device)
    cmm = cmm.to(device) if cmm is not None else None
    mae_opt = adamw(mae)
    cmm_opt = adamw(cmm) if cmm is not None else None
    size = mae.patch_embed.img_size[0]
    imgs = torch.randn(batch_size, 3, size, size, device=device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def train(step: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> None:
        with autocast():
            loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mae_iteration() -> None:
        train(lambda: mae_step(mae, None, imgs, cfg)[0], mae_opt)

    def clmae_iteration() -> None:
        train(lambda: mae_step(mae, cmm, imgs, cfg)[0], mae_opt)
        train(lambda: cmm_step(mae, cmm, imgs, 1.0, cfg)[0], cmm_opt)

    return Iterations(
        cfg=cfg,
        mae=mae,
        cmm=cmm,
        optimizers=[mae_opt] if cmm_opt is None else [mae_opt, cmm_opt],
        imgs=imgs,
        mae_iteration=mae_iteration,
        clmae_iteration=clmae_iteration if cmm is not None else None,
    )


def run_in_fresh_process(
    script: str, worker_args: list[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> tuple[dict | None, int, str]:
    """Run `script` with `worker_args` + `--result FILE` in a new Python process, so that no memory carries
    over between measurements. Returns (the JSON the worker wrote to FILE, or None; its exit code; the tail
    of its output). The result is read even after a non-zero exit: a crash while exiting does not void it.
    Raises subprocess.TimeoutExpired after `timeout` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, script, *worker_args, "--result", str(result)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        record = json.loads(result.read_text()) if result.is_file() else None
        return record, proc.returncode, (proc.stdout + proc.stderr)[-4000:]


# --------------------------------------------------------------------------------------------------
# Process memory (Linux). RSS peaks are per process and only grow: measure each configuration in a
# fresh process, and reset the peak (where the kernel allows) before the part being measured.
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def rss_bytes() -> int:
    """This process's resident set size now."""
    kib = _status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("no VmRSS in /proc/self/status (the memory readings need Linux)")
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it
    (Linux >= 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the reset took (within 1 MiB of RSS)


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak_rss` (VmHWM), else since the process started (ru_maxrss)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; never reset
    return kib * 1024


# --------------------------------------------------------------------------------------------------
# The plain PyTorch step: what clmae's engines are measured against (step_overhead.py, gpu_throughput.py).
# --------------------------------------------------------------------------------------------------


class PlainStep:
    """One optimiser step of each module written plainly, the way the MAE reference trains: fp32 weights,
    bf16 autocast around each forward (`bf16`), fused AdamW (one kernel for all tensors), clipping with one
    foreach norm, gradients set to None after the step. The same models, parameter groups, learning rate,
    betas and `optim.clip_grad` as clmae's engines (clmae.ds_engines), on one process, no data parallelism.

    The iteration is the training loop's: the MAE step on the masking strategy's hard masks, then, for CL-MAE,
    the CMM step through the frozen MAE (clmae.method).
    """

    def __init__(self, cfg: Config, mae: nn.Module, cmm: nn.Module | None, bf16: bool, global_batch: int):
        from clmae.ds_engines import param_groups, peak_lr

        self.cfg, self.mae, self.cmm, self.bf16 = cfg, mae, cmm, bf16
        self.device = next(mae.parameters()).device
        # CPU has a fused AdamW too (torch >= 2.4): one op per step there as on CUDA, so op counts match.
        self.parts = [(mae, cfg.optim)] + ([(cmm, cfg.cmm_optim_resolved())] if cmm is not None else [])
        self.optimizers = [
            torch.optim.AdamW(
                param_groups(module, opt.weight_decay, opt.no_decay_names),
                lr=peak_lr(opt, global_batch),
                betas=tuple(opt.betas),
                fused=True,
            )
            for module, opt in self.parts
        ]

    def _update(self, loss: Tensor, index: int) -> None:
        module, opt = self.parts[index]
        loss.backward()
        if opt.clip_grad > 0:
            params = [p for p in module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, opt.clip_grad, foreach=True)
        self.optimizers[index].step()
        self.optimizers[index].zero_grad(set_to_none=True)

    def __call__(self, images: Tensor, lam: float = 1.0) -> None:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with autocast:
            loss, _ = mae_step(self.mae, self.cmm, images, self.cfg)
        self._update(loss, 0)
        if self.cmm is not None:
            with autocast:
                loss, _ = cmm_step(self.mae, self.cmm, images, lam, self.cfg)
            self._update(loss, 1)
