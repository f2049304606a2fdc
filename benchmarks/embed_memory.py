"""Peak memory of embedding one long file: streamed (`pupujepa embed`) vs the whole file.

Not a test. Writes a long 44.1 kHz stereo WAV (a few notes, 30 minutes by default), then
embeds it in two fresh child processes with a small randomly initialised model (64 wide,
2 blocks, the released 10.24 s window), each reporting its peak resident memory:
- `stream`: `inference.embed_folder`, which decodes, resamples and windows the file as a
  stream (memory flat in the file's length);
- `whole`: the file decoded at once and passed to `Model.embed` (what embedding did
  before streaming: the waveform at 44.1 kHz stereo, its 24 kHz mono copy and all windows
  are in memory together).
`baseline_mb` is the child's resident memory after imports and model set-up, before the
file is touched (mostly the JAX runtime).

  python benchmarks/embed_memory.py --minutes 30
"""
from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile

SOURCE_RATE = 44_100


def write_long_file(path: pathlib.Path, minutes: float) -> None:
  """A stereo 44.1 kHz WAV of changing notes, written block by block."""
  rng = np.random.default_rng(0)
  block = 10 * SOURCE_RATE
  with soundfile.SoundFile(str(path), "w", SOURCE_RATE, 2, subtype="PCM_16") as f:
    for start in range(0, int(minutes * 60 * SOURCE_RATE), block):
      t = (start + np.arange(block)) / SOURCE_RATE
      freq = 110.0 * 2 ** (rng.integers(0, 36) / 12)
      note = 0.2 * np.sin(2 * np.pi * freq * t)
      f.write(np.stack([note, 0.5 * note], axis=1).astype(np.float32))


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def child(mode: str, path: pathlib.Path, batch: int) -> dict:
  import jax

  from pupujepa_jax import config as config_lib
  from pupujepa_jax import inference, models
  cfg = config_lib.base_config("tiny")
  cfg.model.update(width=64, depth=2, num_heads=2)
  spec = config_lib.serving_spec(cfg)
  # Random weights drawn in NumPy: compiling the initialiser would add ~100 MB of XLA
  # memory that has nothing to do with embedding.
  shapes = jax.eval_shape(lambda k: models.init_encoder(spec.architecture,
                                                        spec.frontend.n_mels, k),
                          jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype),
                        shapes)
  model = inference.Model(spec, params, model_id="small-random", batch_size=batch)
  model.embed_windows(np.zeros((model.batch_size, model.window_samples), np.float32))
  baseline = _peak_mb()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as out:
    if mode == "stream":
      meta = inference.embed_folder(model, path, out, progress=False)
      shape = list(np.load(pathlib.Path(out) / (path.name + ".npy")).shape)
      assert meta["files"] == [path.name], meta
    else:
      wave, rate = soundfile.read(str(path), dtype="float32")
      shape = list(model.embed(wave, rate).shape)
  return {"mode": mode, "peak_rss_mb": round(_peak_mb(), 1), "baseline_mb": round(baseline, 1),
          "seconds": round(time.perf_counter() - start, 1), "features": shape,
          "batch": model.batch_size}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--minutes", type=float, default=30.0, help="length of the file")
  parser.add_argument("--batch", type=int, default=2, help="windows per batch")
  parser.add_argument("--modes", default="stream,whole")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--file", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, pathlib.Path(args.file), args.batch)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "long.wav"
    write_long_file(path, args.minutes)
    results = {"minutes": args.minutes, "file_mb": round(path.stat().st_size / 2**20, 1)}
    for mode in args.modes.split(","):
      out = subprocess.run([sys.executable, __file__, "--child", mode, "--file", str(path),
                            "--batch", str(args.batch)],
                           check=True, capture_output=True, text=True).stdout
      results[mode] = json.loads(out.strip().splitlines()[-1])
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
