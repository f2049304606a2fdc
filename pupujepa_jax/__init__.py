"""PupuJEPA in JAX: pretraining, export and inference of frequency-aware music encoders.

`pupujepa_jax.load(model_dir)` returns an embedding `Model` (see `pupujepa_jax.inference`).
"""


def load(model_dir, **kwargs):
  """Load an exported model directory as an `inference.Model` (lazy: keeps imports light)."""
  from pupujepa_jax import inference
  return inference.load(model_dir, **kwargs)
