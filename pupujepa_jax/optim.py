"""Optimizer and schedules of the training recipe, all pure functions of the step.

AdamW with a linear warm-up + cosine learning rate, a cosine weight-decay schedule and no
decay on biases, norms, layer-scales and the mask token (only Dense/Conv `kernel`s decay);
the EMA momentum of the teacher ramps linearly over the run (SPEC section 5).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate(cfg):
  o = cfg.optim
  warmup = max(int(o.warmup_steps), 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(int(cfg.total_steps), warmup + 1), end_value=o.min_lr)


def weight_decay(cfg):
  start, end = cfg.optim.weight_decay
  total = max(int(cfg.total_steps), 1)

  def schedule(step):
    frac = jnp.clip(step / total, 0.0, 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return schedule


def ema_momentum(cfg):
  start, end = cfg.optim.ema
  total = max(int(cfg.total_steps), 1)

  def schedule(step):
    return start + (end - start) * jnp.clip(step / total, 0.0, 1.0)
  return schedule


def decay_mask(params):
  """True for weight matrices (Dense/Conv kernels), False for 1-D-like params."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(cfg, step=0) -> optax.GradientTransformation:
  """AdamW with the learning rate and weight decay of `step` (the train state's step).

  The schedules read the train state's step, not a counter of their own, so the step is
  the run's one clock (an imported or resumed state cannot drift from its schedule).
  The optimizer state (Adam moments and count) has the same structure for every step.
  """
  o = cfg.optim
  adamw = optax.adamw(learning_rate=learning_rate(cfg)(step), b1=o.b1, b2=o.b2,
                      weight_decay=weight_decay(cfg)(step), mask=decay_mask)
  if o.grad_clip:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
  return adamw


def ema_update(teacher, student, momentum):
  return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)
