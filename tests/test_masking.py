"""Tests of the mask strategies, their rules and the curriculum (SPEC section 4)."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from pupujepa_jax import config, masking

GRIDS = [(256, 8), (32, 8)]


def _params(**overrides) -> masking.MaskConfig:
  return dataclasses.replace(config.mask(config.base_config()), **overrides)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _jit_sample(rng, step, grid, batch_size, params):
  return masking.sample_masks(rng, step, grid, batch_size, params)


def test_num_targets_and_params_from_config():
  assert masking.num_targets((256, 8), 0.8) == 1638
  assert masking.num_targets((32, 8), 0.8) == 204
  cfg = config.base_config()
  cfg.mask.strategy = "block"
  params = config.mask(cfg)
  assert params.strategy == "block" and params.probs == (0.4, 0.3, 0.3, 0.0)
  hash(params)  # static argument of jit
  cfg.mask.strategy = "blocks"
  with pytest.raises(ValueError, match="mask.strategy"):
    config.mask(cfg).validate((256, 8))
  with pytest.raises(ValueError, match="mask.probs"):
    _params(probs=(0.5, 0.5, 0.0)).validate((256, 8))  # one per strategy, 4 of them


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("strategy", masking.STRATEGIES)
def test_exact_counts_disjoint_and_covering(strategy, grid):
  params = _params(strategy=strategy)
  masks = _jit_sample(jax.random.key(1), 0, grid, 64, params)
  length, n_target = grid[0] * grid[1], masking.num_targets(grid, params.ratio)
  assert masks.target.shape == (64, n_target) and masks.target.dtype == jnp.int32
  assert masks.context.shape == (64, length - n_target) and masks.context.dtype == jnp.int32
  assert int(masks.strategy) == masking.STRATEGIES.index(strategy)
  target, context = (np.asarray(x) for x in (masks.target, masks.context))
  assert np.all(np.diff(target, axis=1) > 0) and np.all(np.diff(context, axis=1) > 0)
  target_bool, context_bool = masking.masks_to_bool(masks, grid)
  assert np.all(target_bool.sum(1) == n_target)
  assert not np.any(target_bool & context_bool)
  assert np.all(target_bool | context_bool)
  # Different masks per sample.
  assert len({row.tobytes() for row in target_bool}) == 64


def test_sample_target_mask_single():
  cfg = _params()
  mask = np.asarray(masking.sample_target_mask(jax.random.key(0), "random", (32, 8), cfg))
  assert mask.shape == (256,) and mask.dtype == bool and mask.sum() == 204
  with pytest.raises(ValueError, match="strategy"):
    masking.sample_target_mask(jax.random.key(0), "stripes", (32, 8), cfg)


def test_block_rectangle_orientation_and_aspect():
  # A grid large enough that neither clipping nor int() truncation distorts the shapes.
  grid, n = (4096, 4096), 4000
  draw = jax.jit(jax.vmap(lambda k: masking._block_rectangle(k, grid, (0.01, 0.05), 1e9)))
  top, left, h, w = (np.asarray(x, np.float64) for x in draw(_keys(n)))
  vertical = h > w
  assert abs(vertical.mean() - 0.5) < 0.04
  aspect = h / w
  assert aspect[vertical].min() > 2 * 0.99 and aspect[vertical].max() < 5 * 1.01
  assert aspect[~vertical].min() > 0.2 * 0.99 and aspect[~vertical].max() < 0.5 * 1.01
  # Uniform aspect: means near the middle of each range, ranges nearly filled.
  assert abs(aspect[vertical].mean() - 3.5) < 0.1
  assert abs(aspect[~vertical].mean() - 0.35) < 0.01
  assert aspect[vertical].max() > 4.9 and aspect[~vertical].min() < 0.21
  area = h * w / (grid[0] * grid[1])
  assert area.min() > 0.0099 and area.max() <= 0.05
  assert np.all(top >= 0) and np.all(top + h <= grid[0])
  assert np.all(left >= 0) and np.all(left + w <= grid[1])


def test_block_rectangle_on_narrow_grid_and_budget_cap():
  grid = (256, 8)
  draw = jax.jit(jax.vmap(lambda k, r: masking._block_rectangle(k, grid, (0.01, 0.05), r)))
  top, left, h, w = (np.asarray(x) for x in draw(_keys(2000), jnp.full(2000, 10_000)))
  assert np.all((h >= 1) & (w >= 1) & (w <= 8))
  assert np.all((top >= 0) & (top + h <= 256) & (left >= 0) & (left + w <= 8))
  assert abs((h > w).mean() - 0.5) < 0.05  # still vertical iff taller than wide
  assert w.max() == 8  # horizontal blocks are clipped to the frequency extent
  _, _, h, w = (np.asarray(x) for x in draw(_keys(2000, 1), jnp.full(2000, 25)))
  assert (h * w).max() <= 25  # area capped by what is left of the budget


@pytest.mark.parametrize("grid", GRIDS)
def test_stripe_share_and_shapes(grid):
  n = 4000
  draw = jax.jit(jax.vmap(lambda k: masking._stripe_rectangle(k, grid, 40, 10**6)))
  top, left, h, w = (np.asarray(x) for x in draw(_keys(n)))
  is_time = w == grid[1]  # frequency stripes are one band wide (grid[1] > 1)
  p = grid[0] / (grid[0] + grid[1])
  assert abs(is_time.mean() - p) < 4.5 * math.sqrt(p * (1 - p) / n)
  lengths = h[is_time]
  assert lengths.min() == 1 and lengths.max() == min(40, grid[0])
  assert np.all(top[is_time] + lengths <= grid[0])
  expected_mean = np.minimum(np.arange(1, 41), grid[0]).mean()  # U{1..40} clipped to H
  assert abs(lengths.mean() - expected_mean) < 1.0
  assert np.all((h[~is_time] == grid[0]) & (w[~is_time] == 1) & (top[~is_time] == 0))
  assert set(left[~is_time].tolist()) == set(range(grid[1]))


def test_budget_stops_at_first_oversized_rectangle():
  grid, budget = (10, 4), 32

  def rows(lo, hi):
    return jnp.int32(lo), jnp.int32(0), jnp.int32(hi - lo), jnp.int32(4)

  def draw(key, remaining):
    # Rows 0-1 first; then either rows 2-8 (28 cells: over budget) or row 9 (fits).
    oversized = jax.random.bernoulli(key)
    first = remaining == budget
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(first, x, y), a, b)
    later = jax.tree.map(lambda x, y: jnp.where(oversized, x, y), rows(2, 9), rows(9, 10))
    return pick(rows(0, 2), later)

  run = jax.jit(jax.vmap(lambda k: masking._budgeted_rectangles(k, grid, budget, 150, draw)))
  masks, counts = (np.asarray(x) for x in run(_keys(64)))
  assert np.all(masks.sum((1, 2)) == counts)
  assert np.all(masks[:, :2]) and not np.any(masks[:, 2:9])
  # Row 9 is only there when it came before the first oversized rectangle.
  assert set(counts.tolist()) == {8, 12}
  assert 10 < (counts == 8).sum() < 54


def test_top_up_keeps_preferred_cells():
  preference = jnp.zeros(100, jnp.int32).at[jnp.arange(0, 100, 7)].set(1)  # 15 cells
  out = np.asarray(jax.jit(lambda k: masking._top_up(k, preference, 40))(jax.random.key(3)))
  assert out.sum() == 40 and np.all(out[np.arange(0, 100, 7)])
  trimmed = np.asarray(masking._top_up(jax.random.key(4), preference, 5))
  assert trimmed.sum() == 5 and np.all(np.asarray(preference)[trimmed] == 1)


def test_strategy_patterns_differ():
  grid, n = (256, 8), 64  # the compiled functions of test_exact_counts_disjoint_and_covering
  per_strategy = {}
  for strategy in masking.STRATEGIES:
    masks = _jit_sample(jax.random.key(5), 0, grid, n, _params(strategy=strategy))
    per_strategy[strategy] = masking.masks_to_bool(masks, grid)[0].reshape(n, *grid)
  def full_rows(m):  # fraction of target cells in completely masked time rows
    return (m.all(axis=2).sum(axis=1) * grid[1] / m.sum(axis=(1, 2))).mean()
  # Stripes mask whole time rows; random masking (0.8 per cell) rarely does (0.8^8 = 17%).
  assert full_rows(per_strategy["time_frequency"]) > 0.6
  assert full_rows(per_strategy["random"]) < 0.25
  # Blocks cluster: time neighbours of targets are targets more often than at random.
  def same_as_next(m):
    return (m[:, 1:] & m[:, :-1]).sum() / m[:, :-1].sum()
  assert same_as_next(per_strategy["block"]) > same_as_next(per_strategy["random"]) + 0.05


def test_multiblock_blocks_keep_area_on_narrow_grid():
  grid = (256, 8)
  draw = jax.jit(jax.vmap(lambda k: masking._multiblock_rectangle(
      k, grid, masking.MULTIBLOCK_TARGET_SCALE, masking.MULTIBLOCK_TARGET_ASPECT)))
  _, _, h, w = (np.asarray(x) for x in draw(_keys(1000)))
  area = h * w / (grid[0] * grid[1])
  assert np.all(w == 8)
  assert area.min() > 0.15 - 0.01 and area.max() < 0.2 + 0.01


def test_strategy_probs_curriculum_values():
  params = _params()
  np.testing.assert_array_equal(masking.strategy_probs(0, params), [1, 0, 0, 0])
  np.testing.assert_array_equal(masking.strategy_probs(10_000, params), [1, 0, 0, 0])
  np.testing.assert_allclose(masking.strategy_probs(30_000, params), [0.7, 0.15, 0.15, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(masking.strategy_probs(40_000, params),
                             [1 - 0.45, 0.225, 0.225, 0], rtol=1e-6)
  after = np.asarray(masking.strategy_probs(50_000, params))
  assert after.dtype == np.float32
  np.testing.assert_array_equal(after, np.float32([0.4, 0.3, 0.3, 0.0]))
  np.testing.assert_array_equal(masking.strategy_probs(10**6, params), after)
  traced = jax.jit(lambda s: masking.strategy_probs(s, params))(jnp.int32(30_000))
  np.testing.assert_allclose(traced, [0.7, 0.15, 0.15, 0], rtol=1e-6)
  for i, name in enumerate(masking.STRATEGIES):
    np.testing.assert_array_equal(masking.strategy_probs(0, _params(strategy=name)),
                                  np.eye(4)[i])


def test_curriculum_empirical_frequencies():
  params, n = _params(), 4000
  draw = jax.jit(jax.vmap(
      lambda k, s: masking.sample_masks(k, s, (8, 4), 1, params).strategy, in_axes=(0, None)))
  for step in (0, 30_000, 100_000):
    ids = np.asarray(draw(_keys(n, step), jnp.int32(step)))
    freq = np.bincount(ids, minlength=4) / n
    probs = np.asarray(masking.strategy_probs(step, params))
    tol = 4.5 * np.sqrt(probs * (1 - probs) / n) + 1e-9
    assert np.all(np.abs(freq - probs) <= tol), (step, freq, probs)
  assert draw._cache_size() == 1


def test_compiles_once_over_steps_and_strategies():
  traces = []

  @functools.partial(jax.jit, static_argnums=(2, 3, 4))
  def sample(rng, step, grid, batch_size, params):
    traces.append(step)  # runs only while tracing
    return masking.sample_masks(rng, step, grid, batch_size, params)

  params, grid = _params(), (256, 8)
  seen = set()
  for i, step in enumerate([0, 5_000, 20_000, 35_000, 60_000, 80_000, 100_000, 200_000] * 2):
    masks = sample(jax.random.key(i), jnp.int32(step), grid, 8, params)
    seen.add(int(masks.strategy))
    target, _ = masking.masks_to_bool(masks, grid)
    assert np.all(target.sum(1) == 1638)
  assert len(traces) == 1 and sample._cache_size() == 1
  assert len(seen) >= 2


def test_strategy_override_from_config():
  cfg = _params(strategy="time_frequency")
  sample = jax.jit(lambda k, s: masking.sample_masks(k, s, (32, 8), 4, cfg).strategy)
  ids = {int(sample(k, jnp.int32(s))) for k, s in zip(_keys(6), [0, 30_000, 10**5] * 2)}
  assert ids == {2}


def test_mask_statistics_and_png(tmp_path):
  grid = (32, 8)
  masks = _jit_sample(jax.random.key(2), 0, grid, 64, _params(strategy="block"))
  target, context = masking.masks_to_bool(masks, grid)
  target, context = target[:16], context[:16]
  stats = masking.mask_statistics(target, grid=grid, context_bool=context)
  assert stats["n"] == 16 and stats["expected_count"] == 204
  assert stats["target_count"] == dict(min=204, max=204, mean=204.0)
  assert stats["all_exact"] and stats["disjoint"] and stats["coverage"]
  assert len(stats["freq_column_target_fraction"]) == 8
  assert abs(np.mean(stats["freq_column_target_fraction"]) - 204 / 256) < 1e-6
  assert 0 <= stats["time_row_target_fraction"]["min"] <= 204 / 256
  bad_context = context.copy()
  bad_context[0, np.flatnonzero(target[0])[0]] = True
  bad_context[1, np.flatnonzero(context[1])[0]] = False
  flat = masking.mask_statistics(target)  # no grid: no per-row/column summaries
  assert flat["all_exact"] and "freq_column_target_fraction" not in flat
  bad = masking.mask_statistics(target, grid=grid, context_bool=bad_context)
  assert not bad["disjoint"] and not bad["coverage"] and bad["all_exact"]
  with pytest.raises(ValueError, match="grid"):
    masking.mask_statistics(target, grid=(16, 8))
  path = tmp_path / "masks.png"
  masking.draw_masks_png(target[:3], grid, str(path), titles=["a", "b", "c"])
  image = matplotlib.image.imread(str(path))
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 500


# ----------------------------------------------------------- the release's rules, exactly
# A line-by-line Python rendering of the release's MaskGeneratorBlock and
# MaskGeneratorTimeFrequency loops (model/pupujepa.py), fed with the same uniform draws
# our jitted generators use: torch.rand / torch.randint calls are replaced by the
# attempt's uniforms (randint(lo, hi) = lo + floor(u * (hi - lo))). Its areas and spans
# are computed in float64 as Python does. The masks before the random top-up must agree
# cell for cell.

def _release_loop(grid, target_count, max_attempts, uniforms, attempt):
  H, W = grid
  mask_map = np.zeros((H, W), bool)
  current_count, attempts = 0, 0
  while current_count < target_count and attempts < max_attempts:
    u = [float(x) for x in uniforms[attempts]]
    attempts += 1
    row_slice, col_slice = attempt(u, target_count - current_count)
    area_mask = mask_map[row_slice, col_slice]
    num_new = area_mask.size - int(area_mask.sum())
    if num_new == 0:
      continue
    if current_count + num_new <= target_count:
      mask_map[row_slice, col_slice] = True
      current_count += num_new
    else:
      break
  return mask_map


def _randint(u, low, high):
  return low + min(int(math.floor(u * (high - low))), high - low - 1)


def _release_block(grid, scale_range=(0.01, 0.05)):
  H, W = grid
  L = H * W

  def attempt(u, remaining):
    is_vertical = u[1] < 0.5
    ar_min, ar_max = (2.0, 5.0) if is_vertical else (0.2, 0.5)
    ar = ar_min + u[2] * (ar_max - ar_min)
    scale = scale_range[0] + u[0] * (scale_range[1] - scale_range[0])
    block_area = scale * L
    if block_area > remaining:
      block_area = remaining
    h_w_ratio = math.sqrt(ar)
    h_span = max(1, min(H, int(math.sqrt(block_area) * h_w_ratio)))
    w_span = max(1, min(W, int(math.sqrt(block_area) / h_w_ratio)))
    h_start = _randint(u[3], 0, H - h_span + 1)
    w_start = _randint(u[4], 0, W - w_span + 1)
    return slice(h_start, h_start + h_span), slice(w_start, w_start + w_span)
  return attempt


def _release_time_frequency(grid, time_max=40, freq_max=1):
  H, W = grid
  prob_time = H / (H + W)

  def attempt(u, remaining):
    if u[0] < prob_time:
      width = _randint(u[1], 1, time_max + 1)
      if width * W > remaining:
        width = max(1, remaining // W)
      t_idx = _randint(u[2], 0, H - width + 1)
      return slice(t_idx, t_idx + width), slice(None)
    width = freq_max  # randint(1, freq_max + 1) with freq_max = 1
    if width * H > remaining:
      width = max(1, remaining // H)
    f_idx = _randint(u[3], 0, W - width + 1)
    return slice(None), slice(f_idx, f_idx + width)
  return attempt


@pytest.mark.parametrize("strategy,n_uniform", [("block", 5), ("time_frequency", 4)])
def test_rectangles_follow_the_release_loop_exactly(strategy, n_uniform):
  grid, p = (256, 8), _params()
  budget = masking.num_targets(grid, p.ratio)
  if strategy == "block":
    draw = lambda k, r: masking._block_rectangle(k, grid, p.block_scale, r)
    reference = _release_block(grid, p.block_scale)
  else:
    draw = lambda k, r: masking._stripe_rectangle(k, grid, p.stripe_max_time, r)
    reference = _release_time_frequency(grid, p.stripe_max_time)
  ours = jax.jit(jax.vmap(lambda k: masking._budgeted_rectangles(
      k, grid, budget, p.max_attempts, draw)[0]))
  keys = _keys(48, seed=11)
  masks = np.asarray(ours(keys))
  stopped_early = 0
  for key, mask in zip(keys, masks):
    attempt_keys = jax.random.split(key, p.max_attempts)
    uniforms = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (n_uniform,)))(attempt_keys))
    want = _release_loop(grid, budget, p.max_attempts, uniforms, reference)
    np.testing.assert_array_equal(mask, want)
    stopped_early += want.sum() < budget
  # The rules were exercised: some masks needed the random top-up, and stripes shrank.
  assert stopped_early > 0
