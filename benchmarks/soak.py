"""Soak test: a 2-rank CPU run on digits through N random faults, restarted after each like a requeue.

    python benchmarks/soak.py --faults 20 --data /path/to/digits      # train.beton / val.beton
    python benchmarks/soak.py --faults 2 --steps 16                   # a smoke run (converts digits itself)

Faults, drawn with `--seed` among: kill -9 of one rank (the other is killed after a grace period, as srun
does), kill -9 of all ranks, SIGUSR1 to all (checkpoint, exit 75), a NaN loss on one rank (CLMAE_FAULT; the
run rolls back in-process), corrupt latest (kill -9 of all, then a shard of the newest checkpoint cut in
half: the resume must fall back), disk full during a save (RLIMIT_FSIZE lowered on rank 1 while it runs,
with prlimit: its next checkpoint write fails with EFBIG). Each fault is injected when rank 0 logs a step at
or past the fault's (random) step. After a fault that ends the launch, the run is launched again with
checkpoint.resume=auto. Then an uninterrupted run with train.skip_steps set to the skip list the soaked run
recorded is trained, and the two must have bitwise the same weights (both modules), one MLflow run each,
every metric's steps logged once and every step that was not skipped logged. Prints the figures for the
README; exit 0 when everything held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("kill_rank", "kill_all", "sigusr1", "nan", "corrupt_latest", "disk_full")
STEP_LINE = re.compile(r"\] step (\d+) \(epoch \d+\) \| mae ")


@dataclass
class Fault:
    kind: str
    step: int  # injected when rank 0 logs this step or a later one
    outcome: str = ""


@dataclass
class Launch:
    """Two rank processes (as the deepspeed launcher starts them), rank 0's output in a file."""

    procs: list
    logs: list
    started: float = field(default_factory=time.monotonic)

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def kill(self, signum: int, ranks=(0, 1)) -> None:
        for rank in ranks:
            if self.procs[rank].poll() is None:
                self.procs[rank].send_signal(signum)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)  # what srun does to the tasks left when one has died
                proc.wait()
        return [p.returncode for p in self.procs]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run_dir: Path, data: Path, overrides: list[str], nan_steps: list[int], tag: str) -> Launch:
    args = [
        sys.executable, "-m", "clmae.train", "--config", "tiny_digits",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}",
        f"data.train_path={data / 'train.beton'}", f"data.val_path={data / 'val.beton'}",
        *overrides,
    ]  # fmt: skip
    port, procs, logs = str(free_port()), [], []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("CLMAE_FAULT", None)
        if nan_steps:
            env["CLMAE_FAULT"] = ",".join(f"nan_loss@{s}" for s in nan_steps)
        log = run_dir.parent / f"{run_dir.name}-{tag}-rank{rank}.log"
        with open(log, "w") as handle:
            procs.append(subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    return Launch(procs, logs)


def last_step(text: str) -> int:
    steps = STEP_LINE.findall(text)
    return int(steps[-1]) if steps else 0


def newest_checkpoint(run_dir: Path) -> Path | None:
    from clmae.checkpoint import find_latest

    return find_latest(run_dir)


def corrupt_newest(run_dir: Path) -> str:
    newest = newest_checkpoint(run_dir)
    if newest is None:
        return "no checkpoint yet to corrupt"
    shard = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return f"truncated {shard.relative_to(run_dir)}"


def inject(fault: Fault, run: Launch, run_dir: Path, rng: random.Random, fsize_limit: int) -> None:
    """Signal-type faults into the live launch (NaN faults are armed by CLMAE_FAULT at launch)."""
    if fault.kind == "kill_rank":
        rank = rng.randint(0, 1)
        run.kill(signal.SIGKILL, ranks=(rank,))
        fault.outcome = f"killed rank {rank}"
    elif fault.kind == "kill_all":
        run.kill(signal.SIGKILL)
    elif fault.kind == "sigusr1":
        run.kill(signal.SIGUSR1)
    elif fault.kind == "corrupt_latest":
        run.kill(signal.SIGKILL)
        run.wait(60)
        fault.outcome = corrupt_newest(run_dir)
    elif fault.kind == "disk_full":
        resource.prlimit(run.procs[1].pid, resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))


def soak(args, run_dir: Path, data: Path, overrides: list[str]) -> tuple[list[Fault], int, float]:
    """Runs the soaked run to its end; returns the faults (with what was seen), launches and seconds."""
    rng = random.Random(args.seed)
    faults = sorted(
        (Fault(rng.choice(KINDS), rng.randint(2, args.steps - 1)) for _ in range(args.faults)), key=lambda f: f.step
    )
    nan_steps = sorted({f.step for f in faults if f.kind == "nan"})
    pending = [f for f in faults if f.kind != "nan"]
    fsize_limit = args.fsize_limit
    launches, start = 0, time.perf_counter()
    while True:
        launches += 1
        run = launch(run_dir, data, overrides, nan_steps, f"soak{launches:02d}")
        injected = None
        while run.running():
            if injected is None and pending and last_step(run.output()) >= pending[0].step:
                injected = pending.pop(0)
                inject(injected, run, run_dir, rng, fsize_limit)
                print(f"  launch {launches}: {injected.kind} at step {last_step(run.output())} {injected.outcome}")
            time.sleep(0.05)
        codes = run.wait(60)
        output = run.output()
        if injected is not None:
            injected.outcome = (injected.outcome + f"; exit codes {codes}").lstrip("; ")
        print(f"  launch {launches} ended with {codes} after {time.monotonic() - run.started:.0f} s")
        if codes == [0, 0] and f"reached train.stop_at_step={args.steps}" in output:
            return faults, launches, time.perf_counter() - start
        if injected is None and codes != [75, 75]:
            raise SystemExit(f"launch {launches} failed without a fault ({codes}):\n{output[-4000:]}")
        if launches > 3 * args.faults + 3:
            raise SystemExit("too many launches: the run does not make progress")


