"""mpo-jax: Meta Policy Optimization in JAX.

`models/` (the Flax architectures and weight converters) is installed as `mpo_jax.models`
so that no top-level `models` module is installed.
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "transformers>=5.0",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "gguf>=0.17",
    "sentencepiece>=0.2",
    "jinja2>=3.1",
    "numpy>=1.26",
    "ml_collections>=1.0",
    "tensorflow-datasets>=4.9",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    "rouge-score>=0.1.2",
]
TEST = ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "import-linter>=2.1", "protobuf>=4", "nbclient>=0.10",
        "nbformat>=5.10", "ipykernel>=6.29"]
# The parity extra compares against transformers' PyTorch models (transformers needs accelerate to
# read GGUF files); torch 2.13.0 is the CPU
# wheel available on the project's machines.
PARITY = ["torch==2.13.0", "accelerate>=1.0"]
TPU = ["jax[tpu]>=0.10"]

setup(
    name="mpo-jax",
    version="0.1.0",
    description="Meta Policy Optimization (evolving-rubric RLAIF) in JAX/Flax, from a laptop CPU to a TPU pod",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mpo_jax", "mpo_jax.*"]) + ["mpo_jax.models"],
    package_dir={"mpo_jax.models": "models"},
    package_data={"mpo_jax": ["git_commit.txt"]},  # the commit, in a `git archive` of the checkout
    install_requires=CORE,
    extras_require={"test": TEST, "parity": TEST + PARITY, "tpu": TPU, "demo": []},
    entry_points={"console_scripts": ["mpo-jax=mpo_jax.cli:main"]},
    license="Apache-2.0",
)
