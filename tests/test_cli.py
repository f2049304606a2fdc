"""`pupujepa info` and `pupujepa masks`: parameter counts, grid, mask statistics, pictures."""
import json

import pytest

from pupujepa_jax import cli
from pupujepa_jax import config as config_lib

VARIANTS = ("tiny", "small", "base", "large", "huge")


def expected_encoder_params(m) -> int:
  """Closed form of our encoder's parameter count (EVA blocks, no CLS, no abs. pos.)."""
  d, hidden, head = m.width, int(m.width * m.mlp_ratio), m.width // m.num_heads
  mlp = (d * 2 * hidden + 2 * hidden + hidden * d + d) if m.swiglu else (
      d * hidden + hidden + hidden * d + d)
  block = (4 * d + 3 * d * d + 2 * d + d * d + d + mlp + (4 * head if m.qk_norm else 0)
           + (2 * d if m.layer_scale else 0))
  return m.patch_time * m.patch_freq * d + d + 2 * d + m.depth * block + 2 * d


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


def test_released_tiny_flavour_and_plain_tiny(capsys):
  info = _run(capsys, ["info", "--config", "experiments/pupujepa.py:variant=tiny"])
  assert 7.0e6 < info["encoder_params"] < 7.2e6  # SwiGLU (4x per branch) + QK-norm
  plain = _run(capsys, ["info", "--config", "experiments/pupujepa.py:variant=tiny",
                        "--config.model.swiglu=false", "--config.model.qk_norm=false"])
  assert 5.3e6 < plain["encoder_params"] < 5.4e6  # ViT-Ti shape without CLS/pos. emb.


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
                   "--config.data.crop_frames=1022"]) == 2
  assert "data.crop_frames=1022 is not divisible" in capsys.readouterr().err
  assert cli.main(["info", "--config", "experiments/pupujepa.py:variant=gigantic"]) == 2
  assert "variant" in capsys.readouterr().err
