"""Attention weights recomputed outside the model agree with the model; pictures are drawn."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from pupujepa_jax import cli, export, masking, models, viz
from pupujepa_jax.models import rope, transformer
from tests import model_fixtures


def _layer_params(blocks, layer):
  return jax.tree.map(lambda a: a[layer], blocks)


def test_encoder_attention_reproduces_every_block():
  cfg = model_fixtures.smoke_cfg()
  params = model_fixtures.init_params(cfg, 0)["encoder"]
  spec = models.encoder_spec(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 64, 128))
  _, layers = jax.jit(functools.partial(models.make_encoder(cfg).apply, return_layers=True))(
      {"params": params}, x)

  @jax.jit
  def block_output(p, h):
    h2 = nn.LayerNorm(epsilon=transformer.LN_EPS).apply({"params": p["norm2"]}, h)
    return h + transformer.Mlp(spec).apply({"params": p["mlp"]}, h2)

  attention = jax.jit(functools.partial(viz.encoder_attention, cfg), static_argnums=2)
  for layer in range(spec.depth):
    weights, update = attention(params, x, layer)
    assert weights.shape == (2, spec.num_heads, 128, 128)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    # Block output = x + attention branch + MLP(norm2(.)): must equal the next layer.
    out = block_output(_layer_params(params["stack"]["blocks"], layer), layers[layer] + update)
    np.testing.assert_allclose(out, layers[layer + 1], atol=1e-4, rtol=0)

  maps = viz.attention_maps(cfg, params, x[0], 1, (3, 5))
  assert maps["heads"].shape == (2, 16, 8) and maps["mean"].shape == (16, 8)
  np.testing.assert_allclose(maps["mean"], maps["heads"].mean(0), atol=1e-6)
  np.testing.assert_allclose(maps["rollout"].sum(), 1.0, atol=1e-5)
  w1, _ = attention(params, x[:1], 1)
  np.testing.assert_allclose(maps["mean"].reshape(-1), w1[0, :, 3 * 8 + 5].mean(0),
                             atol=1e-6)
  with pytest.raises(ValueError, match="outside the 16x8 token grid"):
    viz.attention_maps(cfg, params, x[0], 1, (16, 0))


def test_predictor_attention_reproduces_the_predictor():
  cfg = model_fixtures.smoke_cfg()
  cfg.predictor.update(depth=2)
  cfg.mask.strategy = "random"  # compile one mask generator only
  params = model_fixtures.init_params(cfg, 0)
  spec = models.predictor_spec(cfg)
  x = jax.random.normal(jax.random.key(1), (1, 64, 128))
  masks = jax.jit(masking.sample_masks, static_argnums=(2, 3, 4))(
      jax.random.key(2), 0, (16, 8), 1, masking.mask_params(cfg.mask))
  weights, h = jax.jit(functools.partial(viz.predictor_attention, cfg, layer=1))(
      params, x, masks.context, masks.target)
  n = masks.context.shape[1] + masks.target.shape[1]
  assert weights.shape == (1, spec.num_heads, n, n)
  # Run the last block, final norm and projection on the recomputed input of block 1.
  pp = params["predictor"]

  @jax.jit
  def finish(h):
    index = jnp.concatenate([masks.context, masks.target], axis=1)
    sin, cos = rope.gather_rope(rope.rope_table((16, 8), spec.head_dim), index)
    h, _ = transformer.Block(spec).apply({"params": _layer_params(pp["stack"]["blocks"], 1)},
                                         h, sin, cos, 0.0)
    h = nn.LayerNorm(epsilon=transformer.LN_EPS).apply({"params": pp["norm"]},
                                                       h[:, -masks.target.shape[1]:])
    return nn.Dense(64).apply({"params": pp["proj"]}, h)

  ours = finish(h)
  context = jax.jit(models.make_encoder(cfg).apply)({"params": params["encoder"]}, x,
                                                    masks.context)
  ref = jax.jit(models.make_predictor(cfg).apply)({"params": pp}, context, masks.context,
                                                  masks.target)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = model_fixtures.make_workdir(tmp_path_factory.getbasetemp())
  model_dir = tmp_path_factory.mktemp("model")
  export.export_workdir(workdir, model_dir)
  audio = model_fixtures.write_tone(tmp_path_factory.mktemp("a") / "x.wav", 1.0,
                                    sample_rate=32_000, channels=2)
  return workdir, model_dir, audio


def _check_png(path):
  image = matplotlib.image.imread(str(path))
  assert image.shape[0] > 400 and image.shape[1] > 600
  assert image[..., :3].std() > 0.05  # not a blank canvas


def test_attention_cli_draws_encoder_and_predictor(trained, tmp_path):
  workdir, model_dir, audio = trained
  assert cli.main(["attention", "--model", str(model_dir), "--audio", str(audio),
                   "--out", str(tmp_path / "enc.png"), "--layer", "0",
                   "--query", "4,2"]) == 0
  _check_png(tmp_path / "enc.png")
  assert cli.main(["attention", "--workdir", str(workdir), "--audio", str(audio),
                   "--out", str(tmp_path / "pred.png")]) == 0
  _check_png(tmp_path / "pred.png")
  assert cli.main(["attention", "--model", str(model_dir), "--audio", str(audio),
                   "--out", str(tmp_path / "x.png"), "--layer", "9"]) == 2
