"""clmae-eval: the probe recipe and its lr rules, few-shot subsets, the k-NN protocols on hand-computed examples,
the protocol registry, the whole command line on real checkpoints and digits (results, JSON, MLflow; a
test-only protocol registered from tests/eval_plugin.py; the augmented probe on 2 ranks), fine-tuning on 2
ranks, and the errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from clmae.eval import PLUGINS_ENV, PluginError, protocols
from clmae.eval.features import Features
from clmae.eval.fewshot import FewShotError, balanced_subset, run_fewshot
from clmae.eval.knn import cosine_weighted, evaluate_knn, l2_majority
from clmae.eval.knn_reference import majority_smallest, reference_features, reference_knn
from clmae.eval.linprobe import LinearProbe, accuracy, peak_lr, train_linear_probe
from clmae.evaluate import DatasetMismatchError, check_classes, parse_args, run
from clmae.models import build_mae
from tests.conftest import PRETRAIN_IMG_SIZE

# --------------------------------------------------------------------------------------------------
# The protocols on tensors
# --------------------------------------------------------------------------------------------------


def separable_task(num: int, dim: int = 32, classes: int = 5, seed: int = 0):
    """Features off-centre and scaled (the BatchNorm must absorb that), labelled by a random linear map."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num, dim, generator=generator) * 3 + 5
    labels = (features @ torch.randn(dim, classes, generator=generator)).argmax(dim=1)
    return features, labels


def test_linear_probe_recipe_learns_a_linearly_separable_task():
    features, labels = separable_task(1500)
    probe = train_linear_probe(features[:1000], labels[:1000], num_classes=5, epochs=300, warmup_epochs=30)
    result = accuracy(probe, features[1000:], labels[1000:])
    assert result["top1"] > 95, result
    # The recipe's parts: BatchNorm without affine, LARS adapting the matrix only.
    assert not probe[0].affine and probe[0].eps == 1e-6


def test_linear_probe_is_a_function_of_features_labels_and_seed():
    """The few-shot table must not change between two evaluations of one checkpoint: no global RNG state."""
    features, labels = separable_task(200)
    probes = []
    for global_seed, seed in ((1, 7), (2, 7), (1, 8)):
        torch.manual_seed(global_seed)
        probes.append(train_linear_probe(features, labels, num_classes=5, epochs=3, warmup_epochs=1, seed=seed))
    same, other = probes[0].state_dict(), probes[1].state_dict()
    assert all(torch.equal(same[name], other[name]) for name in same)
    assert not torch.equal(probes[0][1].weight, probes[2][1].weight)


def test_fewshot_subsets_are_class_balanced_seeded_and_nested():
    labels = torch.arange(10).repeat_interleave(20)[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    subset = balanced_subset(labels, shots=4, seed=0, num_classes=10)
    assert torch.equal(torch.bincount(labels[subset], minlength=10), torch.full((10,), 4))
    assert torch.equal(subset, balanced_subset(labels, shots=4, seed=0, num_classes=10))
    assert not torch.equal(subset, balanced_subset(labels, shots=4, seed=1, num_classes=10))
    assert set(balanced_subset(labels, shots=2, seed=0, num_classes=10).tolist()) <= set(subset.tolist())
    with pytest.raises(FewShotError, match="fewer than 21 shots"):
        balanced_subset(labels, shots=21, seed=0, num_classes=10)


def test_fewshot_reports_every_seed_and_their_mean_and_std():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(120)  # 5 classes x 60 training + 60 test images
    features = torch.randn(5, 32, generator=generator)[labels] + 0.8 * torch.randn(600, 32, generator=generator)
    results = run_fewshot(
        features[:300], labels[:300], features[300:], labels[300:], 5, shots=(1, 16), seeds=(0, 1, 2), epochs=100
    )
    for shots in (1, 16):
        runs = [results[f"fewshot_{shots}shot/top1_seed{s}"] for s in (0, 1, 2)]
        assert results[f"fewshot_{shots}shot/top1_mean"] == pytest.approx(sum(runs) / 3)
        assert results[f"fewshot_{shots}shot/top1_std"] == pytest.approx(torch.tensor(runs).std().item(), rel=1e-5)
    assert results["fewshot_16shot/top1_mean"] > results["fewshot_1shot/top1_mean"]


def test_knn_l2_majority_by_hand():
    # 1-D features; test points 0.4, 10.6, 2.9 (labels 1, 2, 0).
    train = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [10.0], [11.0]])
    train_labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    test = torch.tensor([[0.4], [10.6], [2.9]])
    predictions, neighbours = l2_majority(train, train_labels, test, k=5)
    # 0.4: neighbours 0, 1, 2, 3, 4 -> labels 0 0 1 1 2: 0 and 1 tie, 0 has the nearest member.
    # 10.6: 11, 10, 4, 3, 2 -> 2 2 2 1 1: class 2.
    # 2.9: 3, 2, 4, 1, 0 -> 1 1 2 0 0: 1 and 0 tie, 1 has the nearest member.
    assert neighbours.tolist() == [[0, 0, 1, 1, 2], [2, 2, 2, 1, 1], [1, 1, 2, 0, 0]]
    assert predictions.tolist() == [0, 2, 1]

    both = Features(cls=test, patch_mean=test, labels=torch.tensor([1, 2, 0]), patch_mean_prenorm=lift(test))
    training = Features(cls=train, patch_mean=train, labels=train_labels, patch_mean_prenorm=lift(train))
    results = evaluate_knn(training, both, num_classes=3)
    assert results["knn_l2_k5/acc1"] == pytest.approx(100 / 3)  # only 10.6 is right
    assert results["knn_l2_k5/any_of_5"] == pytest.approx(100.0)  # every label is among the 5
    # The reference protocol on the same geometry (see the next test): 2.9's tie goes to class 0, right.
    assert results["knn_reference/acc1"] == pytest.approx(200 / 3)
    assert results["knn_reference/any_of_5"] == pytest.approx(100.0)


