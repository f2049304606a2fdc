"""Ablation: 2-D rotary position embeddings (released) vs 2-D absolute sin-cos embeddings.

Launch:
  pupujepa sweep --config experiments/ablations/positions.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/positions --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  return [{"name": f"pos_{p}", "overrides": {"model.pos_embed": p}} for p in ("rope", "sincos")]
