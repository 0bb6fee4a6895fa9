"""The benchmark scripts run as a user runs them (by path) and report sane, self-consistent numbers.

Their figures are measured on quiet machines and go into the README; here only the smallest model on CPU,
so that a change in clmae that breaks a script shows up in CI rather than on a GPU machine later.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_memory_counts_adamw_state_exactly_and_clmae_needs_more(tmp_path):
    out = tmp_path / "memory.json"
    run_script("memory.py", "--models", "vit_tiny", "--iters", "1", "--json", str(out))
    rows = {row["method"]: row for row in json.loads(out.read_text())}
    for row in rows.values():
        # AdamW's two fp32 moments per trained parameter (the fixed position embeddings are not trained).
        assert 0.9 * 8 * row["params"] < row["adamw_state"] <= 8 * row["params"], row
        assert row["baseline"] == row["built"] + row["adamw_state"]
        assert row["peak"] > row["baseline"] and row["per_iteration_increase"] == row["peak"] - row["baseline"]
    # CL-MAE holds a second module with its optimiser and runs a second forward/backward per iteration.
    assert rows["clmae"]["params"] > rows["mae"]["params"]
    assert rows["clmae"]["adamw_state"] > rows["mae"]["adamw_state"]


@pytest.mark.distributed
def test_gpu_throughput_cpu_smoke_mode_reports_flops_and_mfu(tmp_path):
    """The GPU script's CPU mode: the real ZeRO-2 engines in one process, timed, with counted FLOPs, and the
    plain PyTorch step of the same models beside each row."""
    out = tmp_path / "gpu.json"
    stdout = run_script(
        "gpu_throughput.py",
        *("--device", "cpu", "--dtype", "fp32", "--models", "vit_tiny", "--batch-size", "4"),
        *("--iters", "1", "--warmup", "1", "--out", str(out)),
    )
    assert "plain img/s" in stdout and "vs plain" in stdout, stdout
    report = json.loads(out.read_text())
    assert report["matmul"]["tflops"] > 0
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"mae", "clmae"}, stdout
    for row in rows.values():
        timed = row["timed"]
        assert timed["batch_size"] == 4 and timed["images_per_s"] > 0 and timed["peak_memory"] > 0
        assert row["tflops"] == pytest.approx(row["flops_per_image"]["total"] * timed["images_per_s"] / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops"] / report["matmul"]["tflops"])
        plain = timed["plain"]
        assert plain["batch_size"] == 4 and plain["images_per_s"] > 0 and plain["peak_memory"] > 0
        assert row["vs_plain"] == pytest.approx(timed["images_per_s"] / plain["images_per_s"])
        assert "max_batch" not in row  # the search is opt-in (--search)
    # Plain MAE has no CMM step; CL-MAE's iteration does both steps, several times the MAE's FLOPs.
    assert rows["mae"]["flops_per_image"]["cmm_step"] == 0
    assert rows["clmae"]["flops_per_image"]["total"] > 3 * rows["mae"]["flops_per_image"]["total"]


def test_verify_checkpoint_times_the_manifest_on_a_real_layout(tmp_path):
    out = tmp_path / "verify.json"
    args = ["--model", "vit_tiny", "--ranks", "2", "--repeat", "1", "--dir", str(tmp_path), "--json", str(out)]
    run_script("verify_checkpoint.py", *args)
    rows = {row["what"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {
        "manifest at save, one process (page cache warm)",
        "verify full, page cache warm",
        "verify full, page cache cold",
        "verify size",
    }
    # vit_tiny MAE + CMM, ZeRO-2 bf16: 2 bytes of weights and 12 of fp32 optimiser state per parameter.
    params = rows["verify size"]["params"]
    assert abs(rows["verify size"]["gib"] * 2**30 - 14 * (params["mae"] + params["cmm"])) < 100_000
    assert all(row["seconds"] > 0 for row in rows.values())
    assert not list(tmp_path.glob("clmae-verify-*"))  # cleaned up


@pytest.mark.distributed
def test_step_overhead_holds_the_launch_budget_of_every_bf16_config(tmp_path):
    """One optimiser step through clmae's engines launches at most 1.5x the kernels of a plain PyTorch step
    (ZeRO-1/2; 2.5x for ZeRO-3), MAE and CL-MAE, with a handful of host syncs, none per parameter tensor.
    vit_tiny has the blocks of a ViT (12 parameter tensors each); its counts grow with depth as ViT-B's do."""
    out = tmp_path / "overhead.json"
    stdout = run_script("step_overhead.py", "--models", "vit_tiny", "--check", "--json", str(out))
    rows = json.loads(out.read_text())
    assert {(row["method"], row["ds_config"]) for row in rows} == {
        (method, f"zero{stage}_bf16") for method in ("mae", "clmae") for stage in (1, 2, 3)
    }, stdout
    for row in rows:
        assert row["mae_param_tensors"] == 108, row
        assert row["engines"]["ops"] <= row["target_ratio"] * row["plain"]["ops"], row
        assert row["engines"]["syncs"] <= row["target_syncs"] < row["mae_param_tensors"], row
        assert row["plain"]["syncs"] == 0 and row["plain"]["ops"] > 300, row