def lift(points):
    """(N, 1) -> (N, 4) pre-norm features whose LayerNorm (no affine) is, up to eps, cos(p / 10) a + sin(p / 10) b
    for a 1-D point p, with a = (1, -1, 1, -1) and b = (1, 1, -1, -1): zero mean and unit variance for every p, so
    the norm leaves them as they are, and their L2 distance 4 sin(|p - q| / 20) grows with |p - q| (for
    |p - q| <= 10 pi): the nearest neighbours are those of the 1-D points. The scale 3 and the shift 7 are
    what the norm removes."""
    a = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    b = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    angle = points / 10
    return 3.0 * (angle.cos() * a + angle.sin() * b) + 7.0


def test_reference_feature_is_layer_norm_without_affine_of_prenorm_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, biased variance (4 + 1 + 0 + 9) / 4 = 3.5
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0]]) / math.sqrt(3.5 + 1e-6)
    torch.testing.assert_close(reference_features(x), expected)
    torch.testing.assert_close(reference_features(10 * x - 4), reference_features(x))


def test_reference_knn_majority_ties_go_to_the_smallest_class_by_hand():
    train = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [10.0], [11.0]])
    train_labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    test = torch.tensor([[0.4], [10.6], [2.9]])
    predictions, neighbours = reference_knn(train, train_labels, test, k=5)
    # 0.4: labels 0 0 1 1 2: 0 and 1 tie -> 0 (smallest; also the nearest's).
    # 10.6: 2 2 2 1 1 -> 2.
    # 2.9: 1 1 2 0 0: 1 and 0 tie -> 0, the smallest label, although the nearest member is a 1 (our
    # post-norm variant `l2_majority` says 1 here, see test_knn_l2_majority_by_hand).
    assert neighbours.tolist() == [[0, 0, 1, 1, 2], [2, 2, 2, 1, 1], [1, 1, 2, 0, 0]]
    assert predictions.tolist() == [0, 2, 0]
    # The same rule as the reference's torch.mode, on rows with ties in every position.
    rows = torch.tensor([[2, 1, 1, 2, 0], [3, 3, 1, 1, 2], [4, 0, 4, 0, 4], [2, 2, 3, 3, 1]])
    assert majority_smallest(rows, 5).tolist() == [1, 1, 4, 2]
    assert torch.equal(majority_smallest(rows, 5), torch.mode(rows, dim=1).values)
    # Through the features: the lifted 4-D pre-norm points give the same neighbours after the norm.
    lifted = reference_knn(reference_features(lift(train)), train_labels, reference_features(lift(test)), k=5)
    assert lifted[1].tolist() == neighbours.tolist() and lifted[0].tolist() == [0, 2, 0]


