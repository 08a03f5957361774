"""qdc_jax: quality, diversity and complexity of synthetic reasoning data, in JAX."""
import setuptools

# Why each dependency is here: see README.md, section "Dependencies".
INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.9",
    "grain>=0.2.2",
    "seqio>=0.0.19",
    "tensorflow-datasets>=4.9",
    "ml-collections>=0.1.1",
    "absl-py>=2.0",
    "numpy>=1.26",
    "sentencepiece>=0.2",
    "safetensors>=0.4",
    "tensorboard>=2.15",
    "matplotlib>=3.8",
    "math-verify>=0.7",
    "gcsfs>=2026.10.1",  # gs:// paths through etils.epath where TensorFlow is absent
]

# Hugging Face parity tests (Gemma-2 import/export) and the PyTorch / HF baselines in
# benchmarks/. torch is pinned to the 2.13.0 CPU build: an unpinned torch pulls GBs of CUDA.
_TORCH = ["torch==2.13.0", "transformers>=4.44"]
EXTRAS = {
    # scikit-dimension: the reference the intrinsic-dimension estimators are tested against.
    # nbclient, nbformat, ipykernel: tests/notebooks_test.py runs colabs/*.ipynb in a kernel.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "filelock>=3.12",
             "scikit-dimension>=0.5", "nltk>=3.8", "nbclient>=0.10", "nbformat>=5.9",
             "ipykernel>=6.29"] + _TORCH,
    "full": _TORCH,
}

setuptools.setup(
    name="qdc_jax",
    version="0.1.0",
    description="Quality, diversity and complexity of synthetic reasoning data, in JAX/Flax.",
    packages=setuptools.find_packages(include=["qdc_jax", "qdc_jax.*"]),
    package_data={"qdc_jax": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