def check(run_dir: Path, reference: Path, steps: int) -> list[str]:
    """What differs from the reference: weights, MLflow runs, steps logged twice or missing."""
    from mlflow.tracking import MlflowClient

    from clmae.checkpoint import read_client_state
    from clmae.weights import consolidated_state_dict

    problems = []
    got_dir, want_dir = newest_checkpoint(run_dir), newest_checkpoint(reference)
    for engine in ("mae", "cmm"):
        got, want = consolidated_state_dict(got_dir, engine), consolidated_state_dict(want_dir, engine)
        differing = [k for k in want if k not in got or not got[k].equal(want[k])]
        if differing:
            problems.append(f"{engine}: {len(differing)} tensors differ from the reference, e.g. {differing[:3]}")
    skipped = set(read_client_state(got_dir).skip_steps)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if len(runs) != 1:
        problems.append(f"{len(runs)} MLflow runs, not 1")
    for key in ("mae/loss", "cmm/loss_cmm", "lr/mae"):
        logged = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        twice = sorted({s for s in logged if logged.count(s) > 1})
        missing = sorted(set(range(1, steps + 1)) - skipped - set(logged))
        if twice:
            problems.append(f"{key}: steps logged more than once: {twice}")
        if missing:
            problems.append(f"{key}: steps never logged: {missing}")
    return problems


def fsize_limit_for(reference: Path) -> int:
    """Half the largest file of a checkpoint: rank 1's next shard cannot be written whole."""
    newest = newest_checkpoint(reference)
    return max(p.stat().st_size for p in newest.rglob("*.pt")) // 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps of the run (default: 4 x faults + 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="a digits directory (default: converted here)")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    args = parser.parse_args()
    args.steps = args.steps or 4 * args.faults + 8
    work = Path(args.work or tempfile.mkdtemp(prefix="clmae-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = work / "digits"
        subprocess.run([sys.executable, "-m", "data_prep", "digits", str(data), "--overwrite"], check=True)
    overrides = [
        "data.batch_size=16",
        "train.epochs=100",
        f"train.stop_at_step={args.steps}",
        "train.log_every=1",
        f"train.max_rollbacks={args.faults}",
        "checkpoint.every_steps=3",
        "tracking.system_metrics=false",
        "tracking.mask_images_every_epochs=0",
    ]
    # A first reference without skips gives the shard size for the disk-full fault and the uninterrupted time.
    probe = work / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    print(f"soak: {args.faults} faults over {args.steps} steps, seed {args.seed}, in {work}")
    start = time.perf_counter()
    codes = launch(probe, data, [*overrides, "train.stop_at_step=3"], [], "probe").wait(600)
    if codes != [0, 0]:
        raise SystemExit(f"the probe run failed: {codes}")
    args.fsize_limit = fsize_limit_for(probe)

    run_dir = work / "soaked"
    shutil.rmtree(run_dir, ignore_errors=True)
    faults, launches, soak_seconds = soak(args, run_dir, data, overrides)

    from clmae.checkpoint import read_client_state

    state = read_client_state(newest_checkpoint(run_dir))
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    start = time.perf_counter()
    skip = f"train.skip_steps={json.dumps(state.skip_steps)}"
    codes = launch(reference, data, [*overrides, skip], [], "reference").wait(1800)
    reference_seconds = time.perf_counter() - start
    if codes != [0, 0]:
        raise SystemExit(f"the reference run failed: {codes}")
    problems = check(run_dir, reference, args.steps)

    logs = "".join(p.read_text(errors="replace") for p in sorted(work.glob("soaked-*-rank0.log")))
    seen = {
        "rollbacks": len(re.findall(r"rollback \d+ of at most", logs)),
        "resumes": logs.count("resumed from"),
        "fall-backs to an older checkpoint": logs.count("falling back to the previous complete checkpoint"),
        "failed saves": logs.count("could not be saved and was removed"),
    }
    counts = {kind: sum(f.kind == kind for f in faults) for kind in KINDS}
    print("\nfaults:")
    for fault in faults:
        print(f"  step {fault.step:4d}  {fault.kind:15s} {fault.outcome}")
    survived = len(faults) if not problems else 0
    print(
        f"\nfaults injected: {len(faults)} ({', '.join(f'{v} {k}' for k, v in counts.items() if v)})\n"
        f"faults survived: {survived}\n"
        f"observed: {', '.join(f'{v} {k}' for k, v in seen.items())}; skipped steps {state.skip_steps}\n"
        f"launches: {launches}; soaked run {soak_seconds:.0f} s vs uninterrupted {reference_seconds:.0f} s "
        f"(overhead {soak_seconds - reference_seconds:+.0f} s, {soak_seconds / reference_seconds - 1:+.0%})\n"
        f"data lost: {'none' if not problems else 'see below'} (final weights bitwise equal to the reference "
        f"with the same skipped steps; one MLflow run; every step logged once)"
    )
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
