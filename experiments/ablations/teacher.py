"""Ablation: the teacher encodes only the target patches (released) or the full grid (I-JEPA).

Launch:
  pupujepa sweep --config experiments/ablations/teacher.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/teacher --local

`get_config(arg)` takes the arguments of experiments/pupujepa.py and returns that config.
"""
from experiments import pupujepa


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  return [{"name": f"teacher_{m}", "overrides": {"teacher_mode": m}}
          for m in ("targets_only", "full_grid")]