def test_probe_lr_rules_mae_scales_by_batch_reference_is_flat():
    assert peak_lr(0.1, 16384, "mae") == pytest.approx(6.4)
    assert peak_lr(0.1, 256, "mae") == pytest.approx(0.1)
    assert peak_lr(0.1, 16384, "reference") == 0.1
    assert peak_lr(0.1, 1024, "reference") == 0.1
    with pytest.raises(ValueError, match="lr rule 'linear'"):
        peak_lr(0.1, 256, "linear")
    # One step of the probe: the bias is plain momentum SGD from zero, so after the first step it is
    # -lr * its gradient, at the peak lr (no warmup, first step of the cosine).
    features, labels = separable_task(64)
    initial = LinearProbe(32, 5, torch.Generator().manual_seed(3)).train()
    torch.nn.functional.cross_entropy(initial(features), labels).backward()
    gradient = initial[1].bias.grad
    for rule, lr in (("mae", 0.1 * 1024 / 256), ("reference", 0.1)):
        probe = train_linear_probe(
            features, labels, 5, epochs=1, warmup_epochs=0, batch_size=1024, base_lr=0.1, lr_rule=rule, seed=3
        )
        torch.testing.assert_close(probe[1].bias.detach(), -lr * gradient)


def test_protocol_registry_and_plugins(monkeypatch):
    monkeypatch.delenv(PLUGINS_ENV, raising=False)
    assert list(protocols()) == ["linprobe", "fewshot", "knn", "knn_reference", "finetune"]
    monkeypatch.setenv(PLUGINS_ENV, "tests.eval_plugin:PROTOCOL")
    assert list(protocols())[-1] == "centroid"
    assert parse_args(["centroid", "run", "--metric", "cosine"]).metric == "cosine"
    for spec, words in (
        ("tests.no_such_module:PROTOCOL", "cannot import 'tests.no_such_module'"),
        ("tests.eval_plugin:nearest_centroid", "is not a clmae.eval.protocol.Protocol"),
        ("clmae.eval.knn:PROTOCOL", "defines protocol 'knn', which already exists"),
    ):
        monkeypatch.setenv(PLUGINS_ENV, spec)
        with pytest.raises(PluginError, match=words):
            protocols()


