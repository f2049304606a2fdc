"""Ablation: masking strategy mix and curriculum (SPEC section 4; mask_probs are unknown).

Runs: each strategy alone (random, block, time_frequency, I-JEPA multiblock), the default
curriculum, the same mix without warm-up, and two other final mixes.

Launch (prints the runs; --local trains them here one after another; --emit writes
cluster scripts):
  pupujepa sweep --config experiments/ablations/masking.py:variant=tiny,data=/data/pupu_tfds \
      --sweep_dir /ckpt/ablations/masking --emit slurm --out /ckpt/ablations/masking/launch

`get_config(arg)` takes the arguments of experiments/pupujepa.py (variant=, data=, folder=,
batch=, steps=, fsdp=, bf16, remat, smoke) and returns that config unchanged: every run of
`sweep()` differs from it only by its overrides.
"""
from experiments import pupujepa
from pupujepa_jax import masking


def get_config(arg: str = ""):
  return pupujepa.get_config(arg)


def sweep():
  """The runs: `{"name", "overrides": {dotted field: value}}` on top of get_config."""
  single = [{"name": f"only_{s}", "overrides": {"mask.strategy": s}}
            for s in masking.STRATEGIES]
  mixes = [
      # The default curriculum (random first, block/tf ramped in) and the same final mix
      # from step 0: does the warm-up matter?
      {"name": "curriculum_default", "overrides": {}},
      {"name": "mix_no_warmup", "overrides": {"mask.warmup_start": 0, "mask.warmup_end": 0}},
      {"name": "mix_structured", "overrides": {"mask.probs": (0.0, 0.5, 0.5, 0.0)}},
      {"name": "mix_random_heavy", "overrides": {"mask.probs": (0.8, 0.1, 0.1, 0.0)}},
  ]
  return single + mixes
