"""Target/context masks of the token grid and the masking curriculum (SPEC section 4).

Everything here runs inside the jitted train step: `grid`, `batch_size` and the mask config
are static, `step` and the PRNG key are traced. Every strategy hides exactly
`floor(ratio * L)` of the `L = H * W` tokens (time-major index `t * W + f`), so the index
arrays handed to the model have static shapes, and context is always the complement of the
targets (disjoint and covering).

The rectangle-placing strategies (block, time_frequency) are a `lax.scan` over a fixed
number of attempts. Each attempt draws one rectangle, builds it as a broadcast comparison of
iota grids against its bounds, and adds it if its new cells fit in the remaining budget;
the first rectangle that does not fit stops the loop (later attempts add nothing). A top-k
over random priorities, where cells already masked outrank all others, then tops the mask
up to exactly the target count with random patches.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The one list of mask strategies; the index is the id logged per step and the position
# of the strategy's probability in `MaskConfig.probs`.
STRATEGIES = ("random", "block", "time_frequency", "multiblock")
CURRICULUM = "curriculum"  # draw one strategy per batch from the curriculum

# I-JEPA multiblock constants (ablation only; not in the config schema).
MULTIBLOCK_NUM_TARGETS = 4
MULTIBLOCK_TARGET_SCALE = (0.15, 0.2)
MULTIBLOCK_TARGET_ASPECT = (0.75, 1.5)
MULTIBLOCK_CONTEXT_SCALE = (0.85, 1.0)
# Block aspect (height along time / width along frequency) ranges.
BLOCK_VERTICAL_ASPECT = (2.0, 5.0)
BLOCK_HORIZONTAL_ASPECT = (0.2, 0.5)


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """The `mask` config group, typed and hashable (a static argument of the jitted step)."""
  strategy: str = CURRICULUM   # "curriculum" or one of STRATEGIES (always that one)
  ratio: float = 0.8           # targets = floor(ratio * L)
  probs: tuple = (0.4, 0.3, 0.3, 0.0)  # (unknown) final probability per STRATEGIES entry
  warmup_start: int = 10_000   # (unknown) before: random only
  warmup_end: int = 50_000     # (unknown) the other probabilities ramp up to here
  max_attempts: int = 150
  block_scale: tuple = (0.01, 0.05)
  stripe_max_time: int = 40

  def validate(self, grid) -> "MaskConfig":
    """Raise ValueError naming the field (`mask.<field>`) if the config is impossible."""
    if self.strategy != CURRICULUM and self.strategy not in STRATEGIES:
      raise ValueError(f"mask.strategy: unknown strategy {self.strategy!r}; known: "
                       f"{(CURRICULUM,) + STRATEGIES}")
    probs = self.probs
    if (len(probs) != len(STRATEGIES) or any(not 0.0 <= p <= 1.0 for p in probs)
        or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)):
      raise ValueError(f"mask.probs={tuple(probs)} must be {len(STRATEGIES)} non-negative "
                       f"numbers summing to 1, one per strategy {STRATEGIES}")
    if not 0.0 < self.ratio < 1.0:
      raise ValueError(f"mask.ratio={self.ratio} must be in (0, 1)")
    if not 0 <= self.warmup_start <= self.warmup_end:
      raise ValueError(f"mask.warmup_start={self.warmup_start} and mask.warmup_end="
                       f"{self.warmup_end} must satisfy 0 <= start <= end")
    if not 1 <= self.max_attempts <= 10_000:
      raise ValueError(f"mask.max_attempts={self.max_attempts} must be in [1, 10000]")
    low, high = self.block_scale
    if not (len(self.block_scale) == 2 and 0.0 < low <= high <= 1.0):
      raise ValueError(f"mask.block_scale={tuple(self.block_scale)} must be (low, high) "
                       "with 0 < low <= high <= 1")
    if self.stripe_max_time < 1:
      raise ValueError(f"mask.stripe_max_time={self.stripe_max_time} must be >= 1")
    n = num_targets(grid, self.ratio)
    if n < 1 or n >= grid[0] * grid[1]:
      raise ValueError(f"mask.ratio={self.ratio} leaves no context or no targets on a "
                       f"{grid[0]}x{grid[1]} grid")
    return self


class Masks(NamedTuple):
  context: jax.Array   # int32 [B, Lc] sorted token indices
  target: jax.Array    # int32 [B, Lt] sorted token indices
  strategy: jax.Array  # int32 scalar id into STRATEGIES


def num_targets(grid: tuple[int, int], ratio: float) -> int:
  """Number of target tokens: int(ratio * H * W), as the release's block and stripe masks.

  The release's random masking keeps int(L * (1 - ratio)) tokens as context instead,
  which float round-off makes one fewer (409 of 2048 at ratio 0.8, so 1639 targets).
  A jitted step needs one static count for every strategy, so random masking here hides
  int(ratio * L) = 1638 as well: one token fewer than the release.
  """
  return int(math.floor(ratio * grid[0] * grid[1]))


def strategy_probs(step, mask_cfg: MaskConfig) -> jax.Array:
  """float32 [len(STRATEGIES)] probabilities at `step` (the release's curriculum).

  Before warmup_start only random masking; between start and end every other strategy's
  probability ramps linearly from 0 to its target and random takes the rest; after the
  end, `probs` exactly.
  """
  p = mask_cfg
  if p.strategy != CURRICULUM:
    return jax.nn.one_hot(STRATEGIES.index(p.strategy), len(STRATEGIES), dtype=jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  span = max(p.warmup_end - p.warmup_start, 1)
  frac = jnp.clip((step - p.warmup_start) / span, 0.0, 1.0)
  others = frac * jnp.asarray(p.probs[1:], jnp.float32)
  ramp = jnp.concatenate([(1.0 - others.sum())[None], others])
  final = jnp.asarray(p.probs, jnp.float32)
  # After the ramp the configured probabilities exactly (no float round-off in `random`).
  return jnp.where(step >= p.warmup_end, final, ramp).astype(jnp.float32)


def _rect_mask(grid, top, left, h, w) -> jax.Array:
  """bool [H, W]: the rectangle [top, top+h) x [left, left+w)."""
  t = jnp.arange(grid[0])[:, None]
  f = jnp.arange(grid[1])[None, :]
  return (t >= top) & (t < top + h) & (f >= left) & (f < left + w)


def _uniform_int(u, low, high):
  """An int32 in [low, high) from u ~ U[0, 1) (traced bounds)."""
  value = low + jnp.floor(u * (high - low)).astype(jnp.int32)
  return jnp.minimum(value, high - 1)  # u * n may round up to n in float32


# The rectangle drawers take all their randomness from one uniform vector: one PRNG call
# per attempt keeps the scan body (and its compile time) small.


def _block_rectangle(rng, grid, block_scale, remaining):
  """One block attempt: (top, left, h, w) int32 scalars.

  Area fraction U(block_scale) of the grid, capped by `remaining` cells; with p=0.5
  vertical (h/w ~ U(2, 5)) else horizontal (h/w ~ U(0.2, 0.5)); h runs along time.
  """
  u = jax.random.uniform(rng, (5,))
  height, width = grid
  area = (block_scale[0] + u[0] * (block_scale[1] - block_scale[0])) * height * width
  area = jnp.minimum(area, jnp.asarray(remaining, jnp.float32))
  vertical = u[1] < 0.5
  lo = jnp.where(vertical, BLOCK_VERTICAL_ASPECT[0], BLOCK_HORIZONTAL_ASPECT[0])
  hi = jnp.where(vertical, BLOCK_VERTICAL_ASPECT[1], BLOCK_HORIZONTAL_ASPECT[1])
  ar = lo + u[2] * (hi - lo)
  # int() truncation as in the release, then clipped to the grid (at least one cell).
  h = jnp.clip(jnp.floor(jnp.sqrt(area) * jnp.sqrt(ar)).astype(jnp.int32), 1, height)
  w = jnp.clip(jnp.floor(jnp.sqrt(area) / jnp.sqrt(ar)).astype(jnp.int32), 1, width)
  return _uniform_int(u[3], 0, height - h + 1), _uniform_int(u[4], 0, width - w + 1), h, w


def _stripe_rectangle(rng, grid, stripe_max_time, remaining):
  """One time-frequency attempt: (top, left, h, w) int32 scalars.

  With p = H / (H + W) a time stripe of U{1..stripe_max_time} consecutive time steps over
  all frequencies, shrunk to max(1, remaining // W) steps when it would exceed the
  `remaining` budget; otherwise a frequency stripe one band wide over all time (the
  release shrinks it the same way, to max(1, remaining // H) = 1 band).
  """
  u = jax.random.uniform(rng, (4,))
  height, width = grid
  is_time = u[0] < height / (height + width)
  length = _uniform_int(u[1], 1, stripe_max_time + 1)
  length = jnp.where(length * width > remaining, jnp.maximum(1, remaining // width), length)
  length = jnp.minimum(length, height)
  top = jnp.where(is_time, _uniform_int(u[2], 0, height - length + 1), 0)
  left = jnp.where(is_time, 0, _uniform_int(u[3], 0, width))
  h = jnp.where(is_time, length, height)
  w = jnp.where(is_time, width, 1)
  return top, left, h, w


def _top_up(rng, preference, count) -> jax.Array:
  """bool [L]: exactly `count` cells, highest `preference` (0..3) first, random within.

  Each cell gets a unique uint32 key (preference | random bits | own index), so the
  threshold at the count-th largest key selects exactly `count` cells; one sort compiles
  faster than a top-k and a scatter. Cells with equal random bits (rare) tie-break by index.
  """
  length = preference.shape[0]
  index_bits = max(1, (length - 1).bit_length())
  random_bits = 30 - index_bits
  if random_bits < 8:
    raise ValueError(f"grid: {length} tokens are too many for the mask sampler")
  noise = jax.random.bits(rng, (length,), jnp.uint32) >> (32 - random_bits)
  key = ((preference.astype(jnp.uint32) << 30) | (noise << index_bits)
         | jnp.arange(length, dtype=jnp.uint32))
  return key >= jnp.sort(key)[length - count]


def _budgeted_rectangles(rng, grid, budget, max_attempts, draw):
  """(bool [H, W], count): rectangles added until one would exceed `budget`.

  `draw(rng, remaining)` returns one rectangle (top, left, h, w). The first rectangle whose
  new cells exceed the remaining budget stops the loop: later attempts add nothing.
  """
  def attempt(state, key):
    mask, count, stopped = state
    rect = _rect_mask(grid, *draw(key, budget - count))
    new = jnp.sum(rect & ~mask, dtype=jnp.int32)
    stopped = stopped | (count + new > budget)
    mask = jnp.where(stopped, mask, mask | rect)
    count = jnp.where(stopped, count, count + new)
    return (mask, count, stopped), None

  init = (jnp.zeros(grid, bool), jnp.int32(0), jnp.bool_(False))
  (mask, count, _), _ = jax.lax.scan(attempt, init, jax.random.split(rng, max_attempts))
  return mask, count


def _place_rectangles(rng, grid, budget, max_attempts, draw) -> jax.Array:
  """bool [H*W] with exactly `budget` cells: budgeted rectangles, then random top-up."""
  k_attempts, k_fill = jax.random.split(rng)
  mask, _ = _budgeted_rectangles(k_attempts, grid, budget, max_attempts, draw)
  return _top_up(k_fill, mask.reshape(-1), budget)


def _random_mask(rng, grid, p: MaskConfig) -> jax.Array:
  # A random permutation (sorting random keys) whose last floor(ratio * L) are targets.
  length = grid[0] * grid[1]
  return _top_up(rng, jnp.zeros(length, jnp.int32), num_targets(grid, p.ratio))


def _block_mask(rng, grid, p: MaskConfig) -> jax.Array:
  draw = lambda k, remaining: _block_rectangle(k, grid, p.block_scale, remaining)
  return _place_rectangles(rng, grid, num_targets(grid, p.ratio), p.max_attempts, draw)


def _time_frequency_mask(rng, grid, p: MaskConfig) -> jax.Array:
  draw = lambda k, remaining: _stripe_rectangle(k, grid, p.stripe_max_time, remaining)
  return _place_rectangles(rng, grid, num_targets(grid, p.ratio), p.max_attempts, draw)


def _multiblock_rectangle(rng, grid, scale, aspect):
  """An I-JEPA block (top, left, h, w) whose area survives clipping to a narrow grid."""
  u = jax.random.uniform(rng, (4,))
  height, width = grid
  area = (scale[0] + u[0] * (scale[1] - scale[0])) * height * width
  ar = aspect[0] + u[1] * (aspect[1] - aspect[0])
  # I-JEPA rounds sqrt(area / ar) for the width; when the grid is narrower than that (8
  # frequency bands) the block grows along time instead so it keeps its area.
  w = jnp.clip(jnp.round(jnp.sqrt(area / ar)).astype(jnp.int32), 1, width)
  h = jnp.clip(jnp.round(area / w).astype(jnp.int32), 1, height)
  return _uniform_int(u[2], 0, height - h + 1), _uniform_int(u[3], 0, width - w + 1), h, w


def _multiblock_mask(rng, grid, p: MaskConfig) -> jax.Array:
  """I-JEPA multiblock adapted to a non-square grid with static counts (ablation).

  Adaptations: (1) I-JEPA clamps its context block to a square, which on a 256 x 8 grid
  keeps ~30% of it; here the context block spans all frequencies and scale * H time steps,
  so it keeps 85-100% of the grid as intended. Target blocks keep their area when the
  grid is too narrow (see `_multiblock_rectangle`). (2) Counts are forced static: targets
  are the union of the 4 target blocks, trimmed at random or topped up to exactly
  floor(ratio * L), first with cells outside the context block (which I-JEPA would leave
  unused) and then from the context block; context is the complement.
  """
  height, width = grid
  k_targets, k_context, k_fill = jax.random.split(rng, 3)
  rects = jax.vmap(lambda k: _rect_mask(grid, *_multiblock_rectangle(
      k, grid, MULTIBLOCK_TARGET_SCALE, MULTIBLOCK_TARGET_ASPECT)))(
          jax.random.split(k_targets, MULTIBLOCK_NUM_TARGETS))
  targets = jnp.any(rects, axis=0)
  u = jax.random.uniform(k_context, (2,))
  lo, hi = MULTIBLOCK_CONTEXT_SCALE
  ctx_h = jnp.clip(jnp.round((lo + u[0] * (hi - lo)) * height).astype(jnp.int32), 1, height)
  context_block = _rect_mask(grid, _uniform_int(u[1], 0, height - ctx_h + 1), 0, ctx_h, width)
  # Preference: target blocks (2) > outside the context block (1) > context block (0).
  preference = jnp.where(targets, 2, jnp.where(context_block, 0, 1))
  return _top_up(k_fill, preference.reshape(-1), num_targets(grid, p.ratio))


_GENERATORS = {
    "random": _random_mask,
    "block": _block_mask,
    "time_frequency": _time_frequency_mask,
    "multiblock": _multiblock_mask,
}


def sample_target_mask(rng, strategy: str, grid, mask_cfg: MaskConfig) -> jax.Array:
  """bool [H*W] (index t*W + f) with exactly floor(ratio * L) targets; one sample."""
  if strategy not in _GENERATORS:
    raise ValueError(f"strategy: unknown strategy {strategy!r}; known: {STRATEGIES}")
  return _GENERATORS[strategy](rng, tuple(grid), mask_cfg)


def _to_indices(target: jax.Array, num_target: int) -> tuple[jax.Array, jax.Array]:
  """[B, L] bool -> sorted context [B, L - n] and target [B, n] int32 indices."""
  # A stable argsort on "not target" lists targets first, each part in index order.
  order = jnp.argsort(~target, axis=-1, stable=True).astype(jnp.int32)
  return order[:, num_target:], order[:, :num_target]


def sample_masks(rng, step, grid, batch_size: int, mask_cfg: MaskConfig) -> Masks:
  """A batch of masks: one strategy per batch drawn from the curriculum at `step`.

  Jittable with `rng` and `step` traced; `grid`, `batch_size` and `mask_cfg` are static.
  """
  p = mask_cfg
  grid = tuple(grid)
  k_strategy, k_masks = jax.random.split(rng)
  keys = jax.random.split(k_masks, batch_size)
  generate = lambda name: jax.vmap(functools.partial(sample_target_mask, strategy=name,
                                                     grid=grid, mask_cfg=p))
  if p.strategy != CURRICULUM:
    # Fixed strategy: compile only its generator.
    strategy = jnp.int32(STRATEGIES.index(p.strategy))
    target = generate(p.strategy)(keys)
  else:
    # Only strategies the curriculum can draw are compiled (random always can).
    active = [i for i, prob in enumerate(p.probs) if prob > 0 or i == 0]
    logits = jnp.log(strategy_probs(step, p)[np.asarray(active)])
    choice = jax.random.categorical(k_strategy, logits)
    strategy = jnp.asarray(active, jnp.int32)[choice]
    target = jax.lax.switch(choice, [generate(STRATEGIES[i]) for i in active], keys)
  context, target_idx = _to_indices(target, num_targets(grid, p.ratio))
  return Masks(context=context, target=target_idx, strategy=strategy)


def masks_to_bool(masks: Masks, grid) -> tuple[np.ndarray, np.ndarray]:
  """(target, context) bool [B, H*W] NumPy arrays from index masks."""
  length = grid[0] * grid[1]
  target = np.zeros((masks.target.shape[0], length), bool)
  context = np.zeros_like(target)
  np.put_along_axis(target, np.asarray(masks.target), True, axis=1)
  np.put_along_axis(context, np.asarray(masks.context), True, axis=1)
  return target, context


def _summary(values: np.ndarray) -> dict:
  return dict(min=float(values.min()), max=float(values.max()),
              mean=float(values.mean()), std=float(values.std()))


def mask_statistics(masks_bool: np.ndarray, grid=None, ratio: float = 0.8,
                    context_bool: np.ndarray | None = None) -> dict:
  """JSON-able statistics of target masks [N, H*W] (or [N, H, W]) bool.

  `grid` (H, W) is needed for the per-row/column summaries of a flat [N, H*W] input;
  `context_bool` (same shape) enables the disjoint/coverage checks against real context
  masks (without it the context is taken as the complement, which passes trivially).
  """
  masks = np.asarray(masks_bool, bool)
  if masks.ndim == 3:
    grid = grid or masks.shape[1:]
  elif masks.ndim != 2:
    raise ValueError(f"masks_bool: expected [N, H*W] or [N, H, W], got shape {masks.shape}")
  masks = masks.reshape(masks.shape[0], -1)
  length = masks.shape[1]
  if grid is not None and grid[0] * grid[1] != length:
    raise ValueError(f"grid={tuple(grid)} does not match {length} tokens per mask")
  context = ~masks if context_bool is None else np.asarray(context_bool, bool).reshape(
      masks.shape)
  counts = masks.sum(axis=1)
  expected = int(math.floor(ratio * length))
  stats = dict(
      n=int(masks.shape[0]),
      tokens=int(length),
      expected_count=expected,
      target_count=dict(min=int(counts.min()), max=int(counts.max()),
                        mean=float(counts.mean())),
      all_exact=bool(np.all(counts == expected)),
      disjoint=bool(not np.any(masks & context)),
      coverage=bool(np.all(masks | context)),
  )
  if grid is not None:
    per_cell = masks.reshape(-1, grid[0], grid[1]).mean(axis=0)
    stats["grid"] = [int(grid[0]), int(grid[1])]
    stats["time_row_target_fraction"] = _summary(per_cell.mean(axis=1))
    stats["freq_column_target_fraction"] = [float(x) for x in per_cell.mean(axis=0)]
  return stats


def draw_masks_png(target_masks: np.ndarray, grid, path: str, titles=None) -> None:
  """Draw target masks [K, H*W] as images (time on x, frequency on y) into a PNG."""
  from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg canvas)

  masks = np.asarray(target_masks, bool).reshape(-1, grid[0], grid[1])
  if titles is not None and len(titles) != len(masks):
    raise ValueError(f"titles: {len(titles)} titles for {len(masks)} masks")
  fig = Figure(figsize=(10, 0.3 + 1.0 * len(masks)), layout="constrained")
  axes = fig.subplots(len(masks), 1, squeeze=False)[:, 0]
  for i, (ax, mask) in enumerate(zip(axes, masks)):
    ax.imshow(mask.T, origin="lower", aspect="auto", cmap="gray_r", interpolation="nearest")
    ax.set_ylabel("freq")
    ax.set_title(titles[i] if titles is not None else f"mask {i}", fontsize=8)
  axes[-1].set_xlabel("time patch (dark = target)")
  fig.savefig(path, dpi=100)
