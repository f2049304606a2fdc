"""Ablation: the released architecture's choices, one at a time (SPEC section 3).

Runs: the released architecture, and each choice switched to its alternative:
linear instead of log-spaced rotary bands, QK-norm on, a GELU MLP instead of SwiGLU,
EVA's attention bias without a key bias, and a teacher with its own EMA patch
embedding instead of reading the student's.

Launch:
  pupujepa sweep --config experiments/ablations/architecture.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/architecture --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  return [
      {"name": "released", "overrides": {}},
      {"name": "rope_linear_bands", "overrides": {"model.rope_linear_bands": True}},
      {"name": "qk_norm", "overrides": {"model.qk_norm": True}},
      {"name": "gelu_mlp", "overrides": {"model.swiglu": False}},
      {"name": "no_k_bias", "overrides": {"model.k_bias": False}},
      {"name": "ema_patch_embed", "overrides": {"teacher_patch_embed": "ema"}},
  ]
