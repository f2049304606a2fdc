"""The core install (no extras) embeds audio with an exported model.

A fresh interpreter refuses to import every module that only the extras bring (data,
train, eval, offline, reference), then runs `pupujepa embed` on a model dir: it must work.
A command that needs an extra names the extra to install instead of a traceback.
"""
import json
import subprocess
import sys

import numpy as np
import soundfile

from pupujepa_jax import cli, config as config_lib, export
from tests import model_fixtures

BLOCKED = sorted(set(cli.EXTRA_OF_MODULE))
RUNNER = """
import importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
from pupujepa_jax import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def _run(*argv):
  return subprocess.run([sys.executable, "-c", RUNNER, ",".join(BLOCKED), *argv],
                        capture_output=True, text=True, timeout=300)


def test_embed_needs_no_extra(tmp_path):
  cfg = model_fixtures.smoke_cfg()
  model_dir = tmp_path / "model"
  export.write_model_dir(model_dir, model_fixtures.init_encoder(cfg),
                         config_lib.serving_spec(cfg), model_id="core", source="test")
  (tmp_path / "audio").mkdir()
  soundfile.write(tmp_path / "audio" / "a.wav",
                  0.1 * np.random.default_rng(0).standard_normal(30_000), 24_000)
  out = _run("embed", "--model", str(model_dir), "--input", str(tmp_path / "audio"),
             "--out", str(tmp_path / "feats"), "--no_progress")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout)["n_files"] == 1
  assert np.load(tmp_path / "feats" / "a.wav.npy").shape == (3, 2, 8 * 64)  # 1.25 s: 2 windows


def test_a_command_of_an_extra_names_the_extra(tmp_path):
  out = _run("probe", "--features", str(tmp_path), "--labels", str(tmp_path / "x.csv"),
             "--task", "multiclass")
  assert out.returncode == 2
  assert "pip install 'pupujepa_jax[eval]'" in out.stderr, out.stderr[-2000:]