@pytest.mark.distributed
def test_step_overhead_sees_deepspeeds_per_tensor_overflow_check(tmp_path):
    """The budget can fail: DeepSpeed's own bf16 default (an overflow check per gradient) is far over it."""
    default = json.loads((BENCHMARKS.parent / "ds_configs" / "zero2_bf16.json").read_text())
    default["bf16"]["check_grad_overflow"] = True
    config = tmp_path / "zero2_bf16_overflow_check.json"
    config.write_text(json.dumps(default))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--models", "vit_tiny", "--methods", "mae", "--configs", str(config), "--check"]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_overhead.py"), *args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "off target: vit_tiny MAE" in result.stdout and "ratio" in result.stdout


def test_soak_places_each_kill_where_it_is_meant_to_land():
    """benchmarks/soak.py's fault plan: the kill before the first checkpoint comes first, at step 2; the kill in
    a save lands on a checkpoint step; the kill at the end on the last step; each of the two once per run."""
    import random

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import soak
    finally:
        sys.path.remove(str(BENCHMARKS))

    assert soak.parse_seeds("0-3") == [0, 1, 2, 3] and soak.parse_seeds("1,4,7-8") == [1, 4, 7, 8]
    with pytest.raises(Exception, match="not a list like"):
        soak.parse_seeds("a-b")
    seen = set()
    for seed in range(200):
        faults = soak.draw_faults(random.Random(seed), 12, 40)
        assert [f.step for f in faults] == sorted(f.step for f in faults)
        kinds = [f.kind for f in faults]
        assert kinds.count("kill_early") <= 1 and kinds.count("kill_at_end") <= 1
        for fault in faults:
            seen.add(fault.kind)
            if fault.kind == "kill_early":
                assert fault is faults[0] and fault.armed_by_env == "kill_all@2"
            elif fault.kind == "kill_in_save":
                assert fault.step % soak.CHECKPOINT_EVERY == 0 and fault.step <= 40
                assert fault.armed_by_env == f"kill_all_in_save@{fault.step}"
            elif fault.kind == "kill_at_end":
                assert fault.step == 40 and fault.armed_by_env == "kill_before_save@40"
            else:
                assert 2 <= fault.step < 40 and fault.armed_by_env is None
    assert seen == set(soak.KINDS)


def test_compare_masking_matches_each_cheaper_curriculum_with_an_mae_arm_of_its_flops():
    """benchmarks/compare_masking.py --cheaper K:F: per setting a CL-MAE arm with the options and an MAE arm whose
    counted FLOPs match it (fewer epochs than the paper's CL-MAE buys); --only-cheaper leaves the paper's arms out."""
    import argparse

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import compare_masking
    finally:
        sys.path.remove(str(BENCHMARKS))

    assert compare_masking.parse_cheaper("4:1") == (4, 1.0) and compare_masking.parse_cheaper("2:0.5") == (2, 0.5)
    for bad in ("0:1", "2:0", "2:1.5", "two:1"):
        with pytest.raises(argparse.ArgumentTypeError, match="K"):
            compare_masking.parse_cheaper(bad)
    # --cheaper takes every K:F after it, so an override typed after it must say where it belongs
    with pytest.raises(argparse.ArgumentTypeError, match="overrides before --cheaper"):
        compare_masking.parse_cheaper("curriculum.granularity=step")
    digits, settings = compare_masking.DATASETS["digits"], [(4, 1.0), (2, 0.5)]
    args = argparse.Namespace(data=digits, epochs=20, overrides=[], cheaper=settings, only_cheaper=True)
    arms = compare_masking.methods(args)
    assert [arm.name for arm in arms] == [
        "random_init", "mae_random", "mae_flops_every4_frac1", "clmae_every4_frac1", "mae_flops_every2_frac0.5",
        "clmae_every2_frac0.5",
    ]  # fmt: skip
    epochs, flops = compare_masking.arm_flops(args, arms)
    by_name = {arm.name: arm.label for arm in arms}
    mae, cheap, paper = flops[by_name["mae_random"]], flops[by_name["clmae_every4_frac1"]], flops["paper run"] / 20
    assert mae < cheap < paper and flops[by_name["clmae_every2_frac0.5"]] == pytest.approx(cheap)
    assert epochs[by_name["mae_flops_every4_frac1"]] == round(20 * cheap / mae)
    assert 20 < epochs[by_name["mae_flops_every4_frac1"]] < round(20 * paper / mae)
