"""Attention pictures: the probabilities the model sows equal timm's own, pictures are drawn.

The reference is the release-built PyTorch model (`tests/release_reference.py`) with a
hook on timm's attention dropout, which sees the softmax probabilities each block
applies; our blocks sow theirs (`intermediates`), whatever kernel computes the output.
"""
import functools

import jax
import matplotlib.image
import numpy as np
import pytest
import torch

from pupujepa_jax import cli, config as config_lib, export, masking, models, viz
from pupujepa_jax.models import release_names
from tests import model_fixtures, release_reference


@pytest.fixture(scope="module")
def reference():
  cfg = model_fixtures.smoke_cfg()
  cfg.predictor.update(width=32, depth=2, num_heads=2)
  cfg.mask.strategy = "random"  # compile one mask generator only
  m, p = cfg.model, cfg.predictor
  torch.manual_seed(0)
  ref = release_reference.randomise(release_reference.PupuJEPA(
      m.width, m.depth, m.num_heads, p.width, p.depth, p.num_heads), 1)
  params, teacher = release_names.training_from_release(
      release_reference.state_dict_numpy(ref), config_lib.architecture(cfg),
      config_lib.predictor_size(cfg))
  x = np.random.default_rng(1).standard_normal((2, 64, 128)).astype(np.float32)
  return cfg, ref, params, teacher, x


def test_encoder_attention_is_timms_attention(reference):
  cfg, ref, params, teacher, x = reference
  recorder = release_reference.AttentionRecorder(ref.teacher.blocks)
  ref.embed(torch.from_numpy(x)[:, None])
  want = recorder.stacked()
  arch = config_lib.architecture(cfg)
  got = jax.jit(functools.partial(viz.encoder_attention, arch))(
      models.encoder_params(params, teacher), x)
  assert got.shape == (cfg.model.depth, 2, cfg.model.num_heads, 128, 128)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)

  maps = viz.attention_maps(arch, models.encoder_params(params, teacher), x[0], 1, (3, 5))
  assert maps["heads"].shape == (2, 16, 8) and maps["mean"].shape == (16, 8)
  np.testing.assert_allclose(maps["heads"].reshape(2, -1), want[1, 0, :, 3 * 8 + 5],
                             atol=1e-5)
  np.testing.assert_allclose(maps["mean"], maps["heads"].mean(0), atol=1e-6)
  np.testing.assert_allclose(maps["rollout"].sum(), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="outside the 16x8 token grid"):
    viz.attention_maps(arch, models.encoder_params(params, teacher), x[0], 1, (16, 0))


def test_predictor_attention_is_timms_attention(reference):
  cfg, ref, params, teacher, x = reference
  masks = jax.jit(masking.sample_masks, static_argnums=(2, 3, 4))(
      jax.random.key(2), 0, (16, 8), 2, config_lib.mask(cfg))
  recorder = release_reference.AttentionRecorder(ref.predictor.blocks)
  with torch.no_grad():
    ref(torch.from_numpy(x)[:, None], torch.from_numpy(np.asarray(masks.context, np.int64)),
        torch.from_numpy(np.asarray(masks.target, np.int64)))
  want = recorder.stacked()
  got = jax.jit(functools.partial(viz.predictor_attention, cfg))(params, x, masks)
  n = masks.context.shape[1] + masks.target.shape[1]
  assert got.shape == (2, 2, 2, n, n)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


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
