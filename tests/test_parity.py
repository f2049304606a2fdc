"""Parity of our Flax encoder/predictor with a timm-built PyTorch reference (SPEC section 3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pupujepa_jax import config as config_lib
from pupujepa_jax import models
from pupujepa_jax.models import torch_import
from tests import torch_reference


def _cfg(swiglu, qk_norm, layer_scale, crop_frames):
  cfg = config_lib.base_config("tiny")
  cfg.model.update(depth=2, swiglu=swiglu, qk_norm=qk_norm, layer_scale=layer_scale)
  cfg.predictor.update(width=96, depth=2, num_heads=2)
  cfg.data.crop_frames = crop_frames
  return cfg


def _state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("swiglu,qk_norm,layer_scale,crop", [
    (True, True, 0.0, 1024),   # the released tiny's block flavour, full 10.24 s grid
    (False, False, 0.1, 256),  # GELU MLP with layer-scale
])
def test_encoder_and_predictor_match_timm_reference(swiglu, qk_norm, layer_scale, crop):
  cfg = _cfg(swiglu, qk_norm, layer_scale, crop)
  enc_spec, pred_spec = models.encoder_spec(cfg), models.predictor_spec(cfg)
  grid = config_lib.grid_shape(cfg)
  torch.manual_seed(0)
  ref_enc = torch_reference.randomise(torch_reference.TorchEncoder(enc_spec).eval(), 1)
  ref_pred = torch_reference.randomise(torch_reference.TorchPredictor(pred_spec, enc_spec.width, grid).eval(), 2)
  params_enc = torch_import.encoder_from_torch(_state(ref_enc), enc_spec)
  params_pred = torch_import.predictor_from_torch(_state(ref_pred), pred_spec)

  rng = np.random.default_rng(0)
  spec = rng.standard_normal((2, crop, 128)).astype(np.float32)
  n = grid[0] * grid[1]
  perm = np.stack([rng.permutation(n) for _ in range(2)])
  ctx, tgt = np.sort(perm[:, : n // 5], 1), np.sort(perm[:, n // 5:], 1)

  with torch.no_grad():
    ref_full = ref_enc(torch.from_numpy(spec)).numpy()
    ref_ctx = ref_enc(torch.from_numpy(spec), ctx)
    ref_out = ref_pred(ref_ctx, ctx, tgt).numpy()
  encoder, predictor = models.make_encoder(cfg), models.make_predictor(cfg)
  full = encoder.apply({"params": params_enc}, spec)
  jax_ctx = encoder.apply({"params": params_enc}, spec, jnp.asarray(ctx))
  out = predictor.apply({"params": params_pred}, jax_ctx, ctx, tgt)

  np.testing.assert_allclose(np.asarray(full), ref_full, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(jax_ctx), ref_ctx.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-4, rtol=0)
  # Outputs are not trivially close: different inputs give different features.
  assert np.abs(ref_full[0] - ref_full[1]).max() > 0.1


def test_mapping_round_trips_and_names_bad_weights():
  cfg = _cfg(True, True, 0.1, 64)
  spec = models.encoder_spec(cfg)
  params = models.init_params(cfg, jax.random.key(0))["encoder"]
  state = torch_import.encoder_to_torch(params, spec, prefix="target_encoder.")
  back = torch_import.encoder_from_torch(state, spec, prefix="target_encoder.")
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), back)
  broken = dict(state)
  del broken["target_encoder.blocks.1.attn.q_bias"]
  with pytest.raises(KeyError, match="blocks.1.attn.q_bias"):
    torch_import.encoder_from_torch(broken, spec, prefix="target_encoder.")
  extra = dict(state, **{"target_encoder.blocks.7.norm1.weight": np.zeros(3)})
  with pytest.raises(KeyError, match="unexpected"):
    torch_import.encoder_from_torch(extra, spec, prefix="target_encoder.")
