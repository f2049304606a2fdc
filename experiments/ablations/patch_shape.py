"""Ablation: patch shape (time frames x mel bins): 4x16 (released), 16x16, 2x128 full-band.

Full-band patches (patch_time=2, patch_freq=128) make a (crop_frames / 2) x 1 grid: one
token per 20 ms covering all mel bins, as in frame-level models. 16x16 is the ViT/AST
square patch (a 4 x fewer tokens than 4x16).

Launch:
  pupujepa sweep --config experiments/ablations/patch_shape.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/patch_shape --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  shapes = {"patch_4x16": (4, 16), "patch_16x16": (16, 16), "patch_2x128_fullband": (2, 128)}
  return [{"name": name, "overrides": {"model.patch_time": t, "model.patch_freq": f}}
          for name, (t, f) in shapes.items()]
