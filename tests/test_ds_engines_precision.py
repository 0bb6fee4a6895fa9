"""bf16 gradient numerics through real DeepSpeed engines (SPEC section 9: fp32 gradients, fp32 all-reduce).

One 2-rank launch (tests/workers/grad_precision_worker.py) accumulates micro-batch gradients whose sum bf16
cannot represent, through both of clmae's engines, under each shipped `zero{1,2,3}_bf16` file and two
variants, and reads the gradients back. Each test compares with the fp32 reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clmae.ds_engines import DS_CONFIG_DIR
from tests.workers.grad_precision_worker import reference_grad

WORLD = 2
STAGES = (1, 2, 3)
ENGINES = ("mae", "cmm")


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("grad_precision")
    worker = Path(__file__).parent / "workers" / "grad_precision_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    result = subprocess.run([*cmd, str(worker), str(out_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return torch.load(out_dir / "grads.pt", weights_only=True) | {
        "dtypes": json.loads((out_dir / "dtypes.json").read_text())
    }


def columns(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accumulation columns, communication columns): see the worker's docstring."""
    return grad[:, 0::2], grad[:, 1::2]


def test_every_bf16_file_sets_fp32_gradients():
    for path in sorted(DS_CONFIG_DIR.glob("*_bf16.json")):
        ds = json.loads(path.read_text())
        assert ds["data_types"]["grad_accum_dtype"] == "fp32", path
        assert ds["communication_data_type"] == "fp32", path


@pytest.mark.parametrize("stage", STAGES)
def test_shipped_bf16_files_accumulate_and_reduce_in_fp32(grads, stage):
    reference = reference_grad(WORLD)
    for engine in ENGINES:
        got = grads[f"zero{stage}_shipped"][engine]
        assert got["dtype"] == "torch.float32", (stage, engine, got["dtype"])
        torch.testing.assert_close(got["grad"], reference, rtol=0, atol=0, msg=f"zero{stage} {engine}")


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_default_rounds_gradients_to_bf16(grads, stage):
    """Without the keys, both the micro-batch sum and the sum over ranks lose the small terms: this is
    what the shipped files fix (and proves the test above can fail)."""
    accum_ref, comm_ref = columns(reference_grad(WORLD))
    for engine in ENGINES:
        accum, comm = columns(grads[f"zero{stage}_absent"][engine]["grad"])
        assert torch.equal(accum, torch.full_like(accum, 0.25)) and not torch.equal(accum, accum_ref), (stage, engine)
        assert torch.equal(comm, torch.full_like(comm, 0.125)) and not torch.equal(comm, comm_ref), (stage, engine)


@pytest.mark.parametrize("stage", STAGES)
def test_communication_dtype_is_honoured_on_its_own(grads, stage):
    """fp32 accumulation with a bf16 reduction: the sum over ranks loses the small term at every stage.
    Where the reduction happens differs: ZeRO-2/3 reduce every micro-batch's gradient (exact in bf16 here)
    and accumulate the reduced shards in fp32; ZeRO-1 with bf16 (DeepSpeed's BF16_Optimizer) accumulates in
    fp32 on the rank and reduces once at the boundary, rounding the rank's fp32 sum to bf16 first."""
    accum_ref, comm_ref = columns(reference_grad(WORLD))
    expected_accum = accum_ref if stage > 1 else accum_ref.bfloat16().float()
    for engine in ENGINES:
        accum, comm = columns(grads[f"zero{stage}_commbf16"][engine]["grad"])
        assert torch.equal(accum, expected_accum), (stage, engine, accum.unique())
        assert not torch.equal(accum_ref.bfloat16().float(), accum_ref)  # the rounding is visible
        assert torch.equal(comm, torch.full_like(comm, 0.125)) and not torch.equal(comm, comm_ref), (stage, engine)


def test_bf16_engines_give_fp32_m_and_fp32_loss_terms(grads):
    """SPEC section 9: the reference computes m and the CMM's losses in fp32 (fp16 autocast); so do we on bf16
    engines: the CMM's head, L_rec / L_rec_soft (pixel targets from fp32 images), L_gauss, L_KL, L_div."""
    dtypes = grads["dtypes"]
    assert dtypes["mae_params"] == dtypes["cmm_params"] == "torch.bfloat16", dtypes
    assert dtypes["m"] == dtypes["1-m"] == "torch.float32", dtypes
    terms = ("loss", "loss_rec_soft", "loss_gauss", "loss_kl", "loss_div", "loss_cmm", "mask_mean", "mask_entropy")
    for term in terms:
        assert dtypes[f"cmm_step/{term}"] == "torch.float32", (term, dtypes)
    assert dtypes["mae_step/loss"] == dtypes["mae_step/loss_rec"] == "torch.float32", dtypes
