"""Release checkpoints both ways: import (model dir and workdir), embed, continue training,
export in the release layout, and refusals naming the culprit.

The checkpoints are made by the release-built PyTorch reference (`release_reference`):
its own state dict, with the release's names, next to an args.json with trailing commas.
"""
import json
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import pupujepa_jax
from pupujepa_jax import cli, export, metrics, release, workdir as workdir_lib
from tests import model_fixtures, release_reference

WIDTH, DEPTH, HEADS, PRED = 64, 2, 2, (32, 1, 2)


def release_args(frames: int, **model_edits) -> dict:
  model = {"embed_dim": WIDTH, "depth": DEPTH, "num_heads": HEADS, "mlp_ratio": 4.0,
           "patch_size": [4, 16], "image_size": [frames, 128], "in_chans": 1,
           "frequency_first": False, "norm_layer": "layer", "use_swiglu": True,
           "qk_norm": True,  # swallowed by timm's EvaBlock: no q/k norms in the weights
           "layer_scale_init_value": None, "drop_path_rate": 0.0,
           "decoder_embed_dim": PRED[0], "decoder_depth": PRED[1],
           "decoder_num_heads": PRED[2], "mask_ratio": 0.8, "mask_probs": [0.4, 0.3, 0.3],
           "mask_warmup_start": 10, "mask_warmup_end": 50}
  model.update(model_edits)
  return {"preprocess": {"sample_rate": 24_000, "n_fft": 1024, "hop_length": 240,
                         "n_mels": 128},
          "model": model, "train": {"lr": 1e-3, "batch_size": 8, "warmup_steps": 1,
                                    "grad_checkpointing_step": None}}


def with_trailing_commas(obj) -> str:
  """JSON text with a comma after every last member, as the release writes args.json."""
  return re.sub(r"(\S)(\n\s*[}\]])", r"\1,\2", json.dumps(obj, indent=2))


def write_release(folder, frames=64, args=None, state=None, seed=0):
  folder.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(seed)
  ref = release_reference.randomise(release_reference.PupuJEPA(
      WIDTH, DEPTH, HEADS, *PRED), seed + 1)
  state = release_reference.state_dict_numpy(ref) if state is None else state
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
                              str(folder / "model.safetensors"))
  (folder / "args.json").write_text(with_trailing_commas(args or release_args(frames)))
  return ref, folder / "model.safetensors", folder / "args.json"


def test_args_json_with_trailing_commas_parses():
  text = with_trailing_commas(release_args(64))
  with pytest.raises(json.JSONDecodeError):
    json.loads(text)  # not plain JSON
  assert release.config_from_args(json.loads(json.dumps(release_args(64)))).model.width == 64


