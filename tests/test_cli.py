"""`pupujepa info` and `pupujepa masks`: parameter counts, grid, mask statistics, pictures."""
import json

import pytest

from pupujepa_jax import cli
from pupujepa_jax import config as config_lib

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