def test_knn_weighted_cosine_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    train_labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[2.0, 0.0]])  # cosine 1, 0, 1/sqrt(2) to the three training points
    scores = cosine_weighted(train, train_labels, test, num_classes=3, k=2, temperature=0.5)
    # k=2: the first and the third vote, with exp(1 / 0.5) and exp(0.7071 / 0.5).
    expected = torch.tensor([[math.exp(2.0), math.exp(2**-0.5 / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)
    # Defaults (k=20 > 3 points, T=0.07): all three vote.
    scores = cosine_weighted(train, train_labels, test, num_classes=3)
    expected = torch.tensor([[math.exp(1 / 0.07), math.exp(0.0) + math.exp(2**-0.5 / 0.07), 0.0]])
    torch.testing.assert_close(scores, expected)


# --------------------------------------------------------------------------------------------------
# Data checks
# --------------------------------------------------------------------------------------------------


def copy_beton(source, folder, classes: dict | None):
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps(classes))
    return folder / source.name


def test_classes_must_match_between_train_and_val(digits, tmp_path):
    assert check_classes(str(digits / "train.beton"), str(digits / "val.beton")) == 10
    three = {str(i): {"index": i, "name": str(i)} for i in range(3)}
    other_list = copy_beton(digits / "val.beton", tmp_path / "other", three)
    with pytest.raises(DatasetMismatchError, match="different class lists"):
        check_classes(str(digits / "train.beton"), str(other_list))
    short_train = copy_beton(digits / "train.beton", tmp_path / "short", three)
    short_val = copy_beton(digits / "val.beton", tmp_path / "short_val", three)
    with pytest.raises(DatasetMismatchError, match=r"labels 0\.\.9 are outside the 3 classes"):
        check_classes(str(short_train), str(short_val))


# --------------------------------------------------------------------------------------------------
# The command line on real checkpoints
# --------------------------------------------------------------------------------------------------


def clmae_eval(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "clmae.evaluate", *args], capture_output=True, text=True, timeout=600, env=env
    )
    return result


def test_feature_cache_key_follows_interpolation_and_the_datasets_eval_transform(digits, tmp_path):
    """Features computed with one resize must never be served for another: the cache key changes with
    data.interpolation and with a dataset.json's eval transform, and only with what changes the pixels."""
    from clmae.config import load_config
    from clmae.eval.features import cache_file

    data = tmp_path / "val.beton"
    shutil.copy(digits / "val.beton", data)
    identity = {"path": "encoder.safetensors", "size": 1, "mtime_ns": 1}
    key = lambda *overrides: cache_file(tmp_path, identity, data, 32, load_config("tiny_digits", list(overrides)))
    bicubic, area = key(), key("data.interpolation=area")
    assert bicubic != area and key() == bicubic
    (tmp_path / "dataset.json").write_text(json.dumps({"eval_transform": {"mode": "resize_square"}}))
    assert key() != bicubic


@pytest.mark.distributed
def test_eval_on_digits_pretrained_beats_random_init(pretrained_runs, digits, tmp_path):
    run_dir = pretrained_runs["zero2"]
    knn = clmae_eval("knn", str(run_dir))
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert "knn_l2_k5/acc1" in knn.stdout and "knn_cosine_k20/top1" in knn.stdout
    linprobe = clmae_eval("linprobe", str(run_dir))
    assert linprobe.returncode == 0, linprobe.stderr[-3000:]
    assert linprobe.stdout.count("cached in") == 2  # k-NN's features, not a second forward pass
    eval_dir = run_dir / "eval" / "step_000000230"
    pretrained = {p: json.loads((eval_dir / f"{p}.json").read_text()) for p in ("knn", "linprobe")}

    # The same encoder before training (the run's own initialisation: seed 0), as an exported file.
    torch.manual_seed(0)
    random_file = tmp_path / "random_init.safetensors"
    save_file(build_mae("vit_tiny", img_size=PRETRAIN_IMG_SIZE).encoder_state_dict(), random_file)
    data = [f"data.train_path={digits / 'train.beton'}", f"data.val_path={digits / 'val.beton'}"]
    data.append(f"model.img_size={PRETRAIN_IMG_SIZE}")
    random = {}
    for protocol in ("knn", "linprobe"):
        out = tmp_path / f"random_{protocol}.json"
        result = clmae_eval(protocol, str(random_file), "--config", "tiny_digits", *data, "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        random[protocol] = json.loads(out.read_text())

    probe, probe_random = pretrained["linprobe"]["results"], random["linprobe"]["results"]
    knn_l2, knn_l2_random = pretrained["knn"]["results"], random["knn"]["results"]
    print(f"linear probe top-1: pretrained {probe['linprobe/top1']:.2f}, random {probe_random['linprobe/top1']:.2f}")
    print(f"k-NN L2 acc@1: pretrained {knn_l2['knn_l2_k5/acc1']:.2f}, random {knn_l2_random['knn_l2_k5/acc1']:.2f}")
    assert probe["linprobe/top1"] > probe_random["linprobe/top1"]
    assert knn_l2["knn_l2_k5/acc1"] > knn_l2_random["knn_l2_k5/acc1"]

    # MLflow: two new runs in the pre-training run's experiment and store, linked to it.
    pretrain_run_id = pretrained["knn"]["pretrain_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    pretrain = client.get_run(pretrain_run_id)
    runs = client.search_runs([pretrain.info.experiment_id], "tags.`clmae.pretrain_run_id` != ''")
    by_protocol = {r.data.tags["clmae.protocol"]: r for r in runs}
    assert set(by_protocol) == {"knn", "linprobe"}
    for protocol, mlflow_run in by_protocol.items():
        assert mlflow_run.data.tags["clmae.pretrain_run_id"] == pretrain_run_id
        assert mlflow_run.info.run_id == pretrained[protocol]["mlflow_run_id"]
    assert by_protocol["linprobe"].data.metrics["linprobe/top1"] == pytest.approx(probe["linprobe/top1"])


@pytest.mark.distributed
def test_protocols_end_to_end_plugin_reference_knn_and_augmented_probe(pretrained_runs, tmp_path):
    """Through the real clmae-eval on a real run: a test-only protocol registered from tests/eval_plugin.py,
    the reference k-NN, and the augmented probe with the reference lr rule on 2 ranks; each result file and
    MLflow run names its protocol and settings, and the numbers are those of the protocols' functions."""
    from tests.eval_plugin import nearest_centroid

    run_dir = pretrained_runs["zero3"]  # no other test evaluates it: its MLflow store holds only these runs
    env = {**os.environ, PLUGINS_ENV: "tests.eval_plugin:PROTOCOL", "OMP_NUM_THREADS": "1"}
    plugin = clmae_eval("centroid", str(run_dir), "--metric", "cosine", env=env)
    assert plugin.returncode == 0, plugin.stderr[-3000:]
    assert "centroid_cosine/top1" in plugin.stdout
    reference = clmae_eval("knn_reference", str(run_dir))  # a built-in one: no plugin needed
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert reference.stdout.count("cached in") == 2  # the plugin's features, not a second forward pass

    eval_dir = run_dir / "eval" / "step_000000003"
    reports = {p: json.loads((eval_dir / f"{p}.json").read_text()) for p in ("centroid", "knn_reference")}
    assert reports["centroid"]["protocol"] == "centroid"
    assert reports["centroid"]["settings"] == {"metric": "cosine", "feature": "cls"}
    assert reports["knn_reference"]["settings"]["k"] == 5
    assert "smallest class" in reports["knn_reference"]["settings"]["vote"]
    cached = {
        p.name.split("-")[0]: Features(**torch.load(p, weights_only=True)) for p in (eval_dir / "features").iterdir()
    }
    train, val = cached["train"], cached["val"]
    predictions = nearest_centroid(train.cls, train.labels, val.cls, 10, "cosine")
    expected = 100.0 * (predictions == val.labels).float().mean().item()
    assert reports["centroid"]["results"] == {"centroid_cosine/top1": pytest.approx(expected)}
    from clmae.eval.knn_reference import evaluate_reference

    assert reports["knn_reference"]["results"] == pytest.approx(evaluate_reference(train, val))

    out = tmp_path / "linprobe_augmented.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # A short augmented probe learns only with a large lr: the reference rule makes base_lr the peak itself
    # (MAE's rule would give 50 x 128 / 256 = 25). On a random encoder this reaches about 30 % (chance: 10 %).
    args = ["linprobe", str(run_dir), "--augment", "--lr-rule", "reference", "--base-lr", "50", "--batch-size", "128"]
    probe = subprocess.run(
        [*launch, "-m", "clmae.evaluate", *args, "--epochs", "5", "--warmup-epochs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["protocol"] == "linprobe"
    settings = report["settings"]
    assert settings["lr_rule"] == "reference" and settings["peak_lr"] == 50 and settings["batch_size"] == 128
    assert settings["train_images"] == "random_resized_crop_flip"
    assert report["results"]["linprobe/top1"] > 20, report["results"]  # 10 classes: chance is 10 %

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_run(reports["centroid"]["pretrain_run_id"]).info.experiment_id
    runs = {
        r.data.tags["clmae.protocol"]: r for r in client.search_runs([experiment], "tags.`clmae.pretrain_run_id` != ''")
    }
    assert set(runs) == {"centroid", "knn_reference", "linprobe"}
    assert runs["centroid"].data.params["eval.metric"] == "cosine"
    assert runs["centroid"].data.metrics["centroid_cosine/top1"] == pytest.approx(expected)
    assert runs["linprobe"].data.params["eval.lr_rule"] == "reference"


@pytest.mark.distributed
def test_fewshot_refuses_evaluation_images_among_labelled_ones(pretrained_runs, digits):
    args = parse_args(
        ["fewshot", str(pretrained_runs["zero3"]), "--epochs", "5", f"data.val_path={digits / 'train.beton'}"]
    )
    with pytest.raises(DatasetMismatchError, match="evaluation images could be among the labelled ones"):
        run(args)


@pytest.mark.distributed
def test_finetune_on_two_ranks(pretrained_runs, tmp_path):
    out = tmp_path / "finetune.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["finetune", str(pretrained_runs["zero2"]), "--epochs", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, "-m", "clmae.evaluate", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["settings"]["layer_decay"] == 0.65 and report["settings"]["mixup"] == 0.8
    # One epoch (23 steps) of the whole recipe runs through on both ranks; it is too short to learn past
    # chance under mixup + cutmix + RandAugment, so only the evaluation's sanity is checked here.
    results = report["results"]
    assert 0 <= results["finetune/top1"] <= results["finetune/top5"] <= 100, results
    assert results["finetune/best_top1"] == results["finetune/top1"]
    assert "fine-tune epoch 0: train loss" in result.stdout


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", "no such checkpoint"),
        ("model", "does not fit timm's vit_base_patch16_224"),
        ("classes", "different class lists"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(pretrained_runs, digits, tmp_path, case, words):
    run_dir = str(pretrained_runs["zero3"])
    if case == "missing":
        args = ["knn", str(tmp_path / "no_such_run")]
    elif case == "model":
        args = ["knn", run_dir, "model.name=vit_base_patch16"]
    else:
        three = {str(i): {"index": i, "name": str(i)} for i in range(3)}
        args = ["knn", run_dir, f"data.val_path={copy_beton(digits / 'val.beton', tmp_path / 'v', three)}"]
    result = clmae_eval(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_fewshot_table_lists_each_shot_count_in_order():
    from clmae.evaluate import format_table

    results = {
        "fewshot_16shot/top1_seed0": 61.0,
        "fewshot_16shot/top1_mean": 60.0,
        "fewshot_16shot/top1_std": 1.5,
        "fewshot_2shot/top1_mean": 30.25,
        "fewshot_2shot/top1_std": 2.0,
    }
    assert format_table("fewshot", results).splitlines()[1:] == ["2      30.25 +- 2.00", "16     60.00 +- 1.50"]
