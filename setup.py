from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path("cpt_ds/__init__.py").read_text().split('"""', 2)[2], version)

setup(
    name="cpt-ds",
    version=version["__version__"],
    description="DeepSpeed-native continued pretraining for LLaMA-3 models",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cpt_ds", "cpt_ds.*"]),
    install_requires=[
        # torch is pinned by the installer (see README): an unpinned torch pulls a multi-GB CUDA build.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "peft>=0.13",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "sentencepiece>=0.2",
        "protobuf>=4",
        "tiktoken>=0.7",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "pyarrow>=15",
        "zstandard>=0.22",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "quant": ["bitsandbytes>=0.45"],
        # use_liger_kernel: Liger-Kernel's fused linear cross entropy and RMSNorm / SwiGLU / RoPE (CUDA, Triton)
        "gpu": ["liger-kernel>=0.5"],
        "plot": ["matplotlib>=3.8"],
        # pytest-xdist: the README's test command runs the suite on 2 workers (docs/testing.md)
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "bitsandbytes>=0.45", "matplotlib>=3.8"],
    },
)
