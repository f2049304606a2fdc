"""Export from a workdir, import of timm-named PyTorch weights, and model-dir validation."""
import hashlib
import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import pupujepa_jax
from pupujepa_jax import checkpointing, cli, export, frontend, models, sharding, train_step
from pupujepa_jax.models import torch_import
from tests import model_fixtures, torch_reference


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return model_fixtures.make_workdir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model_dir(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("model")
  export.export_workdir(workdir, out)
  return out


def _teacher(workdir):
  cfg, _ = export.read_workdir_config(workdir)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  manager = checkpointing.make_manager(workdir, read_only=True)
  _, state = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                   train_step.state_shardings(cfg, mesh))
  manager.close()
  return state


def test_export_writes_the_teacher_and_loads(workdir, model_dir):
  meta = json.loads((model_dir / "config.json").read_text())
  assert meta["step"] == 3 and meta["format_version"] == 1 and meta["crop_frames"] == 64
  assert meta["config_hash"] == hashlib.sha256(
      (workdir / "config.json").read_text().encode()).hexdigest()
  assert meta["model"]["width"] == 64 and meta["frontend"]["sample_rate"] == 24_000
  md = export.read_model_dir(model_dir)
  state = _teacher(workdir)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               md.params, state["teacher"])
  student = np.asarray(state["params"]["encoder"]["patch_embed"]["kernel"])
  assert np.abs(md.params["patch_embed"]["kernel"] - student).max() > 1e-3
  # The file holds timm EVA names, like the released checkpoints.
  names = safetensors.numpy.load_file(str(model_dir / "params.safetensors"))
  assert "blocks.1.attn.qkv.weight" in names and "patch_embed.proj.weight" in names

  model = pupujepa_jax.load(model_dir)
  wave = np.random.default_rng(0).standard_normal(int(1.5 * 24_000)).astype(np.float32)
  feats = model.embed(wave, 24_000)
  assert feats.shape == (3, 3, 8 * 64)  # L+1 layers, windows 0 / 0.64 / end-aligned
  assert np.all(np.isfinite(feats))
  assert model.embed(wave, 24_000, readout="mean", layers="last").shape == (1, 3, 64)


