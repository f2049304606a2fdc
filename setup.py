"""Install script for pupujepa_jax (PupuJEPA in JAX/Flax).

The core install embeds audio with an exported model (`pupujepa embed`,
`pupujepa_jax.load(...).embed(...)`) and imports released checkpoints. Extras bring the
rest: `[train]` pretraining (data pipeline, logs), `[data]` ingest and the MARBLE
builders, `[offline]` the offline music corpus, `[eval]` probes, baselines and pictures,
`[reference]` the PyTorch reference of the parity tests, `[test]` the test runner,
`[all]` everything but the reference. Lower bounds resolve on Python 3.11 (JAX 0.10.x,
CPU) and on Python 3.12 (JAX 0.11.x, CUDA).
"""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",              # Flax depends on it; the train step and probe use it
    "orbax-checkpoint>=0.11.0",  # Flax depends on it; checkpoints
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "scipy>=1.13",
    "safetensors>=0.5",
    "json5>=0.9",
    "soundfile>=0.13",
    "soxr>=0.5",
    "tqdm>=4.66",
]
DATA = [
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.9",
    "array-record>=0.8.1",
    "etils[epath,epy]>=1.12",
    # TFDS's builders read their own resources through etils.epath, which imports
    # importlib_resources on every Python; neither declares it.
    "importlib_resources>=6.0",
    "absl-py>=2.1",
    "threadpoolctl>=3.5",
]
TRAIN = DATA + ["tensorboardX>=2.6.2", "matplotlib>=3.9"]
EVAL = ["scikit-learn>=1.5", "mir_eval>=0.8", "librosa>=0.11", "matplotlib>=3.9"]
# tinysoundfont renders the corpus; install it with --no-deps (its pyaudio dependency
# does not build and is not needed): `pip install --no-deps 'tinysoundfont>=0.3.7'`.
OFFLINE = ["music21>=9.1", "pretty_midi>=0.2.10"]

setup(
    name="pupujepa_jax",
    version="0.2.0",
    description="PupuJEPA: frequency-aware JEPA music representation learning in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["pupujepa_jax*", "data_pipelines*", "experiments*"]),
    package_data={"pupujepa_jax": ["native/*.c"]},  # the CPU block cache, built on first use
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "train": TRAIN,
        "eval": EVAL,
        "offline": OFFLINE,
        "all": sorted(set(TRAIN + EVAL + OFFLINE)),
        # Test-only reference for parity with the released PyTorch model (timm EVA blocks).
        "reference": ["torch==2.14.1", "torchvision==0.29.1", "timm==1.0.28"],
        "test": ["pytest>=8.0", "pytest-xdist>=3.6", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["pupujepa=pupujepa_jax.cli:main"]},
)
