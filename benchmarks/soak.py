"""Soak test: a 2-rank CPU run on digits through N random faults, restarted after each like a requeue.

    python benchmarks/soak.py --faults 20 --data /path/to/digits      # train.beton / val.beton
    python benchmarks/soak.py --faults 2 --steps 16                   # a smoke run (converts digits itself)
    python benchmarks/soak.py --faults 6 --seeds 0-9                  # a sweep: one soak per seed, one line each

Faults, drawn with `--seed` among: kill -9 of one rank (the other is killed after a grace period, as srun
does), kill -9 of all ranks, SIGUSR1 to all (checkpoint, exit 75), a NaN loss on one rank (CLMAE_FAULT; the
run rolls back in-process), corrupt latest (kill -9 of all, then a shard of the newest checkpoint cut in
half: the resume must fall back), disk full during a save (RLIMIT_FSIZE lowered on rank 1 while it runs,
with prlimit: its next checkpoint write fails with EFBIG), and three kills of every rank placed where a
cluster's failures also land (armed with CLMAE_FAULT for one launch): before the run's first checkpoint
(`kill_early`, at step 2), in the middle of a checkpoint save (`kill_in_save`: the shards written, the
manifest and COMPLETE not), and after the last step, before the final checkpoint and the MLflow run's end
(`kill_at_end`). Each signal fault is injected when rank 0 logs a step at
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

KINDS = (
    "kill_rank", "kill_all", "sigusr1", "nan", "corrupt_latest", "disk_full",
    "kill_early", "kill_in_save", "kill_at_end",
)  # fmt: skip
ONCE = ("kill_early", "kill_at_end")  # one place per run: drawn at most once
CHECKPOINT_EVERY = 3  # checkpoint.every_steps of the soaked run: the first checkpoint is step 3's
STEP_LINE = re.compile(r"\] step (\d+) \(epoch \d+\) \| mae ")


@dataclass
class Fault:
    kind: str
    step: int  # injected when rank 0 logs this step or a later one; for kills armed by CLMAE_FAULT, where they fire
    outcome: str = ""

    @property
    def armed_by_env(self) -> str | None:
        """The CLMAE_FAULT spec of a kill that the ranks carry out themselves (clmae/faults.py), or None."""
        specs = {"kill_early": "kill_all", "kill_in_save": "kill_all_in_save", "kill_at_end": "kill_before_save"}
        return f"{specs[self.kind]}@{self.step}" if self.kind in specs else None


def draw_faults(rng: random.Random, count: int, steps: int) -> list[Fault]:
    """`count` faults in step order. kill_early fires as step 2 begins (step 1 logged, the first checkpoint due
    after step 3); kill_in_save in the save of a checkpoint step; kill_at_end as the final checkpoint begins."""
    faults, kinds = [], list(KINDS)
    for _ in range(count):
        kind = rng.choice(kinds)
        if kind in ONCE:
            kinds.remove(kind)
        step = rng.randint(2, steps - 1)
        if kind == "kill_early":
            step = 2
        elif kind == "kill_in_save":
            step = min(-(-step // CHECKPOINT_EVERY) * CHECKPOINT_EVERY, steps - steps % CHECKPOINT_EVERY)
        elif kind == "kill_at_end":
            step = steps
        faults.append(Fault(kind, step))
    return sorted(faults, key=lambda f: (f.step, f.kind != "kill_early"))


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


def launch(
    run_dir: Path, data: Path, overrides: list[str], nan_steps: list[int], tag: str, armed: str | None = None
) -> Launch:
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
        specs = [f"nan_loss@{s}" for s in nan_steps] + ([armed] if armed else [])
        if specs:
            env["CLMAE_FAULT"] = ",".join(specs)
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
    faults = draw_faults(rng, args.faults, args.steps)
    nan_steps = sorted({f.step for f in faults if f.kind == "nan"})
    pending = [f for f in faults if f.kind != "nan"]
    fsize_limit = args.fsize_limit
    launches, start = 0, time.perf_counter()
    while True:
        launches += 1
        # A kill the ranks carry out is armed for one launch, when it is the next fault due.
        armed = pending[0] if pending and pending[0].armed_by_env else None
        run = launch(run_dir, data, overrides, nan_steps, f"soak{launches:02d}", armed and armed.armed_by_env)
        injected = None
        while run.running():
            if armed is None and injected is None and pending and last_step(run.output()) >= pending[0].step:
                injected = pending.pop(0)
                inject(injected, run, run_dir, rng, fsize_limit)
                print(f"  launch {launches}: {injected.kind} at step {last_step(run.output())} {injected.outcome}")
            time.sleep(0.05)
        codes = run.wait(60)
        output = run.output()
        if armed is not None and codes == [-signal.SIGKILL, -signal.SIGKILL]:
            injected = pending.pop(0)
            injected.outcome = f"CLMAE_FAULT={armed.armed_by_env}, after step {last_step(output)} was logged"
            print(f"  launch {launches}: {injected.kind} {injected.outcome}")
        if injected is not None:
            injected.outcome = (injected.outcome + f"; exit codes {codes}").lstrip("; ")
        print(f"  launch {launches} ended with {codes} after {time.monotonic() - run.started:.0f} s")
        if codes == [0, 0] and f"reached train.stop_at_step={args.steps}" in output:
            for fault in pending:  # e.g. a kill in the save of a step that an earlier fault's resume started after
                fault.outcome = "not reached"
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


def parse_seeds(text: str) -> list[int]:
    """"0-9" -> [0, ..., 9]; "1,4,7" -> [1, 4, 7]."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"--seeds: {text!r} is not a list like 0-9 or 1,4,7")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


