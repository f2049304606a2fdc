"""The core install (no extras) embeds audio with an exported model, and the `train`
extra alone ingests and trains.

A fresh interpreter refuses to import every module that only the extras bring (data,
train, eval, offline, reference), then runs `pupujepa embed` on a model dir: it must work.
A command that needs an extra names the extra to install instead of a traceback. For an
extra, the interpreter refuses every installed module outside what that extra declares,
transitively (a dependency that only another extra happens to bring would pass in a full
install and break a user's).
"""
import importlib.metadata as metadata
import json
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def _run(*argv, blocked=BLOCKED):
  return subprocess.run([sys.executable, "-c", RUNNER, ",".join(blocked), *argv],
                        capture_output=True, text=True, timeout=300)


def _declared_closure(requirement: str) -> set[str]:
  """Installed distributions `requirement` brings, following every declared requirement
  (with its extras and environment markers)."""
  found, seen = set(), set()
  todo = [(Requirement(requirement), {""})]  # (requirement, extras of who asked for it)
  while todo:
    req, asked_with = todo.pop()
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in asked_with):
      continue
    key = (canonicalize_name(req.name), frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:  # not installed: nothing of it can be imported
      continue
    found.add(key[0])
    todo += [(Requirement(text), set(req.extras) | {""}) for text in dist.requires or []]
  return found


def _modules_outside(requirement: str) -> list[str]:
  """Top-level modules of installed distributions that `requirement` does not bring."""
  declared = _declared_closure(requirement)
  ours = {"pupujepa_jax", "data_pipelines", "experiments", "tests"}
  return sorted(module for module, dists in metadata.packages_distributions().items()
                if module not in ours and module.isidentifier()
                and not any(canonicalize_name(d) in declared for d in dists))


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


def test_the_train_extra_alone_ingests_a_folder_and_trains(tmp_path, tone_folder):
  blocked = _modules_outside("pupujepa_jax[train]")
  assert "sklearn" in blocked and "pretty_midi" in blocked and "grain" not in blocked
  out = _run("data", "ingest", "--input", str(tone_folder), "--out", str(tmp_path / "data"),
             blocked=blocked)
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run("train", "--config", f"experiments/pupujepa.py:smoke,data={tmp_path / 'data'}",
             "--workdir", str(tmp_path / "run"), "--stop_after=2", "--no_progress",
             blocked=blocked)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout)["final_step"] == 2
