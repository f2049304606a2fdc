"""`pupujepa info` and `pupujepa masks` (parameter counts, grid, mask statistics, pictures),
and refusals: bad fields, config files, workdir and model-dir configs, failed embeds exit 2
with one line naming the culprit."""
import json
import shutil

import pytest

from pupujepa_jax import cli, export
from pupujepa_jax import config as config_lib
from pupujepa_jax import workdir as workdir_lib
from tests import model_fixtures

VARIANTS = ("tiny", "small", "base", "large", "huge")


# The release's encoder sizes (model card; SPEC section 3), encoder = patch embedding +
# blocks + final norm.
RELEASED = {"tiny": 7.13e6, "small": 28.4e6, "base": 113e6, "large": 403e6, "huge": 839e6}


def expected_encoder_params(m) -> int:
  """Closed form of the encoder's parameter count (timm EvaBlock with AttentionRope: fused
  qkv with a full bias, no CLS token, no absolute positions)."""
  d, hidden, head = m.width, int(m.width * m.mlp_ratio), m.width // m.num_heads
  mlp = (d * 2 * hidden + 2 * hidden + hidden * d + d) if m.swiglu else (
      d * hidden + hidden + hidden * d + d)
  block = (2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + mlp
           + (4 * head if m.qk_norm else 0) + (2 * d if m.layer_scale else 0))
  patch_embed = m.patch_time * m.patch_freq * d + d + 2 * d
  return patch_embed + m.depth * block + 2 * d


def _run(capsys, argv):
  assert cli.main(argv) == 0
  return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_info_counts_match_the_architecture(capsys, variant):
  info = _run(capsys, ["info", "--config", f"experiments/pupujepa.py:variant={variant}"])
  cfg = config_lib.load_config(f"experiments/pupujepa.py:variant={variant}")
  assert info["encoder_params"] == expected_encoder_params(cfg.model)
  assert info["token_grid"] == [256, 8] and info["tokens"] == 2048
  assert info["time_steps_per_second"] == 25.0 and info["crop_seconds"] == 10.24
  assert info["predictor_params"] > 0
  assert abs(info["encoder_params"] / RELEASED[variant] - 1) < 0.01


def test_plain_vit_flavour_is_selectable(capsys):
  plain = _run(capsys, ["info", "--config", "experiments/pupujepa.py:variant=tiny",
                        "--config.model.swiglu=false"])
  assert 5.3e6 < plain["encoder_params"] < 5.4e6  # ViT-Ti shape without CLS/pos. emb.
  cfg = config_lib.load_config("experiments/pupujepa.py:variant=tiny")
  cfg.model.swiglu = False
  assert plain["encoder_params"] == expected_encoder_params(cfg.model)


@pytest.mark.parametrize("strategy", ["random", "block", "time_frequency", "multiblock",
                                      "curriculum"])
def test_masks_statistics_and_png(capsys, tmp_path, strategy):
  png = tmp_path / "masks.png"
  stats = _run(capsys, ["masks", "--config", "experiments/pupujepa.py", "--strategy",
                        strategy, "--n", "16", "--step", "100000", "--png", str(png)])
  assert stats["n"] == 16 and stats["all_exact"] and stats["disjoint"] and stats["coverage"]
  assert stats["target_count"]["min"] == stats["target_count"]["max"] == 1638
  assert png.stat().st_size > 5000
  if strategy != "curriculum":
    assert stats["strategy"] == strategy


def test_bad_invocations_fail_clearly(capsys):
  assert cli.main(["info", "--config", "experiments/nope.py"]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["info", "--config", "experiments/pupujepa.py",
                   "--config.model.crop_frames=1022"]) == 2
  assert "model.crop_frames=1022 is not divisible" in capsys.readouterr().err
  assert cli.main(["info", "--config", "experiments/pupujepa.py:variant=gigantic"]) == 2
  assert "variant" in capsys.readouterr().err


# ------------------------------------------- refusals: one line naming the culprit, exit 2

def _refusal(capsys, command: str) -> str:
  """The one line a refused command printed (no traceback)."""
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = [line for line in err.splitlines() if line.startswith(f"pupujepa {command}:")]
  assert len(lines) == 1, err
  assert err.strip().splitlines()[-1] == lines[0]
  return lines[0]


