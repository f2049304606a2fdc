"""Install script for pupujepa_jax (PupuJEPA in JAX/Flax).

Lower bounds resolve on Python 3.11 (JAX 0.10.x, CPU) and on Python 3.12 (JAX 0.11.x, CUDA).
"""
from setuptools import find_packages, setup

setup(
    name="pupujepa_jax",
    version="0.1.0",
    description="PupuJEPA: frequency-aware JEPA music representation learning in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["pupujepa_jax*", "data_pipelines*", "experiments*"]),
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.12",
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "scipy>=1.13",
        "safetensors>=0.5",
        "json5>=0.9",
        "soundfile>=0.13",
        "soxr>=0.5",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8.1",
        "etils[epath,epy]>=1.12",
        "tensorboardX>=2.6.2",
        "matplotlib>=3.9",
        "tqdm>=4.66",
        "mir_eval>=0.8",
        "librosa>=0.11",
        "scikit-learn>=1.5",
        "music21>=9.1",
        "pretty_midi>=0.2.10",
        "absl-py>=2.1",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist>=3.6", "pytest-timeout>=2.3"],
        # Test-only reference for parity with the released PyTorch model (timm EVA blocks).
        "reference": ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.28"],
    },
    entry_points={"console_scripts": ["pupujepa=pupujepa_jax.cli:main"]},
)
