"""MAE and CL-MAE training throughput on one GPU, through the real training engines.

Each iteration is the training loop's (clmae/train.py), with random images in place of the data loader: the MAE
step through the MAE's DeepSpeed engine (the CMM's no-grad hard masks for CL-MAE, uniform noise for plain MAE),
then, for CL-MAE, the CMM step through the CMM's engine with the MAE's plain module frozen. The engines come from
clmae.ds_engines.build_engines with ZeRO-2 (ds_configs/zero2_bf16.json, or zero2_fp32.json for --dtype fp32), in one
process whose process group clmae.dist.init sets up as for any single-process run. For each (model, method):

- images/s over --iters iterations after --warmup ones (torch.cuda.synchronize around the timed block);
- achieved TFLOP/s: the FLOPs per image of both steps, counted on the meta device by clmae.masking.iteration_flops
  (what the trainer's MFU uses; matmuls and attention, forward + backward), times images/s;
- MFU against the MEASURED matmul peak: the best of a few timed rounds of an N x N x N matmul in the same dtype
  (--matmul-size, 8192 on CUDA), after warm-up. This is what the GPU really reaches on large matmuls (it is
  below the data sheet's dense peak, e.g. 989 TFLOP/s bf16 for an H100 SXM, which train.peak_tflops uses);
- peak memory: torch.cuda.max_memory_allocated over the timed iterations (peak RSS with --device cpu);
- the plain PyTorch step beside it (benchmarks/_common.PlainStep: the same models and batch, fp32 weights, bf16
  autocast, fused AdamW), timed the same way in the same worker process after the engines are freed, and the
  ratio clmae / plain (above 1: clmae is faster); --no-plain skips it;
- with --search, the largest per-GPU batch that fits with ZeRO-2: the batch doubles from --batch-size until
  torch.cuda.OutOfMemoryError (or --max-batch), then a binary search between the last batch that fit and the
  first that did not (to a multiple of 8 above 64). A batch fits if two iterations complete; leave a margin for
  a long run. Every try (and every timed run) is a fresh Python process, so each starts with all GPU memory free.
  If --batch-size itself does not fit, the timed run halves it until it does.

--compile sets train.compile (torch.compile of each transformer block, clmae.models.compile_blocks) for both arms;
the warm-up iterations then include the compilation (`warmup_seconds` in --out).

On a GPU machine:

    python benchmarks/gpu_throughput.py --out gpu.json
    # = --models vit_base_patch16 vit_large_patch16 vit_huge_patch14 --dtype bf16 --batch-size 64 --iters 10
    python benchmarks/gpu_throughput.py --compile --out gpu_compiled.json

On one H200, the run without the plain arm took 64-65 s per model (2 workers: process start, engines, 13
iterations each); the plain arm runs in the same workers, so the default run (3 models, 2 methods, both arms) is
estimated at 2 to 3 minutes per model, 6 to 8 in all (not yet timed). The search makes about 5 to 12 more tries per
(model, method), each a fresh process: 20 to 30 minutes more for the defaults. The progress goes to stderr, the
table to stdout; --out is rewritten after every (model, method), so an interrupted run keeps what it measured.

CPU smoke mode, to check the script without a GPU (MFU against the measured fp32 matmul peak; 96 s on 2 shared
cores, plus 1 to 2.5 minutes whenever DeepSpeed JIT-builds its CPU comm op, deepspeed_shm_comm, in the first
worker):

    python benchmarks/gpu_throughput.py --device cpu --dtype fp32 --models vit_tiny --batch-size 4 --iters 1
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from _common import LAUNCHER_VARS, peak_rss_bytes, reset_peak_rss, rss_bytes, run_in_fresh_process, synchronize

from clmae.config import MODEL_NAMES, Config, load_config
from clmae.masking import iteration_flops

METHODS = ("mae", "clmae")
LABELS = {"mae": "MAE", "clmae": "CL-MAE"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2**30
STEPS_PER_EPOCH = 1000  # for the engines' LR schedule only
WORKER_TIMEOUT_S = 1800
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "can't allocate memory")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_models = ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"]
    parser.add_argument("--models", nargs="+", default=default_models, choices=MODEL_NAMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="the ZeRO-2 ds_config's precision")
    parser.add_argument("--batch-size", type=int, default=64, help="images per iteration (per GPU) of the timed run")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before them")
    parser.add_argument("--max-batch", type=int, default=2048, help="the largest batch the search tries")
    parser.add_argument("--search", action="store_true", help="search the largest batch that fits (slow)")
    parser.add_argument("--no-max-batch", action="store_true", help="no largest-batch search (the default)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch step beside each row")
    parser.add_argument("--compile", action="store_true", help="train.compile: torch.compile each block (both arms)")
    parser.add_argument("--matmul-size", type=int, help="N of the peak matmul (default: 8192 on CUDA, 2048 on CPU)")
    parser.add_argument("--out", type=Path, help="write the results to this JSON file")
    # Internal: one measurement in this process, its result written to --result.
    parser.add_argument("--worker", choices=("matmul", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODEL_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.no_max_batch = args.no_max_batch or not args.search
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device == "cuda" else 2048
    if min(args.batch_size, args.iters, args.max_batch) < 1 or args.warmup < 0:
        parser.error("--batch-size, --iters and --max-batch must be at least 1, --warmup at least 0")
    return args


def run_config(model: str, method: str, batch_size: int, dtype: str, compile_blocks: bool = False) -> Config:
    overrides = [f"model.name={model}", f"data.batch_size={batch_size}", f"train.ds_config=zero2_{dtype}"]
    overrides.append(f"train.compile={str(compile_blocks).lower()}")
    if method == "mae":
        overrides.append("masking.mode=random")
    return load_config(None, overrides)


# --------------------------------------------------------------------------------------------------
# Workers: each runs in its own process (started by `call_worker`), so memory never carries over.
# --------------------------------------------------------------------------------------------------


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(message in str(err) for message in OOM_MESSAGES)


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"name": name, "threads": torch.get_num_threads()}


def matmul_worker(args: argparse.Namespace) -> dict:
    """The measured matmul peak: best seconds per N x N x N matmul over a few rounds, after warm-up."""
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    dtype, n = DTYPES[args.dtype], args.matmul_size
    warmup, reps, rounds = (10, 20, 5) if device.type == "cuda" else (1, 2, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=c)
    best = math.inf
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return {
        "device": device_info(device),
        "matmul": {"n": n, "dtype": args.dtype, "seconds": best, "tflops": 2 * n**3 / best / 1e12},
    }


def run_worker(args: argparse.Namespace) -> dict:
    """(model, method) at one batch size: clmae's engines, then (unless --no-plain) the plain PyTorch step of the
    same models in the same process; --warmup, then --iters timed iterations of each."""
    from _common import PlainStep

    from clmae import dist
    from clmae.ds_engines import build_engines
    from clmae.masking import build_models
    from clmae.models import compile_blocks
    from clmae.step import optimizer_step

    env = dist.init("nccl" if args.device == "cuda" else "gloo")  # rank 0 of 1 (call_worker clears launchers)
    device = torch.device(env.device)
    cfg = run_config(args.model, args.method, args.batch_size, args.dtype, args.compile)
    torch.manual_seed(cfg.run.seed)
    with device:  # built in place: the same modules as building on the CPU and moving them, faster
        mae, cmm = build_models(cfg)
    engines = build_engines(cfg, mae, cmm, STEPS_PER_EPOCH, env.world_size)  # compiles the blocks (--compile)
    size = mae.patch_embed.img_size
    # fp32 images on the device, as the loader hands them over; the MAE casts them to its dtype.
    images = torch.randn(args.batch_size, 3, *size, device=device)
    # One optimiser step of each engine: the training loop's own (accum_steps 1).
    record = time_iterations(functools.partial(optimizer_step, engines, [images], 1.0, cfg), device, args)
    global_batch = engines.global_batch
    del engines, mae, cmm
    if not args.no_plain:
        torch.manual_seed(cfg.run.seed)
        with device:
            mae, cmm = build_models(cfg)
        if args.compile:
            for module in (mae, cmm):
                if module is not None:
                    compile_blocks(module)
        plain = PlainStep(cfg, mae, cmm, bf16=args.dtype == "bf16", global_batch=global_batch)
        record["plain"] = time_iterations(functools.partial(plain, images), device, args)
    dist.shutdown()
    return record


def time_iterations(iteration, device: torch.device, args: argparse.Namespace) -> dict:
    """--warmup calls of `iteration`, then --iters timed ones; throughput and memory."""
    cuda = device.type == "cuda"

    def memory_now() -> int:
        return torch.cuda.memory_allocated(device) if cuda else rss_bytes()

    if cuda:
        torch.cuda.empty_cache()
    synchronize(device)
    built = memory_now()
    start = time.perf_counter()
    for _ in range(args.warmup):
        iteration()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    between = memory_now()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
    start = time.perf_counter()
    for _ in range(args.iters):
        iteration()
    synchronize(device)
    seconds = time.perf_counter() - start
    record = {
        "oom": False,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "warmup_seconds": warmup_seconds,  # with --compile: includes the blocks' compilation
        "seconds_per_iter": seconds / args.iters,
        "images_per_s": args.batch_size * args.iters / seconds,
        "memory": "allocated" if cuda else "rss",
        "memory_after_build": built,  # CUDA: weights, fp32 master copy, AdamW state, ZeRO buffers
        "memory_between_iterations": between,
        "peak_memory": torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes(),
    }
    if cuda:
        record["peak_memory_reserved"] = torch.cuda.max_memory_reserved(device)
    return record


def worker_main(args: argparse.Namespace) -> None:
    try:
        record = matmul_worker(args) if args.worker == "matmul" else run_worker(args)
    except Exception as err:
        if not is_oom(err):
            raise
        args.result.write_text(json.dumps({"oom": True, "error": str(err).strip().splitlines()[0][:300]}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no teardown of engines and process group after an OOM; the exit frees the memory
    args.result.write_text(json.dumps(record))


# --------------------------------------------------------------------------------------------------
# The driver: never touches the GPU itself.
# --------------------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker_env(device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # torch, clmae.dist and DeepSpeed then all take the CPU path
    return env


def call_worker(kind: str, args: argparse.Namespace, plain: bool = False, **options) -> dict:
    """Run one worker in a fresh process; its result, {"oom": True, ...}, or {"error": ..., "output": ...}."""
    command = ["--worker", kind, "--device", args.device, "--dtype", args.dtype, "--matmul-size", str(args.matmul_size)]
    command += ["--no-plain"] * (args.no_plain or not plain) + ["--compile"] * args.compile
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    try:
        record, code, output = run_in_fresh_process(
            os.path.abspath(__file__), command, env=worker_env(args.device), timeout=WORKER_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s", "output": ""}
    if record is not None:
        return record
    return {"error": f"exit code {code}", "output": output}


def timed_run(
    model: str, method: str, args: argparse.Namespace, batch: int, iters: int, warmup: int, plain: bool = True
) -> dict:
    start = time.perf_counter()
    options = {"model": model, "method": method, "batch_size": batch, "iters": iters, "warmup": warmup}
    record = call_worker("run", args, plain=plain, **options)
    if record.get("oom"):
        outcome = "out of memory"
    elif "error" in record:
        outcome = f"error: {record['error']}\n{record['output']}"
    else:
        outcome = f"fits, peak {record['peak_memory'] / GIB:.2f} GiB, {record['images_per_s']:.1f} img/s"
        if "plain" in record:
            outcome += f" (plain step: {record['plain']['images_per_s']:.1f} img/s)"
    progress(f"  {model} {LABELS[method]} batch {batch}: {outcome} ({time.perf_counter() - start:.0f} s)")
    return record


def search_max_batch(
    model: str, method: str, args: argparse.Namespace, fits: int, fails: int | None, peak_at_fits: int
) -> dict:
    """Largest batch that completes two iterations, between `fits` (known to fit, with this peak memory) and
    `fails` (known not to, or None)."""
    start = time.perf_counter()
    lo, hi = fits, fails
    peaks: dict[int, int] = {fits: peak_at_fits}
    probes: list[dict] = []
    error = None

    def probe(batch: int) -> bool | None:
        nonlocal error
        record = timed_run(model, method, args, batch, iters=1, warmup=1, plain=False)
        probes.append({"batch_size": batch, "fits": not record.get("oom") and "error" not in record, **record})
        if "error" in record:
            error = f"batch {batch}: {record['error']}"
            return None
        if record["oom"]:
            return False
        peaks[batch] = record["peak_memory"]
        return True

    capped = False
    while hi is None:  # doubling
        batch = min(2 * lo, args.max_batch)
        if batch <= lo:
            capped = True
            break
        fitted = probe(batch)
        if fitted is None:
            break
        if fitted:
            lo = batch
        else:
            hi = batch
    while hi is not None and error is None:  # binary search
        step = 8 if lo >= 64 else 1
        mid = max((lo + hi) // 2 // step * step, (lo // step + 1) * step)
        if mid >= hi:
            break
        fitted = probe(mid)
        if fitted is None:
            break
        lo, hi = (mid, hi) if fitted else (lo, mid)
    return {
        "max_batch": lo,
        "max_batch_capped": capped,  # --max-batch fitted: the real limit is higher
        "first_oom_batch": hi,
        "peak_memory_at_max_batch": peaks.get(lo),
        "search_error": error,  # a try failed other than by running out of memory: max_batch is a lower bound
        "search_seconds": time.perf_counter() - start,
        "probes": probes,
    }


def measure_pair(model: str, method: str, args: argparse.Namespace, peak_tflops: float) -> dict:
    flops = iteration_flops(run_config(model, method, args.batch_size, args.dtype))
    row = {
        "model": model,
        "method": method,
        "requested_batch_size": args.batch_size,
        "flops_per_image": {"mae_step": flops["mae"], "cmm_step": flops["cmm"], "total": sum(flops.values())},
    }
    batch, fails = args.batch_size, None
    record = timed_run(model, method, args, batch, args.iters, args.warmup)
    while record.get("oom") and batch > 1:
        fails, batch = batch, batch // 2
        record = timed_run(model, method, args, batch, args.iters, args.warmup)
    row["timed"] = record
    if record.get("oom") or "error" in record:
        return row
    row["tflops"] = row["flops_per_image"]["total"] * record["images_per_s"] / 1e12
    row["mfu"] = row["tflops"] / peak_tflops
    if "plain" in record:
        plain = record["plain"]
        plain["tflops"] = row["flops_per_image"]["total"] * plain["images_per_s"] / 1e12
        plain["mfu"] = plain["tflops"] / peak_tflops
        row["vs_plain"] = record["images_per_s"] / plain["images_per_s"]  # > 1: clmae is faster
    if not args.no_max_batch:
        row["max_batch"] = search_max_batch(model, method, args, batch, fails, record["peak_memory"])
    return row


def halved(row: dict) -> bool:
    """Whether --batch-size did not fit and the timed run used a smaller batch."""
    return row["timed"].get("batch_size", row["requested_batch_size"]) != row["requested_batch_size"]


def format_row(row: dict) -> str:
    name = f"{row['model']:<18} {LABELS[row['method']]:<7}"
    timed = row["timed"]
    if "error" in timed:
        return f"{name} error: {timed['error']}"
    if timed.get("oom"):
        return f"{name} out of memory even at batch 1"
    batch = f"{timed['batch_size']}" + ("*" if halved(row) else "")
    line = (
        f"{name} {batch:>6} {timed['images_per_s']:>9.1f} {1e3 * timed['seconds_per_iter']:>9.1f} "
        f"{row['flops_per_image']['total'] / 1e9:>10.4g} {row['tflops']:>8.3g} {100 * row['mfu']:>6.1f}% "
        f"{timed['peak_memory'] / GIB:>9.2f}"
    )
    if "plain" in timed:
        plain = timed["plain"]
        line += f" {plain['images_per_s']:>11.1f} {100 * plain['mfu']:>9.1f}% {row['vs_plain']:>8.2f}x"
    search = row.get("max_batch")
    if search is not None:
        most = f"{'>=' if search['max_batch_capped'] or search['search_error'] else ''}{search['max_batch']}"
        peak = search["peak_memory_at_max_batch"]
        line += f" {most:>10} {peak / GIB:>11.2f}"
        if search["search_error"]:
            line += f"  (search stopped: {search['search_error']})"
    return line


def print_table(report: dict, rows: list[dict]) -> None:
    matmul, device = report["matmul"], report["device"]
    kind = "allocated" if report["device_type"] == "cuda" else "RSS"
    print(
        f"{device['name']}: ZeRO-2 {report['dtype']}{' + train.compile' if report['compile'] else ''} "
        "(clmae.ds_engines.build_engines, 1 process); "
        f"measured {report['dtype']} matmul peak ({matmul['n']}^3): {matmul['tflops']:.3g} TFLOP/s"
    )
    header = (
        f"{'model':<18} {'method':<7} {'batch':>6} {'img/s':>9} {'ms/iter':>9} {'GFLOP/img':>10} "
        f"{'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9}"
    )
    if any("plain" in row["timed"] for row in rows):
        header += f" {'plain img/s':>11} {'plain MFU':>10} {'vs plain':>9}"
    if any("max_batch" in row for row in rows):
        header += f" {'max batch':>10} {'at max GiB':>11}"
    print(header)
    for row in rows:
        print(format_row(row))
    print(
        f"GFLOP/img: both steps of an iteration, forward + backward, counted (clmae.masking.iteration_flops); "
        f"MFU: TFLOP/s / the measured matmul peak;\npeak GiB: {kind}, the highest during the timed iterations"
        + ("; max batch: the largest that completes two iterations (ZeRO-2, one GPU)" if "max batch" in header else "")
        + ("; *: --batch-size did not fit, halved until it did" if any(halved(row) for row in rows) else "")
        + (
            ";\nplain: the same models and batch as a plain PyTorch step in the same process (fp32 weights, "
            f"{'bf16 autocast, ' if report['dtype'] == 'bf16' else ''}fused AdamW); vs plain: clmae img/s / plain img/s"
            if any("plain" in row["timed"] for row in rows)
            else ""
        )
    )


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device is visible; for the CPU smoke mode use --device cpu --dtype fp32")
    start = time.perf_counter()
    report = {
        "command": [sys.executable, *sys.argv],
        "device_type": args.device,
        "dtype": args.dtype,
        "ds_config": f"zero2_{args.dtype}",
        "compile": args.compile,
        "batch_size": args.batch_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "max_batch_limit": None if args.no_max_batch else args.max_batch,
        "versions": {"torch": torch.__version__, "deepspeed": version("deepspeed")},
    }
    progress(f"measuring the {args.dtype} matmul peak ({args.matmul_size}^3)")
    measured = call_worker("matmul", args)
    if "matmul" not in measured:
        sys.exit(f"error: the matmul peak measurement failed: {measured.get('error')}\n{measured.get('output', '')}")
    report.update(measured)
    rows: list[dict] = []
    for model in args.models:
        for method in args.methods:
            progress(f"{model} {LABELS[method]}")
            rows.append(measure_pair(model, method, args, measured["matmul"]["tflops"]))
            report["rows"] = rows
            if args.out:  # after every pair, so that an interrupted run keeps what it measured
                args.out.write_text(json.dumps(report, indent=2))
    report["seconds"] = time.perf_counter() - start
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print_table(report, rows)
    print(f"took {report['seconds']:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    if any("error" in row["timed"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
