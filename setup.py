"""dss_jax: distilling step-by-step (Hsieh et al., 2023) on JAX/Flax, TPU-native."""

import re
from pathlib import Path

from setuptools import setup

VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "dss_jax" / "__init__.py").read_text(), re.M)[1]

# Versions checked together on Python 3.11. The core (model, partitioning, trainer, decoding)
# needs only the first block; TensorFlow and seqio belong to the data layer.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "safetensors==0.8.0",
    "gin-config==0.5.0",
    "numpy>=2.0,<3",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
]
DATA = [
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "importlib_resources==7.1.0",  # tensorflow-datasets imports it without declaring it
]
SERVE = ["fastapi==0.163.2", "uvicorn==0.54.0"]
TEACHER = ["openai==3.51.0"]

setup(
    name="dss_jax",
    version=VERSION,
    description="Distilling step-by-step: train small T5 students on LLM rationales with JAX/Flax",
    python_requires=">=3.10",
    packages=["dss_jax", "dss_jax.teacher", "dss_jax.tasks", "dss_jax.gin_configs"],
    # tasks/ is imported as dss_jax.tasks (why: tasks/__init__.py); gin/ ships inside the package so installed copies find it
    package_dir={"dss_jax": "dss_jax", "dss_jax.tasks": "tasks", "dss_jax.gin_configs": "gin"},
    package_data={"dss_jax.gin_configs": ["*/*.gin", "sweeps/*.json"], "dss_jax": ["prompts/*.json"]},
    install_requires=CORE + DATA,
    extras_require={
        # torch==2.13.0 is the CPU build on this project's machines; a bare `torch` pulls a CUDA build.
        # libtpu: dss-plan's ahead-of-time TPU compiles (0.0.42.1, what jax[tpu]==0.10.2 pins, crashes
        # compiling FSDP + remat steps on a CPU host; 0.0.51 compiles them).
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "ruff==0.17.6",
            # `make lint` type-checks dss_jax/ and tasks/; a new mypy release adds checks, so a clean run stays clean only pinned
            "mypy==2.4.1",
            "torch==2.13.0",
            "transformers==5.23.0",
            "libtpu==0.0.51",
            "matplotlib==3.11.2",
            "build==1.6.1",
            "httpx==0.28.1",
            *SERVE,
            *TEACHER,
        ],
        # dss-serve: the student behind an OpenAI-compatible HTTP API.
        "serve": SERVE,
        # dss-teacher: rationales from any OpenAI-compatible endpoint.
        "teacher": TEACHER,
        # launch/tpu_vm.py builds the sdist it ships to the TPU workers with the `build` frontend.
        "launch": ["build==1.6.1"],
        "tpu": ["libtpu==0.0.51"],
        "gpu": ["jax[cuda12]==0.10.2"],
        "plot": ["matplotlib==3.11.2"],
    },
    entry_points={
        "console_scripts": [
            "dss-convert=dss_jax.convert:main",
            "dss-vocab=dss_jax.tasks.vocab:main",
            "dss-train=dss_jax.train:main",
            "dss-data=dss_jax.tasks.data_stats:main",
            "dss-eval=dss_jax.evaluate:main",
            "dss-infer=dss_jax.infer:main",
            "dss-plan=dss_jax.plan:main",
            "dss-sweep=dss_jax.sweep:main",
            "dss-report=dss_jax.compare_runs:main",
            "dss-serve=dss_jax.serve:main",
            "dss-teacher=dss_jax.teacher.cli:main",
        ]
    },
)
