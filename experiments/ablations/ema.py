"""Ablation: the teacher's EMA momentum schedule (linear from start to end over the run).

Runs: I-JEPA's 0.996 -> 1.0 (default), M2D's 0.99995 -> 0.99999, a faster-moving teacher
0.99 -> 0.999, and a constant 0.999.

Launch:
  pupujepa sweep --config experiments/ablations/ema.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/ema --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  schedules = {"ema_ijepa": (0.996, 1.0), "ema_m2d": (0.99995, 0.99999),
               "ema_fast": (0.99, 0.999), "ema_const_0999": (0.999, 0.999)}
  return [{"name": name, "overrides": {"optim.ema": value}}
          for name, value in schedules.items()]
