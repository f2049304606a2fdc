"""Ablation: the latent loss: smooth-L1 (I-JEPA, default), normalised MSE (M2D), plain MSE.

Launch:
  pupujepa sweep --config experiments/ablations/loss.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/loss --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  return [{"name": f"loss_{l}", "overrides": {"loss": l}}
          for l in ("smooth_l1", "normalized_mse", "mse")]
