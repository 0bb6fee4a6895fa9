"""Resident memory per rank of real 2-rank `clmae-pretrain` runs on one node, with data.os_cache true and false.

With `os_cache: true` FFCV memory-maps the .beton: its pages live once in the OS page cache, shared by every
rank of the node, and appear in each rank's RSS as file-backed pages (RssFile). With `os_cache: false`
each rank copies the pages it reads into its own memory (FFCV's process cache): anonymous memory (RssAnon),
once per rank. The script generates a JPEG set (224 px, as benchmarks/loader_throughput.py) and converts it
once, then runs torchrun with 2 ranks (the tiny_digits recipe on that file) for each setting, sampling every
rank's /proc/PID/status (VmRSS, RssAnon, RssFile) and smaps_rollup (Pss) every 0.2 s, and prints the peaks.

    python benchmarks/rank_memory.py --data-dir /tmp/rank_memory --images 4000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from loader_throughput import convert, generate_jpegs

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def read_kib(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                values[key] = int(rest.split()[0])
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                values["Pss"] = int(line.split()[1])
    return values


def rank_pids(parent: int) -> list[int]:
    """The clmae.train processes started by the torchrun process `parent`."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"clmae.train" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def measure(beton: Path, os_cache: bool, steps: int, out: Path) -> dict[int, dict[str, int]]:
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "clmae.train", "--config", "tiny_digits", f"run.output_dir={out}", f"run.name=os_cache_{os_cache}",
        f"data.train_path={beton}", f"data.val_path={beton}", f"data.os_cache={str(os_cache).lower()}",
        f"train.stop_at_step={steps}", "train.epochs=1", "checkpoint.every_steps=100000", "checkpoint.resume=none",
        "tracking.system_metrics=false", "tracking.mask_images_every_epochs=0", "tracking.enabled=false",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, dict[str, int]] = {}

    def sample() -> None:
        while launcher.poll() is None:
            for rank, pid in enumerate(rank_pids(launcher.pid)):
                try:
                    now = read_kib(pid)
                except OSError:
                    continue
                peak = peaks.setdefault(rank, {})
                for key, value in now.items():
                    peak[key] = max(peak.get(key, 0), value)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = launcher.communicate()
    sampler.join()
    if launcher.returncode != 0:
        raise SystemExit(f"training failed ({launcher.returncode}):\n{err[-3000:]}")
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="generated JPEGs and .beton are cached here")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per run (batch 64 per rank)")
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    jpegs = generate_jpegs(args.data_dir / "jpegs", args.images, (224, 224))
    beton = convert(jpegs, args.data_dir / "train_raw.beton", "raw", workers=2)
    size_mib = beton.stat().st_size / 2**20
    print(f"{beton}: {args.images} images, {size_mib:.0f} MiB (raw pixels)")
    print("| data.os_cache | rank | peak RSS | of it anonymous | of it file-backed (page cache) | peak PSS |")
    print("|---|---|---|---|---|---|")
    for os_cache in (True, False):
        peaks = measure(beton, os_cache, args.steps, args.data_dir / "runs")
        for rank, peak in sorted(peaks.items()):
            mib = {key: value / 1024 for key, value in peak.items()}
            print(
                f"| {str(os_cache).lower()} | {rank} | {mib['VmRSS']:,.0f} MiB | {mib['RssAnon']:,.0f} MiB | "
                f"{mib['RssFile']:,.0f} MiB | {mib['Pss']:,.0f} MiB |"
            )


if __name__ == "__main__":
    main()