@dataclass
class SeedResult:
    seed: int
    faults: list[Fault]
    launches: int
    soak_seconds: float
    reference_seconds: float
    problems: list[str]
    skip_steps: list[int]  # what the soaked run recorded, and the reference was given

    @property
    def injected(self) -> list[Fault]:
        return [f for f in self.faults if f.outcome != "not reached"]


def soak_seed(args, seed: int, work: Path, data: Path, overrides: list[str]) -> SeedResult:
    """One soak (its own run directory per seed) and the uninterrupted reference with the same skipped steps."""
    from clmae.checkpoint import read_client_state

    args.seed = seed
    run_dir = work / f"soaked_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    faults, launches, soak_seconds = soak(args, run_dir, data, overrides)
    state = read_client_state(newest_checkpoint(run_dir))
    reference = work / f"reference_seed{seed}"
    shutil.rmtree(reference, ignore_errors=True)
    start = time.perf_counter()
    skip = f"train.skip_steps={json.dumps(state.skip_steps)}"
    codes = launch(reference, data, [*overrides, skip], [], "reference").wait(1800)
    reference_seconds = time.perf_counter() - start
    if codes != [0, 0]:
        raise SystemExit(f"the reference run of seed {seed} failed: {codes}")
    problems = check(run_dir, reference, args.steps)
    return SeedResult(seed, faults, launches, soak_seconds, reference_seconds, problems, state.skip_steps)


def report(result: SeedResult, run_dir: Path) -> None:
    """The detailed report of one soak (the README's table row)."""
    logs = "".join(p.read_text(errors="replace") for p in sorted(run_dir.parent.glob(f"{run_dir.name}-*-rank0.log")))
    seen = {
        "rollbacks": len(re.findall(r"rollback \d+ of at most", logs)),
        "resumes": logs.count("resumed from"),
        "adoptions of the MLflow run of an attempt without a checkpoint": logs.count("(adopted from"),
        "fall-backs to an older checkpoint": logs.count("falling back to the previous complete checkpoint"),
        "failed saves": logs.count("could not be saved and was removed"),
    }
    counts = {kind: sum(f.kind == kind for f in result.injected) for kind in KINDS}
    print("\nfaults:")
    for fault in result.faults:
        print(f"  step {fault.step:4d}  {fault.kind:15s} {fault.outcome}")
    survived = len(result.injected) if not result.problems else 0
    soak_s, reference_s = result.soak_seconds, result.reference_seconds
    print(
        f"\nfaults injected: {len(result.injected)} ({', '.join(f'{v} {k}' for k, v in counts.items() if v)})\n"
        f"faults survived: {survived}\n"
        f"observed: {', '.join(f'{v} {k}' for k, v in seen.items())}; skipped steps {result.skip_steps}\n"
        f"launches: {result.launches}; soaked run {soak_s:.0f} s vs uninterrupted {reference_s:.0f} s "
        f"(overhead {soak_s - reference_s:+.0f} s, {soak_s / reference_s - 1:+.0%})\n"
        f"data lost: {'none' if not result.problems else 'see below'} (final weights bitwise equal to the reference "
        f"with the same skipped steps; one MLflow run; every step logged once)"
    )
    for problem in result.problems:
        print(f"PROBLEM: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults per soak")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps of the run (default: 4 x faults + 8)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of one soak, reported in detail")
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="a sweep (0-9): one soak, one line per seed")
    parser.add_argument("--data", type=Path, default=None, help="a digits directory (default: converted here)")
    parser.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary dir)")
    args = parser.parse_args()
    args.steps = args.steps or 4 * args.faults + 8
    if args.steps < 2 * CHECKPOINT_EVERY:
        parser.error(f"--steps {args.steps}: at least {2 * CHECKPOINT_EVERY}, so that faults fall between checkpoints")
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
        f"checkpoint.every_steps={CHECKPOINT_EVERY}",
        "tracking.system_metrics=false",
        "tracking.mask_images_every_epochs=0",
    ]
    # A first short run gives the shard size for the disk-full fault.
    probe = work / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    print(f"soak: {args.faults} faults over {args.steps} steps, seeds {seeds}, in {work}")
    codes = launch(probe, data, [*overrides, "train.stop_at_step=3"], [], "probe").wait(600)
    if codes != [0, 0]:
        raise SystemExit(f"the probe run failed: {codes}")
    args.fsize_limit = fsize_limit_for(probe)

    if args.seeds is None:
        result = soak_seed(args, args.seed, work, data, overrides)
        report(result, work / f"soaked_seed{args.seed}")
        return 1 if result.problems else 0

    results, start = [], time.perf_counter()
    for seed in seeds:
        print(f"seed {seed}:")
        result = soak_seed(args, seed, work, data, overrides)
        results.append(result)
        kinds = ", ".join(f.kind for f in result.injected)
        verdict = "all survived" if not result.problems else "PROBLEM: " + "; ".join(result.problems)
        print(
            f"seed {seed}: {len(result.injected)} faults ({kinds}), {result.launches} launches, "
            f"{result.soak_seconds:.0f} s (uninterrupted {result.reference_seconds:.0f} s): {verdict}"
        )
    print("\nsweep:")
    for result in results:
        verdict = "survived every fault" if not result.problems else "FAILED: " + "; ".join(result.problems)
        print(f"  seed {result.seed:3d}: {len(result.injected):2d} faults, {result.launches:2d} launches: {verdict}")
    survived = [r for r in results if not r.problems]
    print(
        f"total: {len(results)} seeds, {sum(len(r.injected) for r in results)} faults injected, "
        f"{len(survived)} of {len(results)} seeds survived every fault, {time.perf_counter() - start:.0f} s"
    )
    return 0 if len(survived) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
