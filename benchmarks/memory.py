"""Peak memory of one iteration: plain MAE against CL-MAE, per model.

The iteration is step_cost.py's (benchmarks/_common.py): the MAE step (clmae.method.mae_step) and, for CL-MAE,
the CMM step (clmae.method.cmm_step) on the same batch, each module with its own AdamW, fp32 weights (--bf16:
bf16 autocast). Each (model, method) runs in a fresh process, because a process's peak RSS only grows; plain MAE
builds the MAE alone (no CMM weights). Memory is the process's RSS on CPU (peak: VmHWM, reset before the part
measured; the kernel's ru_maxrss where it cannot be reset) and the bytes allocated by tensors on CUDA
(torch.cuda.memory_allocated / max_memory_allocated after reset_peak_memory_stats).

What each number includes:
- built: the memory once the models, their (empty) AdamW and the batch exist. On CPU this is the whole
  process: Python, the torch/timm libraries and the fp32 weights; on CUDA the weights and the batch.
  No gradients and no AdamW state yet: AdamW allocates its state lazily, at its first step.
- AdamW: the optimiser state that first step allocates (exp_avg and exp_avg_sq: 2x the trained parameters,
  counted exactly from the state tensors).
- baseline = built + AdamW: what stays resident between iterations (weights + optimiser state).
- peak: the highest memory during the measured iterations, which run after a first, unmeasured one (the one
  that allocates the AdamW state): weights, AdamW state, gradients, activations and temporaries, and on CPU
  what the allocator holds on to. The first iteration peaks lower (its AdamW state appears at the step, after
  the activations are freed); its peak is in the JSON (first_iteration_peak).
- per-iteration increase = peak - baseline: what one iteration adds on top of weights and optimiser state
  (gradients, activations, temporaries; on CPU also allocator slack).
- CL-MAE/MAE: the CL-MAE row's peak and increase over the plain MAE's, for the same model.

    python benchmarks/memory.py    # = --models vit_tiny vit_base_patch16 --batch-size 8 --iters 2

The default run took 4 min 50 s on 2 shared CPU cores (7 min under heavier load), ViT-B's CL-MAE process about
3 min of it; the RSS figures vary by about 5 % between runs (what glibc's allocator keeps).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
from _common import (
    add_iteration_arguments,
    build_iterations,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_in_fresh_process,
    synchronize,
)

METHODS = ("mae", "clmae")
LABELS = {"mae": "MAE", "clmae": "CL-MAE"}
MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_iteration_arguments(parser, iters=2, iters_help="measured iterations, after a first unmeasured one")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    # Internal: measure one (model, method) in this process and write the result to a JSON file.
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def measure(name: str, method: str, batch_size: int, iters: int, device: torch.device, bf16: bool) -> dict:
    """One (model, method) in this (fresh) process; bytes."""
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)

    def current() -> int:
        return torch.cuda.memory_allocated(device) if cuda else rss_bytes()

    def reset_peak() -> bool:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            return True
        return reset_peak_rss()

    def peak() -> int:
        return torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()

    bench = build_iterations(name, batch_size, device, bf16, with_cmm=method == "clmae")
    iteration = bench.clmae_iteration if method == "clmae" else bench.mae_iteration
    gc.collect()
    synchronize(device)
    built = current()

    peak_was_reset = reset_peak()
    iteration()  # the first step of each AdamW allocates its state
    synchronize(device)
    first_peak = peak()
    adamw = bench.optimizer_state_bytes()
    after_first = current()

    peak_was_reset = reset_peak() and peak_was_reset
    for _ in range(iters):
        iteration()
    synchronize(device)
    measured_peak = peak()
    baseline = built + adamw
    return {
        "model": name,
        "method": method,
        "device": str(device),
        "batch_size": batch_size,
        "iters": iters,
        "bf16": bf16,
        "memory": "allocated" if cuda else "rss",
        "params": bench.num_params(),
        "built": built,
        "adamw_state": adamw,
        "baseline": baseline,
        "first_iteration_peak": first_peak,
        "after_first_iteration": after_first,
        "peak": measured_peak,
        "per_iteration_increase": measured_peak - baseline,
        "peak_was_reset": peak_was_reset,
    }


def run_fresh(name: str, method: str, args: argparse.Namespace) -> dict:
    """`measure` in a new Python process (a process's peak RSS never goes down)."""
    command = ["--worker", name, method, "--batch-size", str(args.batch_size), "--iters", str(args.iters)]
    command += ["--device", args.device] + (["--bf16"] if args.bf16 else [])
    record, code, output = run_in_fresh_process(os.path.abspath(__file__), command)
    if code != 0 or record is None:
        sys.exit(f"error: {name} {method} failed (exit {code}):\n{output}")
    return record


def print_table(rows: list[dict]) -> None:
    kind = "allocated" if rows[0]["memory"] == "allocated" else "RSS"
    print(
        f"{'model':<18} {'method':<7} {'params M':>8} {'built':>8} {'+AdamW':>8} {'baseline':>9} {'peak':>8} "
        f"{'per-iter +':>10} {'peak x':>7} {'per-iter x':>10}"
    )
    mae_rows = {row["model"]: row for row in rows if row["method"] == "mae"}
    for row in rows:
        ratios = f"{'':>7} {'':>10}"
        ref = mae_rows.get(row["model"])
        if row["method"] == "clmae" and ref is not None:
            ratios = (
                f"{row['peak'] / ref['peak']:>7.2f} "
                f"{row['per_iteration_increase'] / ref['per_iteration_increase']:>10.2f}"
            )
        print(
            f"{row['model']:<18} {LABELS[row['method']]:<7} {row['params'] / 1e6:>8.1f} {row['built'] / MIB:>8.0f} "
            f"{row['adamw_state'] / MIB:>8.0f} {row['baseline'] / MIB:>9.0f} {row['peak'] / MIB:>8.0f} "
            f"{row['per_iteration_increase'] / MIB:>10.0f} {ratios}"
        )
    process = " + Python and libraries" if kind == "RSS" else ""
    print(
        f"MiB of {kind}. built: models + empty AdamW + batch{process}; +AdamW: the state of AdamW's first step;\n"
        "baseline = built + AdamW; peak: the highest during the measured iterations (after a first one);\n"
        "per-iter + = peak - baseline (gradients, activations, temporaries); x: CL-MAE / MAE, same model."
    )
    if not all(row["peak_was_reset"] for row in rows):
        print("note: the peak could not be reset here, so it is the process's lifetime peak (ru_maxrss)")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.worker:
        name, method = args.worker
        record = measure(name, method, args.batch_size, args.iters, device, args.bf16)
        args.result.write_text(json.dumps(record))
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device is visible; use --device cpu")
    print(f"device={device} batch={args.batch_size} iters={args.iters} bf16={args.bf16} (one process per row)")
    rows = []
    start = time.perf_counter()
    for name in args.models:
        for method in METHODS:
            row_start = time.perf_counter()
            rows.append(run_fresh(name, method, args))
            rows[-1]["seconds"] = time.perf_counter() - row_start
            print(f"  {name} {LABELS[method]}: {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    print_table(rows)
    print(f"took {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
