"""`make wheelhouse` and the installs from it on a machine without network (clmae/wheelhouse.py, the Makefile).

One wheelhouse is built for this machine (with network: it downloads, or takes from pip's cache), then:
- its FFCV wheel is checked: one build for CPython 3.10+ (abi3) with OpenCV and libturbojpeg inside, whose
  extension uses no Python C function but PyModule_Create2, and which decodes a JPEG identically under another
  Python than the one that built it;
- the README's `pip install --no-index --find-links wheelhouse clmae` installs into a fresh venv inside a
  network namespace of its own (`unshare -n`: no route anywhere, so no index can be reached), beside a torch
  that is already there, which it keeps; then `benchmarks/gpu_check.sh --device cpu` runs with that venv in
  the same kind of namespace: end to end through the installed commands (clmae-prep, a pre-training killed
  with SIGKILL and resumed, clmae-export, clmae-eval), from a directory outside the checkout;
- `make setup WHEELHOUSE=...` does the same install for a checkout, and refuses a directory that is not a
  wheelhouse and a machine with no torch at all, each with one line that says what to do.

"A torch already there" is this environment's torch, torchvision and what they need, put on the new venv's
path by a `.pth` file, as a cluster's PyTorch module puts its site directory on the path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
OTHER_PYTHONS = ("3.12", "3.13", "3.10")

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")


def run(argv: list, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900, check: bool = True):
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, (
            f"{argv} failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
        )
    return result


def offline(argv: list) -> list:
    """`argv` in a network namespace of its own, with only the loopback interface up (torchrun's rendezvous)."""
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "offline", *argv]


def offline_env() -> dict[str, str]:
    """No pip configuration of this machine (its local indexes and wheel directories) and no project paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("TORCH_EXTENSIONS_DIR", None)  # each venv builds DeepSpeed's CPU op into its own cache
    return env


def torch_site(dest: Path) -> Path:
    """A directory holding this environment's torch and torchvision with everything they require (extras
    followed), numpy and pillow excepted (they come from the wheelhouse), as links."""
    from packaging.requirements import Requirement

    dest.mkdir()
    pending, seen = [("torch", ()), ("torchvision", ())], set()
    while pending:
        name, extras = pending.pop()
        key = canonicalize_name(name)
        if (key, extras) in seen or key in ("numpy", "pillow"):
            continue
        seen.add((key, extras))
        dist = metadata.distribution(key)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in ("", *extras)):
                pending.append((requirement.name, tuple(sorted(requirement.extras))))
        for top in {file.parts[0] for file in dist.files or []} - {"..", "__pycache__"}:
            if not (dest / top).exists():
                (dest / top).symlink_to(dist.locate_file(top))
    return dest


def new_venv(path: Path, torch_dir: Path | None) -> Path:
    run([sys._base_executable, "-m", "venv", path], cwd=path.parent)
    python = path / "bin" / "python"
    if torch_dir is not None:
        site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).stdout
        (Path(site.strip()) / "cluster_torch.pth").write_text(f"{torch_dir}\n")
    return python


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse") / "wheelhouse"
    result = run(["make", "wheelhouse", f"WHEELHOUSE={out}"], cwd=REPO, timeout=1200)
    assert f"wheelhouse: {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def cluster_torch(tmp_path_factory) -> Path:
    return torch_site(tmp_path_factory.mktemp("cluster") / "site-packages")


def test_wheelhouse_holds_clmae_and_its_dependencies_but_not_torch(wheelhouse):
    manifest = json.loads((wheelhouse / "wheelhouse.json").read_text())
    names = {canonicalize_name(w.split("-")[0]) for w in manifest["wheels"]}
    assert {"clmae", "deepspeed", "ffcv", "timm", "mlflow", "numpy", "setuptools", "assertpy", "fastargs"} <= names
    assert not names & {"torch", "torchvision", "triton"} and not any(n.startswith("nvidia-") for n in names)
    assert sorted(p.name for p in wheelhouse.glob("*.whl")) == manifest["wheels"]
    assert not [w for w in manifest["wheels"] if not w.endswith(".whl")]
    # DeepSpeed and the source-only dependencies are pure Python: they install on any Python and platform.
    assert next(wheelhouse.glob("deepspeed-*.whl")).name.endswith("-py3-none-any.whl")


def test_ffcv_wheel_is_one_abi3_build_with_its_libraries_inside(wheelhouse):
    from elftools.elf.elffile import ELFFile

    wheel = next(wheelhouse.glob("ffcv-*.whl"))
    assert re.fullmatch(r"ffcv-1\.0\.2-cp310-abi3-manylinux_2_\d+_x86_64\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        extension = next(n for n in names if n.startswith("ffcv/_libffcv"))
        assert extension == "ffcv/_libffcv.abi3.so"
        bundled = [n.split("/")[-1] for n in names if n.startswith("ffcv.libs/")]
        for library in ("libopencv_core", "libopencv_imgproc", "libturbojpeg"):
            assert any(n.startswith(library) for n in bundled), (library, bundled)
        with archive.open(extension) as so:
            symbols = ELFFile(so).get_section_by_name(".dynsym")
            undefined = {s.name for s in symbols.iter_symbols() if s["st_shndx"] == "SHN_UNDEF"}
    # The claim the limited-API build rests on: one function of the Python C API, and one in the stable ABI.
    assert {s for s in undefined if s.startswith(("Py", "_Py"))} == {"PyModule_Create2"}


DECODE = r"""
import ctypes, importlib.util, sys, tempfile, zipfile
from pathlib import Path

