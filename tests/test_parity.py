"""Parity with a PyTorch PupuJEPA built the way the release builds it (float32, 1e-4).

The reference (`tests/release_reference.py`) is timm's own EvaBlock / RotaryEmbeddingCat
assembled as the release's model files do, with the release's parameter names; weights
go from its state dict to ours through `models.release_names`, so the name mapping is
checked on the way.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pupujepa_jax import config as config_lib
from pupujepa_jax import masking, models, optim, train_step
from pupujepa_jax.models import release_names
from tests import release_reference

ATOL = 1e-4


def _cfg(crop_frames=1024, pred=(96, 2, 2), depth=2):
  cfg = config_lib.base_config("tiny")
  cfg.model.update(depth=depth, crop_frames=crop_frames)
  cfg.predictor.update(width=pred[0], depth=pred[1], num_heads=pred[2])
  cfg.mask.update(strategy="block")
  cfg.data.batch_size = 2
  config_lib.validate(cfg)
  return cfg


def _reference(cfg, seed=0):
  torch.manual_seed(seed)
  m, p = cfg.model, cfg.predictor
  model = release_reference.PupuJEPA(m.width, m.depth, m.num_heads, p.width, p.depth,
                                     p.num_heads, (m.patch_time, m.patch_freq))
  return release_reference.randomise(model, seed + 1)


def _import(cfg, state):
  return release_names.training_from_release(state, config_lib.architecture(cfg),
                                             config_lib.predictor_size(cfg))


def _spectrogram(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((batch, cfg.model.crop_frames, 128)).astype(np.float32)


def test_inference_matches_release_teacher_on_the_full_grid():
  cfg = _cfg()
  ref = _reference(cfg)
  params, teacher = _import(cfg, release_reference.state_dict_numpy(ref))
  x = _spectrogram(cfg)
  want = ref.embed(torch.from_numpy(x)[:, None]).numpy()
  got = jax.jit(functools.partial(models.encode, config_lib.architecture(cfg)))(
      models.encoder_params(params, teacher), x)
  assert got.shape == (2, 2048, 192)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
  assert np.abs(want[0] - want[1]).max() > 0.1  # inputs matter: not a trivial match


@pytest.mark.parametrize("pred", [(96, 2, 2), (192, 1, 3)])  # proj_in Linear / Identity
def test_training_forward_matches_release(pred):
  cfg = _cfg(crop_frames=256, pred=pred)
  ref = _reference(cfg, seed=3)
  params, teacher = _import(cfg, release_reference.state_dict_numpy(ref))
  assert ("proj_in" in params["predictor"]) == (pred[0] != 192)
  x = _spectrogram(cfg, seed=1)
  grid = config_lib.grid_shape(cfg)
  masks = masking.sample_masks(jax.random.key(0), 0, grid, 2, config_lib.mask(cfg))
  with torch.no_grad():
    want_pred, want_target = ref(torch.from_numpy(x)[:, None],
                                 torch.from_numpy(np.asarray(masks.context, np.int64)),
                                 torch.from_numpy(np.asarray(masks.target, np.int64)))
  pred_out, target = jax.jit(functools.partial(train_step.predict_and_target, cfg))(
      params, teacher, x, masks)
  np.testing.assert_allclose(np.asarray(target), want_target.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(pred_out), want_pred.numpy(), atol=ATOL, rtol=0)


def _torch_step(ref, cfg, x, masks, step):
  """One AdamW step of our loss and settings, then the EMA update, on the reference."""
  lr, wd = float(optim.learning_rate(cfg)(step)), float(optim.weight_decay(cfg)(step))
  momentum = float(optim.ema_momentum(cfg)(step))
  trained = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
  # Our optimizer decays the weight matrices of Linear and Conv layers only.
  decay = [p for n, p in trained if p.ndim >= 2 and "mask_token" not in n]
  rest = [p for n, p in trained if not (p.ndim >= 2 and "mask_token" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=lr, betas=(cfg.optim.b1, cfg.optim.b2), eps=1e-8)
  pred, target = ref(torch.from_numpy(x)[:, None],
                     torch.from_numpy(np.asarray(masks.context, np.int64)),
                     torch.from_numpy(np.asarray(masks.target, np.int64)))
  target = F.layer_norm(target, target.shape[-1:])
  loss = F.smooth_l1_loss(pred, target, beta=1.0)
  opt.zero_grad()
  loss.backward()
  opt.step()
  with torch.no_grad():
    for t, s in zip(ref.teacher.parameters(), ref.student.parameters()):
      t.mul_(momentum).add_(s, alpha=1.0 - momentum)
  return float(loss.detach())


def test_one_optimizer_step_and_ema_update_match_release():
  cfg = _cfg(crop_frames=128)
  cfg.optim.update(lr=1e-3, warmup_steps=4)
  cfg.total_steps = 100
  step = 6  # past warm-up: a non-zero learning rate, weight decay and EMA momentum
  ref = _reference(cfg, seed=5)
  before = release_reference.state_dict_numpy(ref)
  params, teacher = _import(cfg, before)
  x = _spectrogram(cfg, seed=2)
  state = {"step": jnp.int32(step), "params": params, "teacher": teacher,
           "opt_state": optim.make_optimizer(cfg).init(params)}
  new_state, metrics = jax.jit(functools.partial(train_step.pretrain_step, cfg=cfg))(
      state, {"spectrogram": x})
  mask_rng, _ = train_step.step_rngs(cfg.seed, step)
  masks = masking.sample_masks(mask_rng, step, config_lib.grid_shape(cfg), 2,
                               config_lib.mask(cfg))
  loss = _torch_step(ref, cfg, x, masks, step)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  got = release_names.training_to_release(jax.device_get(new_state["params"]),
                                          jax.device_get(new_state["teacher"]))
  want = release_reference.state_dict_numpy(ref)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=ATOL, rtol=0, err_msg=name)
  # The step moved every group by far more than the tolerance (else the comparison would
  # be vacuous): Adam's first step moves each weight by about the learning rate.
  moved = {}
  for name in want:
    group = name.split(".")[0]
    moved[group] = max(moved.get(group, 0.0), float(np.abs(want[name] - before[name]).max()))
  assert min(moved.values()) > 5 * ATOL, moved


def test_packed_linear_is_one_linear_and_holds_unbiased_parts_at_zero():
  """The per-slice matmuls of `PackedLinear` equal timm's one Linear (x W + b, split);
  a part listed in `no_bias` (EVA's key bias) adds none and gets no bias gradient."""
  from pupujepa_jax.models import transformer
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  layer = transformer.PackedLinear(3, 4, no_bias=(1,))
  params = layer.init(jax.random.key(1), x)["params"]
  params = {**params, "bias": jax.random.normal(jax.random.key(2), (12,))}
  kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
  assert kernel.shape == (8, 12) and bias.shape == (12,)
  want = np.asarray(x) @ kernel + bias * np.repeat([1.0, 0.0, 1.0], 4)
  got = layer.apply({"params": params}, x)
  np.testing.assert_allclose(np.concatenate(got, -1), want, atol=1e-5)
  grads = jax.grad(lambda p: sum(o.sum() for o in layer.apply({"params": p}, x)))(params)
  np.testing.assert_array_equal(grads["bias"][4:8], 0.0)
  assert np.all(np.asarray(grads["bias"][:4]) != 0) and np.all(grads["bias"][8:] != 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_backward_is_autodiffs_without_transposed_copies(dtype):
  """`transformer.matmul`'s own backward gives autodiff's gradients of x @ kernel (token
  axes of any rank, bf16 too), and on this backend the compiled backward holds no
  transposed [F, tokens] copy of the incoming gradient, which autodiff's version makes."""
  from pupujepa_jax.models import transformer
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (3, 40, 24), dtype)
  kernel = jax.random.normal(keys[1], (24, 56), dtype)
  probe = jax.random.normal(keys[2], (3, 40, 56), dtype)

  def loss(matmul, x, kernel):
    return jnp.sum(jnp.tanh(matmul(x, kernel)).astype(jnp.float32) * probe)

  ours = jax.jit(jax.grad(functools.partial(loss, transformer.matmul), argnums=(0, 1)))
  autodiff = jax.jit(jax.grad(functools.partial(loss, jnp.dot), argnums=(0, 1)))
  for got, want in zip(ours(x, kernel), autodiff(x, kernel)):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(want).max()))

  def transposed_copies(fn):
    hlo = fn.lower(x, kernel).compile().as_text()
    return [shape for shape in ("[56,120]", "[56,3,40]") if shape in hlo]

  assert transposed_copies(ours) == []
  if jax.default_backend() == "cpu" and dtype == jnp.float32:
    assert transposed_copies(autodiff)  # what it avoids
