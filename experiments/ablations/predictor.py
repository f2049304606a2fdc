"""Ablation: predictor size (width / depth / heads; unknown in the release).

Runs: narrow-shallow 192/4/3, the tiny/small default 384/6/6, deeper 384/12/6 and the
base-and-up default 512/8/16. Every head dim is a multiple of 4 (2-D rotary embeddings).

Launch:
  pupujepa sweep --config experiments/ablations/predictor.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/predictor --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa

SIZES = {"pred_192x4": (192, 4, 3), "pred_384x6": (384, 6, 6),
         "pred_384x12": (384, 12, 6), "pred_512x8": (512, 8, 16)}


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  return [{"name": name, "overrides": {"predictor.width": width, "predictor.depth": depth,
                                       "predictor.num_heads": heads}}
          for name, (width, depth, heads) in SIZES.items()]