def test_imported_model_embeds_like_the_release_end_to_end(tmp_path):
  """`--layers final --readout mean` on a 10.24 s clip: one [1, 1, D] array equal to the
  mean over tokens of the release's teacher output, front-end included."""
  ref, weights, args = write_release(tmp_path / "release", frames=1024)
  out = tmp_path / "model"
  assert cli.main(["import-torch", "--weights", str(weights), "--args", str(args),
                   "--out", str(out)]) == 0
  model = pupujepa_jax.load(out)
  assert model.window_samples == 245_760  # 1024 frames at 100 frames/s, 10.24 s
  wave = (0.1 * np.random.default_rng(0).standard_normal(model.window_samples)).astype(
      np.float32)
  audio = tmp_path / "clip" / "song.wav"
  audio.parent.mkdir()
  import soundfile
  soundfile.write(str(audio), wave, 24_000, subtype="FLOAT")
  assert cli.main(["embed", "--model", str(out), "--input", str(audio.parent), "--out",
                   str(tmp_path / "feats"), "--layers", "final", "--readout", "mean",
                   "--no_progress"]) == 0
  got = np.load(tmp_path / "feats" / "song.wav.npy")
  assert got.shape == (1, 1, WIDTH)
  meta = json.loads((tmp_path / "feats" / "meta.json").read_text())
  assert meta["layer_names"] == ["final"] and meta["layers"] == ["final"]
  spec = release_reference.release_log_mel(wave[None])
  want = ref.embed(torch.from_numpy(spec)[:, None]).numpy().mean(axis=1)
  np.testing.assert_allclose(got[0], want, atol=1e-3, rtol=0)
  assert np.abs(want).max() > 0.1


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A release checkpoint (64-frame windows) imported as a model dir and a workdir."""
  base = tmp_path_factory.mktemp("release")
  ref, weights, args = write_release(base / "release", frames=64)
  info = release.import_release(weights, args, out=base / "model", workdir=base / "run")
  return base, ref, weights, args, info


def test_round_trip_import_export_import_is_bit_exact(imported, tmp_path):
  base, _, weights, args, _ = imported
  assert cli.main(["export", "--workdir", str(base / "run"), "--format", "release",
                   "--out", str(tmp_path / "exported")]) == 0
  exported = tmp_path / "exported"
  original = safetensors.numpy.load_file(str(weights))
  again = safetensors.numpy.load_file(str(exported / "model.safetensors"))
  assert sorted(again) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(again[name], original[name], err_msg=name)
  exported_args = release.read_args(exported / "args.json")
  cfg_a = release.config_from_args(release.read_args(args))
  cfg_b = release.config_from_args(exported_args)
  assert cfg_a.model.to_dict() == cfg_b.model.to_dict()
  assert cfg_a.predictor.to_dict() == cfg_b.predictor.to_dict()
  release.import_release(exported / "model.safetensors", exported / "args.json",
                         workdir=tmp_path / "again")
  _, _, _, first = workdir_lib.restore(base / "run")
  _, _, _, second = workdir_lib.restore(tmp_path / "again")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(first["params"]),
               jax.device_get(second["params"]))


def test_imported_model_dir_holds_the_patch_embedding_and_teacher(imported):
  base, ref, _, _, info = imported
  md = export.read_model_dir(base / "model")
  teacher = ref.teacher.norm.weight.detach().numpy()
  np.testing.assert_array_equal(md.params["norm"]["scale"], teacher)
  assert md.meta["provenance"]["source"] == "release:model.safetensors"
  assert info["model"]["qk_norm"] is False  # args said true; the weights have no q/k norms


@pytest.mark.slow
def test_imported_workdir_continues_training(imported, tone_folder, capsys):
  base, *_ = imported
  run = base / "run"
  _, _, _, before = workdir_lib.restore(run)
  assert cli.main(["train", "--workdir", str(run), "--config.data.source=folder",
                   f"--config.data.path={tone_folder}", "--config.data.num_workers=0",
                   "--config.total_steps=20", "--stop_after", "2", "--no_progress"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["final_step"] == 2
  records = metrics.read_jsonl(run / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 1] and np.isfinite(records[-1]["loss"])
  _, _, step, after = workdir_lib.restore(run)
  assert step == 2
  # Training started from the released weights: two Adam steps away from them.
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       jax.device_get(before["params"]), jax.device_get(after["params"]))
  assert 0 < max(jax.tree.leaves(moved)) < 20 * 1e-3


def test_refusals_name_the_culprit(tmp_path):
  ref, weights, args = write_release(tmp_path / "r")
  state = release_reference.state_dict_numpy(ref)

  def attempt(state=None, args_obj=None, **kw):
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    _, w, a = write_release(folder, args=args_obj, state=state)
    return release.import_release(w, a, **kw)

  missing = dict(state)
  del missing["teacher.blocks.1.mlp.fc2.bias"]
  with pytest.raises(release.ReleaseError, match=r"missing tensors \['teacher.blocks.1.mlp"):
    attempt(missing, out=tmp_path / "o")
  extra = dict(state, **{"teacher.blocks.1.attn.k_norm.weight": np.ones(32, np.float32)})
  with pytest.raises(release.ReleaseError, match=r"unexpected tensors \['teacher.blocks.1"):
    attempt(extra, out=tmp_path / "o")
  with pytest.raises(release.ReleaseError,
                     match=r"patch_embed.proj.weight has shape \(64, 1, 4, 16\), args.json implies "
                           r"\(96, 1, 4, 16\)"):
    attempt(args_obj=release_args(64, embed_dim=96), out=tmp_path / "o")
  no_teacher = {k: v for k, v in state.items() if not k.startswith("teacher.")}
  with pytest.raises(release.ReleaseError, match=r"a model dir needs \['patch_embed', "
                                                 r"'teacher'\]"):
    attempt(no_teacher, out=tmp_path / "o")
  inference_only = {k: v for k, v in state.items() if k.startswith(("patch_embed.",
                                                                    "teacher."))}
  attempt(inference_only, out=tmp_path / "ok")  # enough for embedding
  with pytest.raises(release.ReleaseError, match=r"lacks \['predictor', 'student'\]"):
    attempt(inference_only, workdir=tmp_path / "w")
  assert not (tmp_path / "w").exists()
  bad_frontend = release_args(64)
  bad_frontend["preprocess"]["sample_rate"] = 16_000
  with pytest.raises(release.ReleaseError, match="preprocess.sample_rate=16000 asks for a "
                                                 "front-end other than the released one"):
    attempt(args_obj=bad_frontend, out=tmp_path / "o")
  with pytest.raises(release.ReleaseError, match="model.frequency_first=True is not supported"):
    attempt(args_obj=release_args(64, frequency_first=True), out=tmp_path / "o")
  with pytest.raises(release.ReleaseError, match="model.norm_layer='rms' is not supported"):
    attempt(args_obj=release_args(64, norm_layer="rms"), out=tmp_path / "o")
  args.write_text('{"model": {"embed_dim": 64,,}')
  with pytest.raises(release.ReleaseError, match="args.json: not valid JSON5"):
    release.import_release(weights, args, out=tmp_path / "o")
  assert not (tmp_path / "o").exists()
  assert cli.main(["import-torch", "--weights", str(weights), "--args", str(args),
                   "--out", str(tmp_path / "o")]) == 2


def test_import_refuses_a_workdir_that_holds_a_run(imported):
  base, _, weights, args, _ = imported
  with pytest.raises(release.ReleaseError, match="already holds a run"):
    release.import_release(weights, args, workdir=base / "run")


def test_release_export_refuses_what_the_release_cannot_build(tmp_path):
  workdir = model_fixtures.make_workdir(tmp_path)
  cfg, _ = workdir_lib.read_config(workdir)
  assert release.export_release(workdir, tmp_path / "ok")["tensors"] > 0
  cfg.model.qk_norm = True
  with pytest.raises(release.ReleaseError, match=r"model.qk_norm=True"):
    release._check_exportable(cfg)


def test_import_into_a_workdir_in_use_is_refused(imported, tmp_path):
  """A trainer holding the workdir's lock: the import is refused and writes nothing."""
  _, _, weights, args, _ = imported
  busy = tmp_path / "busy"
  with workdir_lib.exclusive(busy):
    with pytest.raises(workdir_lib.WorkdirBusyError, match="in use"):
      release.import_release(weights, args, workdir=busy)
  assert sorted(p.name for p in busy.iterdir()) == [workdir_lib.LOCK_FILE]