def test_export_step_and_missing_checkpoint(workdir, tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint for step 7"):
    export.export_workdir(workdir, tmp_path / "m", step=7)
  with pytest.raises(export.ModelDirError, match="not a training workdir"):
    export.export_workdir(tmp_path, tmp_path / "m")


def _copy(model_dir, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(model_dir, bad)
  return bad


def test_broken_model_dirs_are_refused_with_reasons(model_dir, tmp_path):
  bad = _copy(model_dir, tmp_path)
  params = bad / "params.safetensors"
  data = params.read_bytes()
  params.write_bytes(data[: len(data) // 2])
  with pytest.raises(export.ModelDirError, match="params.safetensors: unreadable, truncated"):
    pupujepa_jax.load(bad)
  params.write_bytes(b"\x00" * 64)
  with pytest.raises(export.ModelDirError, match="truncated or not a safetensors"):
    export.read_model_dir(bad)
  params.write_bytes(data)

  meta = json.loads((bad / "config.json").read_text())
  meta["model"]["width"] = 96
  (bad / "config.json").write_text(json.dumps(meta))
  with pytest.raises(export.ModelDirError,
                     match=r"patch_embed.proj.weight has shape \(64, 1, 4, 16\), the config "
                           r"expects \(96, 1, 4, 16\)"):
    export.read_model_dir(bad)
  (bad / "config.json").write_text("{not json")
  with pytest.raises(export.ModelDirError, match="config.json: not valid JSON"):
    export.read_model_dir(bad)
  (bad / "config.json").unlink()
  with pytest.raises(export.ModelDirError, match="config.json: missing"):
    export.read_model_dir(bad)

  bad = _copy(model_dir, tmp_path / "2")
  tensors = safetensors.numpy.load_file(str(bad / "params.safetensors"))
  del tensors["blocks.1.attn.q_bias"]
  tensors["blocks.2.norm1.weight"] = np.ones(64, np.float32)
  safetensors.numpy.save_file(tensors, str(bad / "params.safetensors"))
  with pytest.raises(export.ModelDirError, match=r"missing tensors \['blocks.1.attn.q_bias'\]"
                                                 r".*unexpected tensors \['blocks.2.norm1"):
    export.read_model_dir(bad)
  assert cli.main(["embed", "--model", str(bad), "--input", str(tmp_path),
                   "--out", str(tmp_path / "f")]) == 2


def _release(tmp_path, args):
  """A release-like checkpoint from the timm reference: teacher, student and predictor."""
  cfg = model_fixtures.smoke_cfg()
  spec = models.encoder_spec(cfg)
  torch.manual_seed(0)
  teacher = torch_reference.randomise(torch_reference.TorchEncoder(spec).eval(), 3)
  student = torch_reference.randomise(torch_reference.TorchEncoder(spec).eval(), 4)
  state = {f"target_encoder.{k}": v.numpy() for k, v in teacher.state_dict().items()}
  state.update({f"encoder.{k}": v.numpy() for k, v in student.state_dict().items()})
  state["predictor.mask_token"] = np.zeros((1, 1, 32), np.float32)
  state["predictor.predictor_embed.weight"] = np.zeros((32, 64), np.float32)
  weights = tmp_path / "model.safetensors"
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                              str(weights))
  (tmp_path / "args.json").write_text(json.dumps(args))
  return teacher, state, weights


RELEASE_ARGS = {"model": "pupujepa_tiny", "embed_dim": 64, "depth": 2, "num_heads": 2,
                "use_swiglu": True, "use_qk_norm": True,
                "data": {"target_length": 64, "n_mels": 128, "sr": 24_000},
                "patch_size": [4, 16]}


def test_import_torch_matches_the_timm_reference(tmp_path):
  teacher, _, weights = _release(tmp_path, RELEASE_ARGS)
  out = tmp_path / "imported"
  assert cli.main(["import-torch", "--weights", str(weights), "--args",
                   str(tmp_path / "args.json"), "--out", str(out)]) == 0
  meta = json.loads((out / "config.json").read_text())
  assert meta["source"] == "torch:target_encoder." and meta["crop_frames"] == 64
  model = pupujepa_jax.load(out)

  rng = np.random.default_rng(0)
  waves = rng.standard_normal((2, model.window_samples)).astype(np.float32)
  spec = frontend.log_mel_np(waves)
  captured = {}
  teacher.norm.register_forward_hook(lambda m, inp, out: captured.update(pre=inp[0]))
  with torch.no_grad():
    ref = teacher(torch.from_numpy(spec)).numpy()
  final, _ = model.encode(spec)
  np.testing.assert_allclose(np.asarray(final), ref, atol=1e-4, rtol=0)
  # The embedding path (jnp front-end, encoder, freqcat readout) on raw audio.
  pre = captured["pre"].numpy().reshape(2, 16, 8 * 64).mean(1)
  feats = model.embed_windows(waves, "freqcat")
  np.testing.assert_allclose(feats[-1], pre, atol=1e-4, rtol=0)
  assert np.abs(ref[0] - ref[1]).max() > 0.1


def test_import_torch_refuses_unusable_checkpoints(tmp_path):
  _, state, weights = _release(tmp_path, dict(RELEASE_ARGS, embed_dim=96))
  with pytest.raises(export.ModelDirError, match="width=96 but the weights"):
    export.import_torch(weights, tmp_path / "args.json", tmp_path / "o")
  (tmp_path / "args.json").write_text(json.dumps({"model": "gigantic"}))
  with pytest.raises(export.ModelDirError, match="cannot tell the model variant"):
    export.import_torch(weights, tmp_path / "args.json", tmp_path / "o")
  student_only = {k: v for k, v in state.items() if not k.startswith("target_encoder.")}
  safetensors.numpy.save_file(student_only, str(weights))
  with pytest.raises(export.ModelDirError, match=r"no teacher encoder.*\['encoder.'\]"):
    export.import_torch(weights, tmp_path / "args.json", tmp_path / "o")


def test_unprefixed_weights_with_inferred_architecture(tmp_path):
  cfg = model_fixtures.smoke_cfg()
  params = model_fixtures.init_params(cfg, 0)["encoder"]
  flat = torch_import.encoder_to_torch(params, models.encoder_spec(cfg))
  weights = tmp_path / "w.safetensors"
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in flat.items()},
                              str(weights))
  (tmp_path / "args.json").write_text(json.dumps({"crop_frames": 64}))
  info = export.import_torch(weights, tmp_path / "args.json", tmp_path / "o")
  # Width, depth, SwiGLU, QK-norm and heads (from the q_norm size) come from the weights.
  assert info["prefix"] == "" and info["model"]["num_heads"] == 2
  assert info["model"]["swiglu"] and info["model"]["qk_norm"] and info["model"]["depth"] == 2


@pytest.mark.slow
def test_export_of_a_real_training_run(tmp_path):
  """A workdir written by `trainer.train` (state and data iterator items) exports."""
  from pupujepa_jax import trainer
  for i in range(2):
    model_fixtures.write_tone(tmp_path / "audio" / f"{i}.wav", 1.0, freq=200.0 * (i + 1))
  cfg = model_fixtures.smoke_cfg(tmp_path / "audio")
  trainer.train(cfg, tmp_path / "run", stop_after=1, progress=False)
  assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--out",
                   str(tmp_path / "m")]) == 0
  model = pupujepa_jax.load(tmp_path / "m")
  assert model.meta["step"] == 1 and model.meta["model_id"] == "run@1"
  assert model.embed(np.ones(24_000, np.float32), 24_000).shape == (3, 2, 8 * 64)
