"""Learning monitors logged by the step: RankMe and prediction cosine against NumPy."""
import numpy as np

from pupujepa_jax import objectives


def test_rank_me_is_the_entropy_rank_of_the_singular_values():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 300, 16)).astype(np.float32) * np.linspace(0.1, 3, 16)
  sigma = np.linalg.svd(x.reshape(-1, 16), compute_uv=False)
  p = sigma / sigma.sum() + 1e-7
  np.testing.assert_allclose(float(objectives.rank_me(x)), np.exp(-(p * np.log(p)).sum()),
                             rtol=1e-4)
  collapsed = np.tile(rng.standard_normal((1, 1, 16)), (4, 300, 1)).astype(np.float32)
  # Rank-one features read ~1: float32 Gram eigenvalues put a floor of ~0.04 above it.
  assert float(objectives.rank_me(collapsed)) < 1.05
  assert float(objectives.rank_me(rng.standard_normal((2000, 16)))) > 15


def test_mean_cosine():
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
  want = np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(float(objectives.mean_cosine(a, b)), want, rtol=1e-5)
  np.testing.assert_allclose(float(objectives.mean_cosine(a, 3 * a)), 1.0, rtol=1e-5)
