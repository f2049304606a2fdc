"""Ablation sweeps: each module has `get_config(arg)` and `sweep()` (see pupujepa_jax.sweep)."""
