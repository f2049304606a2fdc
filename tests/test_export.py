"""Model dirs: export from a workdir, and every damaged or hostile model dir refused."""
import json
import shutil
import tracemalloc

import jax
import numpy as np
import pytest
import safetensors.numpy

import pupujepa_jax
from pupujepa_jax import cli, config as config_lib, export, workdir as workdir_lib
from tests import model_fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return model_fixtures.make_workdir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model_dir(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("model") / "m"
  export.export_workdir(workdir, out)
  return out


def test_export_writes_the_released_embedding_and_loads(workdir, model_dir):
  meta = json.loads((model_dir / "config.json").read_text())
  assert meta["format_version"] == 2 and meta["provenance"]["step"] == 3
  assert meta["provenance"]["config_hash"] == export.config_hash(
      (workdir / "config.json").read_text())
  assert meta["serving"]["architecture"]["width"] == 64
  assert meta["serving"]["architecture"]["crop_frames"] == 64
  assert meta["serving"]["frontend"]["sample_rate"] == 24_000
  md = export.read_model_dir(model_dir)
  _, _, _, state = workdir_lib.restore(workdir)
  # The shared patch embedding (trained by the student) and the teacher, nothing else.
  jax.tree.map(np.testing.assert_array_equal, md.params["patch_embed"],
               jax.device_get(state["params"]["patch_embed"]))
  for part in ("blocks", "norm"):
    jax.tree.map(np.testing.assert_array_equal, md.params[part],
                 jax.device_get(state["teacher"][part]))
  student = np.asarray(state["params"]["student"]["norm"]["scale"])
  assert np.abs(md.params["norm"]["scale"] - student).max() > 1e-3
  # The file holds the release's names: a model dir is part of a release checkpoint.
  names = set(safetensors.numpy.load_file(str(model_dir / "params.safetensors")))
  assert {"patch_embed.proj.weight", "patch_embed.norm_layer.weight",
          "teacher.blocks.1.attn.qkv.bias", "teacher.norm.weight"} <= names
  assert not any(n.startswith(("student.", "predictor.")) for n in names)

  model = pupujepa_jax.load(model_dir)
  wave = np.random.default_rng(0).standard_normal(int(1.5 * 24_000)).astype(np.float32)
  feats = model.embed(wave, 24_000)
  assert feats.shape == (3, 3, 8 * 64)  # L+1 layers, windows 0 / 0.64 / end-aligned
  final = model.embed(wave, 24_000, readout="mean", layers="final")
  assert final.shape == (1, 3, 64)
  # The final LayerNorm's output: per token mean ~ bias mean, unlike the last block's.
  assert np.abs(final - model.embed(wave, 24_000, readout="mean", layers="last")).max() > 0.1


def test_export_step_and_missing_checkpoint(workdir, tmp_path):
  from pupujepa_jax import checkpointing
  with pytest.raises(checkpointing.CheckpointError, match="no checkpoint for step 7"):
    export.export_workdir(workdir, tmp_path / "m", step=7)
  with pytest.raises(workdir_lib.WorkdirError, match="not a training workdir"):
    export.export_workdir(tmp_path, tmp_path / "m")
  assert not (tmp_path / "m").exists()


def _copy(model_dir, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(model_dir, bad)
  return bad


def _edit_config(path, **serving_edits):
  meta = json.loads((path / "config.json").read_text())
  for dotted, value in serving_edits.items():
    group, field = dotted.split("__")
    meta["serving"][group][field] = value
  (path / "config.json").write_text(json.dumps(meta))


def test_damaged_model_dirs_are_refused_with_reasons(model_dir, tmp_path):
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

  _edit_config(bad, architecture__width=96, architecture__num_heads=2)
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
  del tensors["teacher.blocks.1.attn.qkv.bias"]
  tensors["teacher.blocks.2.norm1.weight"] = np.ones(64, np.float32)
  safetensors.numpy.save_file(tensors, str(bad / "params.safetensors"))
  with pytest.raises(export.ModelDirError,
                     match=r"missing tensors \['teacher.blocks.1.attn.qkv.bias'\]"
                           r".*unexpected tensors \['teacher.blocks.2.norm1"):
    export.read_model_dir(bad)
  assert cli.main(["embed", "--model", str(bad), "--input", str(tmp_path),
                   "--out", str(tmp_path / "f")]) == 2

  bad = _copy(model_dir, tmp_path / "3")
  tensors = safetensors.numpy.load_file(str(bad / "params.safetensors"))
  tensors["teacher.norm.weight"][3] = np.nan
  safetensors.numpy.save_file(tensors, str(bad / "params.safetensors"))
  with pytest.raises(export.ModelDirError, match="teacher.norm.weight holds NaN"):
    export.read_model_dir(bad)


@pytest.mark.parametrize("edit,message", [
    ({"architecture__crop_frames": 40_000_000}, "architecture.crop_frames=40000000 is outside"),
    ({"architecture__width": "64"}, "architecture.width: expected int, got '64'"),
    ({"architecture__num_heads": 0}, "architecture.num_heads=0 is outside"),
    ({"architecture__patch_time": 0}, "architecture.patch_time=0 is outside"),
    ({"architecture__depth": 10**9}, "architecture.depth=1000000000 is outside"),
    ({"frontend__sample_rate": 1}, "frontend.sample_rate=1 is outside"),
    ({"frontend__n_mels": 10**6}, "frontend.n_mels=1000000 is outside"),
    ({"architecture__swiglu": "yes"}, "architecture.swiglu: expected bool"),
])
def test_hostile_configs_are_refused_before_allocating(model_dir, tmp_path, edit, message):
  bad = _copy(model_dir, tmp_path)
  _edit_config(bad, **edit)
  tracemalloc.start()
  with pytest.raises(export.ModelDirError, match=message):
    export.read_model_dir(bad)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 8 << 20, peak  # refused with a few MB of allocations at most


def test_other_format_versions_and_extra_fields_are_refused(model_dir, tmp_path):
  bad = _copy(model_dir, tmp_path)
  meta = json.loads((bad / "config.json").read_text())
  meta["format_version"] = 1
  (bad / "config.json").write_text(json.dumps(meta))
  with pytest.raises(export.ModelDirError, match="format_version 1 is not supported"):
    export.read_model_dir(bad)
  meta["format_version"] = 2
  meta["serving"]["architecture"]["depth_multiplier"] = 2
  (bad / "config.json").write_text(json.dumps(meta))
  with pytest.raises(export.ModelDirError, match="architecture.depth_multiplier: unknown"):
    export.read_model_dir(bad)


def test_export_replaces_a_model_dir_only_when_complete(workdir, model_dir, tmp_path):
  out = tmp_path / "m"
  export.export_workdir(workdir, out)
  before = (out / "params.safetensors").read_bytes()
  with pytest.raises(Exception):
    export.export_workdir(workdir, out, step=99)  # fails while restoring
  assert (out / "params.safetensors").read_bytes() == before
  (tmp_path / "not_a_model").mkdir()
  (tmp_path / "not_a_model" / "notes.txt").write_text("mine")
  with pytest.raises(export.ModelDirError, match="not a model directory; refusing"):
    export.export_workdir(workdir, tmp_path / "not_a_model")
  assert (tmp_path / "not_a_model" / "notes.txt").read_text() == "mine"


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
  assert model.meta["provenance"]["step"] == 1 and model.meta["model_id"] == "run@1"
  assert model.embed(np.ones(24_000, np.float32), 24_000).shape == (3, 2, 8 * 64)
  assert config_lib.serving_spec(cfg) == model.spec