@pytest.mark.parametrize("override, culprit", [
    ("--config.checkpoint.every=0", "checkpoint.every=0 must be > 0"),
    ("--config.log_every=0", "log_every=0 must be > 0"),
    ("--config.model.num_heads=0", "model.num_heads=0 is outside the accepted range"),
    ("--config.model.patch_time=0", "model.patch_time=0 is outside the accepted range"),
    ("--config.model=3", "model: is a group of fields"),
    ("--config.optim.lr=-0.001", "optim.lr=-0.001 must be > 0"),
])
def test_train_refuses_bad_fields_before_anything_runs(tmp_path, capsys, override, culprit):
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", "experiments/pupujepa.py:smoke", "--workdir",
                   str(workdir), override]) == 2
  assert culprit in _refusal(capsys, "train")
  assert not workdir.exists()


def test_config_file_must_be_python(tmp_path, capsys):
  config = tmp_path / "run.json"
  config.write_text("{}")
  assert cli.main(["train", "--config", str(config), "--workdir", str(tmp_path / "w")]) == 2
  assert f"config file {str(config)!r} is not a Python file" in _refusal(capsys, "train")


@pytest.mark.parametrize("edit, culprit", [
    (lambda c: c["model"].update(width="64"), "model.width: expected int, got '64'"),
    (lambda c: c.update(model=5), "model: expected a group of fields, got 5"),
    (lambda c: c["model"].update(variant=["tiny"]), "model.variant: unknown variant ['tiny']"),
    (lambda c: c["optim"].update(lr=-1.0), "optim.lr=-1.0 must be > 0"),
])
def test_workdir_config_json_is_validated(tmp_path, capsys, edit, culprit):
  """`pupujepa train --workdir W` without --config reads W/config.json."""
  workdir = tmp_path / "run"
  workdir_lib.write_run_files(model_fixtures.smoke_cfg(), workdir)
  values = json.loads((workdir / "config.json").read_text())
  edit(values)
  (workdir / "config.json").write_text(json.dumps(values))
  assert cli.main(["train", "--workdir", str(workdir)]) == 2
  refusal = _refusal(capsys, "train")
  assert f"{workdir / 'config.json'}: {culprit}" in refusal


def test_workdir_config_json_that_is_not_an_object(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("[1, 2]")
  assert cli.main(["train", "--workdir", str(workdir)]) == 2
  assert (f"{workdir / 'config.json'}: a config must be an object of fields, got list"
          in _refusal(capsys, "train"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  cfg = model_fixtures.smoke_cfg()
  out = tmp_path_factory.mktemp("model") / "m"
  export.write_model_dir(out, model_fixtures.init_encoder(cfg), config_lib.serving_spec(cfg),
                         model_id="smoke", source="test")
  return out


@pytest.mark.parametrize("field", ["num_heads", "patch_time"])
def test_embed_refuses_a_model_dir_config_with_a_zero_field(model_dir, tmp_path, capsys,
                                                            field):
  broken = tmp_path / "broken"
  shutil.copytree(model_dir, broken)
  meta = json.loads((broken / "config.json").read_text())
  meta["serving"]["architecture"][field] = 0
  (broken / "config.json").write_text(json.dumps(meta))
  model_fixtures.write_tone(tmp_path / "audio" / "a.wav", 1.0)
  assert cli.main(["embed", "--model", str(broken), "--input", str(tmp_path / "audio"),
                   "--out", str(tmp_path / "feats"), "--no_progress"]) == 2
  refusal = _refusal(capsys, "embed")
  assert f"{broken / 'config.json'}" in refusal
  assert f"architecture.{field}=0 is outside the accepted range" in refusal


def test_embed_exits_2_when_every_file_failed(model_dir, tmp_path, capsys):
  audio = tmp_path / "audio"
  audio.mkdir()
  for name in ("a.wav", "b.flac"):
    (audio / name).write_bytes(b"not audio at all" * 64)
  assert cli.main(["embed", "--model", str(model_dir), "--input", str(audio), "--out",
                   str(tmp_path / "feats"), "--no_progress"]) == 2
  assert f"no file under {audio} could be embedded (2 failed" in _refusal(capsys, "embed")
