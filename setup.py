"""Package metadata for dist_train, its one source (pyproject.toml names only the build system); exact tested versions
live in constraints.txt. The version is dist_train/__init__.py's __version__, read here as text (importing the
package would need torch at build time)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "dist_train" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="dist_train",
    version=VERSION,
    description="Distributed training of PyTorch image classifiers on Accelerate: CPU, one GPU, many GPUs, SLURM.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Environment :: Console",
        "Environment :: GPU :: NVIDIA CUDA",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",  # the CPU machines and CI
        "Programming Language :: Python :: 3.12",  # the GPU machines
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
        "Typing :: Typed",
    ],
    packages=find_packages(include=["dist_train", "dist_train.*"]),
    package_data={"dist_train": ["py.typed", "templates/project/*"]},
    entry_points={"console_scripts": ["dist-train = dist_train.commands.scaffold:main"]},
    python_requires=">=3.11",
    install_requires=[
        # the lower bounds are the GPU machines' versions (torch 2.11, torchvision 0.26, Python 3.12), where the
        # suite passes too (README, "Tested versions"); constraints.txt pins the newest tested
        "torch>=2.11",
        "torchvision>=0.26",
        "accelerate>=1.10,<2",
        "tensorboard>=2.15",
        "scikit-learn>=1.3",
        "safetensors>=0.4",
        "pyyaml>=6",
        "pillow>=10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "timm>=1.0,<2",
        "optuna>=4.0,<6",  # hpo: the study, its journal file and samplers (JournalFileBackend is 4.0's)
        "pyarrow>=14",  # tables: the multi-threaded CSV reader, the memory-mapped table cache (data/table_cache.py)
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15", "transformers>=4.40"],
        "wandb": ["wandb>=0.17"],
        "mlflow": ["mlflow-skinny>=2.10"],  # the client (tracking.trackers: [mlflow]); a server is the full `mlflow`
        "export": ["onnx>=1.14", "onnxruntime>=1.16"],
        "dev": ["build>=1.2", "pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.6", "pytest-randomly>=3.15", "psutil>=5.9", "wandb>=0.17",
                "mlflow-skinny>=2.10",
                # the docs site (make docs; tests/test_docs.py builds it)
                "mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings>=0.26", "mkdocstrings-python>=1.10"],
    },
)
