"""`make demo` / `python -m clmae.demo`: CL-MAE end to end on the bundled digits set, 2 CPU ranks.

1. convert scikit-learn's 1,797 handwritten digits to FFCV (data/digits, once);
2. pre-train the tiny CL-MAE with DeepSpeed ZeRO-2 on 2 ranks through the whole curriculum (lambda
   from +1 to -1 over the epochs), checkpointing and logging to MLflow (runs/demo);
3. export the encoder as a timm state dict;
4. few-shot linear probes (1-16 images per class, 3 seeds) and k-NN on the frozen encoder;
5. the curriculum across the whole run (kept by training in runs/demo/curriculum/): the masks of the same
   validation images every few epochs, each row labelled with its epoch and lambda (partner -> near neutral ->
   adversary), and the masks' statistics over the epochs (fraction kept, entropy, diversity, L_rec_soft);
6. a summary with real numbers from this run.

Every step skips what is already done (a second `make demo` finishes in a minute), and the
pre-training resumes if it was interrupted. Extra `section.key=value` arguments go to pre-training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path("data/digits")
RUN = Path("runs/demo")


def run(step: str, argv: list[str], program: str = "demo", **env: str) -> None:
    """One stage as a subprocess, its output streamed; a failure stops `program` naming the stage."""
    print(f"\n=== {step}: {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(argv, env={**os.environ, **env})
    if result.returncode != 0:
        sys.exit(f"{program}: '{step}' failed with exit code {result.returncode}")
    print(f"=== {step}: done in {time.perf_counter() - started:.0f} s", flush=True)


def console_script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def main() -> None:
    overrides = sys.argv[1:]
    started = time.perf_counter()
    if not (DATA / "train.beton").is_file() or not (DATA / "val.beton").is_file():
        run("convert the digits", [sys.executable, "-m", "data_prep", "digits", str(DATA), "--overwrite"])
    run(
        "pre-train CL-MAE (2 ranks, ZeRO-2)",
        [console_script("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "clmae.train", "--config"]
        + ["tiny_digits", f"run.output_dir={RUN.parent}", f"run.name={RUN.name}", "tracking.system_metrics=false"]
        + overrides,
        OMP_NUM_THREADS="1",
    )
    encoder = RUN / "encoder.safetensors"
    run("export the encoder", [console_script("clmae-export"), str(RUN), "--out", str(encoder), "--overwrite"])
    results = {}
    for protocol in ("fewshot", "knn"):
        out = RUN / f"{protocol}.json"
        run(f"evaluate: {protocol}", [console_script("clmae-eval"), protocol, str(RUN), "--out", str(out)])
        results[protocol] = json.loads(out.read_text())
    # Training kept the masks of the first 8 validation images every tracking.mask_images_every_epochs and their
    # statistics every epoch in runs/demo/curriculum/, whatever checkpoint pruning removed.
    run("draw the curriculum", [console_script("clmae-viz"), "curriculum", str(RUN)])
    print_summary(results, encoder, time.perf_counter() - started)


def print_summary(results: dict, encoder: Path, seconds: float) -> None:
    from clmae.checkpoint import find_latest, read_client_state
    from clmae.viz import STAT_LABELS, curriculum_label, curriculum_pictures, load_curriculum_stats

    state = read_client_state(find_latest(RUN))
    print("\n" + "=" * 78)
    print(f"CL-MAE demo finished in {seconds / 60:.1f} min")
    print(f"  run directory   {RUN.resolve()}  (epoch {state.epoch}, {state.global_step} steps)")
    print(f"  MLflow run      {state.mlflow_run_id}")
    store = f"sqlite:///{(RUN / 'mlflow.db').resolve()}"
    print(f"                  open it: .venv/bin/mlflow ui --backend-store-uri {store} --workers 1")
    # MLflow 3's UI starts in its GenAI view; this parameter opens the model-training one (Runs, Model metrics).
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri=store).get_run(state.mlflow_run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs/{state.mlflow_run_id}/model-metrics?workflowType=machine_learning"
    print(f"                  then: http://127.0.0.1:5000/{page}")
    print(f"  timm encoder    {encoder.resolve()}")
    records = load_curriculum_stats(RUN)
    rows = [curriculum_label(r["epoch"], r["lambda"]) for r in records.values()]
    pictured = {int(path.stem.rsplit("_", 1)[1]) for path in curriculum_pictures(RUN)}
    print(f"  mask pictures   {(RUN / 'masks_over_training.png').resolve()}")
    print("                  (8 validation images; per row: image, masked, reconstruction, m) rows:")
    for epoch in sorted(pictured):
        print(f"                    {curriculum_label(epoch, records[epoch]['lambda']) if epoch in records else epoch}")
    print(f"  mask statistics {(RUN / 'mask_stats.png').resolve()}  ({len(rows)} epochs)")
    header = ["epoch", "lambda", *STAT_LABELS]
    print("\n" + " | ".join(f"{h:>9}" for h in header))
    for r in records.values():
        lam = "-" if r["lambda"] is None else f"{r['lambda']:+.2f}"
        print(" | ".join([f"{r['epoch']:>9}", f"{lam:>9}", *(f"{r[k]:>9.4f}" for k in STAT_LABELS)]))
    from clmae.evaluate import format_table

    for protocol, report in results.items():
        print(f"\n{protocol} (validation, %):\n{format_table(protocol, report['results'])}")
    print("=" * 78)


if __name__ == "__main__":
    main()