wheel, jpeg, height, width = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
root = Path(tempfile.mkdtemp())
zipfile.ZipFile(wheel).extractall(root)
so = root / "ffcv" / "_libffcv.abi3.so"
spec = importlib.util.spec_from_file_location("ffcv._libffcv", so)
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # PyInit__libffcv under this Python
lib = ctypes.CDLL(str(so))  # as ffcv.libffcv does
lib.imdecode.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p,
    ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
    ctypes.c_bool, ctypes.c_bool]
data = jpeg.read_bytes()
source, pixels = ctypes.create_string_buffer(data, len(data)), ctypes.create_string_buffer(height * width * 3)
code = lib.imdecode(source, len(data), height, width, pixels, height, width, 0, 0, 1, 1, False, False)
sys.stdout.write(f"{sys.version_info.major}.{sys.version_info.minor} {code} {pixels.raw.hex()}")
"""


def other_python() -> Path | None:
    """A CPython other than this one that runs, from pyenv or PATH (pyenv's shims on PATH may not run)."""
    for version in OTHER_PYTHONS:
        if version == f"{sys.version_info.major}.{sys.version_info.minor}":
            continue
        candidates = sorted(Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}"))
        candidates += [Path(p) for p in filter(None, [shutil.which(f"python{version}")])]
        for candidate in candidates:
            if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
                return candidate
    return None


def test_ffcv_wheel_decodes_the_same_under_another_python(wheelhouse, tmp_path):
    import numpy as np
    from PIL import Image

    python = other_python()
    if python is None:
        pytest.skip(f"no CPython {' / '.join(OTHER_PYTHONS)} here to load the abi3 extension with")
    rng = np.random.default_rng(0)
    picture = (rng.random((24, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "image.jpg", quality=90)
    wheel = next(wheelhouse.glob("ffcv-*.whl"))
    script = tmp_path / "decode.py"
    script.write_text(DECODE)
    outputs = {}
    for interpreter in (sys.executable, python):
        result = run([interpreter, "-I", script, wheel, tmp_path / "image.jpg", 24, 40], cwd=tmp_path)
        version, code, pixels = result.stdout.split()
        assert code == "0", (version, code)
        outputs[version] = bytes.fromhex(pixels)
    assert len(outputs) == 2 and len(set(outputs.values())) == 1, sorted(outputs)
    decoded = np.frombuffer(next(iter(outputs.values())), np.uint8).reshape(24, 40, 3).astype(float)
    reference = np.asarray(Image.open(tmp_path / "image.jpg"), float)  # another JPEG decoder: close, not bitwise
    assert np.abs(decoded - reference).mean() < 2.0


def test_pip_installs_offline_beside_a_torch_and_gpu_check_runs_on_cpu(wheelhouse, cluster_torch, tmp_path):
    python = new_venv(tmp_path / "venv", cluster_torch)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = offline_env()
    # The README's command, with no index and no network.
    run(offline([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse, "clmae[dev]"]),
        cwd=away, env=env)  # fmt: skip
    where = run([python, "-c", "import clmae, ffcv, torch; print(clmae.__file__, ffcv.__file__, torch.__file__)"],
                cwd=away, env=env).stdout.split()  # fmt: skip
    assert where[0].startswith(str(tmp_path / "venv")) and where[1].startswith(str(tmp_path / "venv")), where
    assert where[2] == str(cluster_torch / "torch" / "__init__.py"), "the torch already there was replaced"
    assert (Path(where[1]).parent.parent / "ffcv.libs").is_dir()
    assert not list((tmp_path / "venv").glob("lib/python*/site-packages/torch"))

    report = tmp_path / "report"
    check = [REPO / "benchmarks" / "gpu_check.sh", "--device", "cpu", "--python", python, "--report", report]
    result = run(offline(check), cwd=away, env=env, timeout=1200)
    summary = (report / "summary.txt").read_text()
    outcomes = dict(line.split()[:2] for line in summary.splitlines())
    assert outcomes == {"env": "PASS", "pytest-gpu": "SKIP", "throughput": "PASS", "e2e": "PASS"}, result.stdout
    assert f"clmae from {tmp_path / 'venv'}" in summary  # the installed package, not the checkout
    e2e = report / "e2e"
    assert "resumed from" in (e2e / "pretrain-resumed.log").read_text()
    assert (e2e / "encoder.safetensors").stat().st_size > 0
    assert re.search(r"steps 11-15 ran again with the same loss", summary), summary


def test_make_setup_from_a_wheelhouse_offline(wheelhouse, cluster_torch, tmp_path):
    env = offline_env()
    make = ["make", "-C", REPO, "--no-print-directory", "setup"]
    # Not a wheelhouse: one line, nothing created.
    refused = run(offline([*make, f"WHEELHOUSE={tmp_path}", f"VENV={tmp_path / 'none'}"]), cwd=tmp_path, env=env,
                  check=False)  # fmt: skip
    assert refused.returncode != 0 and f"WHEELHOUSE={tmp_path}: not a wheelhouse" in refused.stderr
    assert not (tmp_path / "none").exists()
    # No torch in the venv and none in the wheelhouse.
    new_venv(tmp_path / "bare", None)
    bare = run(offline([*make, f"WHEELHOUSE={wheelhouse}", f"VENV={tmp_path / 'bare'}"]), cwd=tmp_path, env=env,
               check=False)  # fmt: skip
    assert bare.returncode != 0 and "error: no torch in" in bare.stderr and "WHEEL_TORCH=1" in bare.stderr
    # A venv that sees the cluster's torch: clmae (editable, from the checkout) and its dependencies go in.
    new_venv(tmp_path / "venv", cluster_torch)
    result = run(offline([*make, f"WHEELHOUSE={wheelhouse}", f"VENV={tmp_path / 'venv'}"]), cwd=tmp_path, env=env)
    import torch

    assert f"beside torch {torch.__version__} from {cluster_torch / 'torch' / '__init__.py'}" in result.stdout
    python = tmp_path / "venv" / "bin" / "python"
    probe = "import deepspeed, ffcv, mlflow; print('found', deepspeed.__version__, ffcv.__file__)"
    found = run([python, "-c", probe], cwd=tmp_path, env=env).stdout.splitlines()[-1].split()  # after DeepSpeed's log
    versions = found[1:]
    deepspeed_wheel = next(wheelhouse.glob("deepspeed-*.whl")).name
    assert deepspeed_wheel.startswith(f"deepspeed-{versions[0]}-") and versions[1].startswith(str(tmp_path / "venv"))
