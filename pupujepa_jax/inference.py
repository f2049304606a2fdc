"""Embedding raw audio with an exported model: windows, front-end, encoder, readouts.

`load(model_dir)` returns a `Model`; `Model.embed(wave, sample_rate)` gives features
`[n_layers, n_chunks, D']`, one chunk per window. Layers are named by index:
0 = the patch embedding's output, 1..L = each block's output (before the final
LayerNorm), and `"final"` = the output after the final LayerNorm, which is the released
embedding (what the release's own inference publishes). `layers="final",
readout="mean"` on a 10.24 s clip gives one [1, 1, D] array: the mean over tokens of
the release's teacher output. `embed_folder` writes SPEC section 6's MARBLE layout
(`<out>/<relpath>.npy` + `meta.json`, which names the layers and lists the files; the
layout is `pupujepa_jax.features`).

Windows are exactly the model's window length (RoPE positions are normalised to the
grid extent, so another length would shift every position). A clip shorter than one
window is looped (or zero-padded); a longer clip is cut every `hop` seconds and, if the
windows do not reach its end, one last window is aligned to the end. Windows of many
files are batched together in fixed-size batches (the last one padded) so nothing
recompiles, and each batch is split over all local devices. `embed_folder` streams each
file (`audio.stream_audio`, `iter_windows`): it holds one batch of windows and one block
of audio, never a whole file's waveform, so memory does not grow with the file's length
(only its features, a few KB per window, are kept until the file is written).

Readouts: `freqcat` concatenates the W frequency tokens of each 25 Hz time step
(W * D features) and averages over time; `mean` averages all tokens (D features).
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Iterable, Iterator

import jax
import numpy as np

from data_pipelines import audio
from pupujepa_jax import export, features, frontend, models, sharding

READOUTS = ("freqcat", "mean")
SHORT_POLICIES = audio.SHORT_POLICIES
FINAL = "final"


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
  """Window start samples covering a clip; the last window is aligned to the clip's end."""
  if hop <= 0:
    raise ValueError(f"hop of {hop} samples must be positive")
  if num_samples <= window:
    return [0]
  starts = list(range(0, num_samples - window + 1, hop))
  if starts[-1] + window < num_samples:
    starts.append(num_samples - window)
  return starts


def split_windows(wave: np.ndarray, window: int, hop: int,
                  short_policy: str = "loop") -> np.ndarray:
  """[n_windows, window] windows of a mono clip (see `window_starts`)."""
  wave = np.asarray(wave, np.float32)
  if wave.ndim != 1 or wave.size == 0:
    raise ValueError(f"expected a non-empty mono waveform, got shape {wave.shape}")
  if wave.shape[0] < window:
    return audio.take_crop(wave, 0, window, short_policy)[None]
  return np.stack([wave[s:s + window] for s in window_starts(wave.shape[0], window, hop)])


def iter_windows(blocks: Iterable[np.ndarray], window: int, hop: int,
                 short_policy: str = "loop") -> Iterator[np.ndarray]:
  """The windows `split_windows` cuts from the concatenated `blocks`, cut as they arrive.

  Holds at most one window plus one block of samples, whatever the clip's length.
  """
  if hop <= 0:
    raise ValueError(f"hop of {hop} samples must be positive")
  held = np.zeros(0, np.float32)
  held_from = 0        # clip position of held[0]
  received = 0
  next_start, last_start = 0, None
  for block in blocks:
    held = np.concatenate([held, np.asarray(block, np.float32)])
    received += len(block)
    while next_start + window <= received:
      yield held[next_start - held_from:next_start - held_from + window].copy()
      last_start, next_start = next_start, next_start + hop
    # Keep what the next window needs, and the last `window` samples for an end-aligned
    # window if the clip ends here.
    keep_from = max(held_from, min(next_start, received - window))
    held, held_from = held[keep_from - held_from:], keep_from
  if received == 0:
    raise ValueError("expected a non-empty mono waveform, got no samples")
  if received < window:
    yield audio.take_crop(held, 0, window, short_policy)
  elif last_start + window < received:
    yield held[-window:].copy()


def readout(tokens, grid: tuple[int, int], kind: str):
  """[..., B, N, D] tokens -> [..., B, D'] window features (see module docstring)."""
  if kind == "freqcat":
    *lead, n, d = tokens.shape
    return tokens.reshape(*lead, grid[0], grid[1] * d).mean(axis=-2)
  if kind == "mean":
    return tokens.mean(axis=-2)
  raise ValueError(f"readout {kind!r} not in {READOUTS}")


def select_layers(num_layers: int, layers) -> list:
  """Layer keys from "all", "last", "final", an int or a list of ints / "final".

  Returns block-layer indices (0 .. num_layers - 1; negative counts back) and FINAL.
  """
  if layers == "all":
    return list(range(num_layers))
  if layers == "last":
    return [num_layers - 1]
  chosen = [layers] if isinstance(layers, (int, str)) else list(layers)
  out = []
  for i in chosen:
    if i == FINAL:
      out.append(FINAL)
      continue
    if isinstance(i, str) or not -num_layers <= int(i) < num_layers:
      raise ValueError(f"layer {i!r} out of range: the model has layers 0 = patch embedding "
                       f".. {num_layers - 1} = last block, and {FINAL!r}")
    out.append(int(i) % num_layers)
  return out


def layer_names(num_layers: int, chosen: list) -> list[str]:
  """Human names of layer keys: patch_embed, block_0 .. block_{L-1}, final."""
  return [FINAL if i == FINAL else "patch_embed" if i == 0 else f"block_{i - 1}"
          for i in chosen]


@dataclasses.dataclass
class Model:
  """An encoder with its front-end, ready to embed raw audio on all local devices."""
  spec: models.ServingSpec
  params: dict
  model_id: str = "unnamed"
  meta: dict = dataclasses.field(default_factory=dict)
  batch_size: int = 8
  short_policy: str = "loop"
  attention: str = "auto"

  def __post_init__(self):
    if self.short_policy not in SHORT_POLICIES:
      raise ValueError(f"short_policy {self.short_policy!r} not in {SHORT_POLICIES}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size {self.batch_size} must be >= 1")
    self.frontend = self.spec.frontend
    self.architecture = self.spec.architecture
    self.grid = self.spec.grid
    self.runtime = models.Runtime(attention=self.attention)
    devices = jax.local_devices()
    self.mesh = sharding.make_mesh(len(devices), 1, devices)
    # A batch must split evenly over the devices.
    self.batch_size = -(-self.batch_size // len(devices)) * len(devices)
    self.params = jax.device_put(self.params, sharding.replicated(self.mesh))
    self._forward = {}

  # ---------------------------------------------------------------- sizes
  @property
  def sample_rate(self) -> int:
    return int(self.frontend.sample_rate)

  @property
  def window_samples(self) -> int:
    return self.spec.window_samples

  @property
  def window_seconds(self) -> float:
    return self.window_samples / self.sample_rate

  @property
  def num_layers(self) -> int:
    """L + 1 block layers: the patch embedding plus one entry per block."""
    return int(self.architecture.depth) + 1

  @property
  def token_rate(self) -> float:
    """Tokens per second per frequency band (25 for the released front-end)."""
    return self.frontend.frames_per_second / self.architecture.patch_time

  def feature_dim(self, kind: str) -> int:
    return self.architecture.width * (self.grid[1] if kind == "freqcat" else 1)

  # ---------------------------------------------------------------- compute
  def spectrogram(self, wave):
    """Log-mel [..., frames, n_mels] of mono samples at the model's rate (jnp front-end)."""
    return frontend.log_mel_jnp(wave, self.frontend)

  def encode(self, spectrogram, return_layers: bool = True):
    """(final tokens [B, N, D], layers [L+1, B, N, D]) of spectrograms [B, T, F]."""
    return models.encode(self.architecture, self.params, spectrogram, self.runtime,
                         return_layers=return_layers)

  def _compiled(self, kind: str, chosen: tuple):
    if kind not in READOUTS:
      raise ValueError(f"readout {kind!r} not in {READOUTS}")
    key = (kind, chosen)
    if key not in self._forward:
      blocks = [i for i in chosen if i != FINAL]

      def forward(params, waves):
        spec = frontend.log_mel_jnp(waves, self.frontend)
        final, layers = models.encode(self.architecture, params, spec, self.runtime,
                                      return_layers=True)
        parts = {FINAL: readout(final, self.grid, kind)[None]}
        if blocks:
          picked = readout(layers[np.asarray(blocks)], self.grid, kind)
          parts.update({i: picked[j][None] for j, i in enumerate(blocks)})
        return jax.numpy.concatenate([parts[i] for i in chosen], axis=0)

      batch = sharding.batch_sharding(self.mesh)
      self._forward[key] = jax.jit(
          forward, in_shardings=(sharding.replicated(self.mesh), batch),
          out_shardings=jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
              None, sharding.DATA_AXES)))
    return self._forward[key]

  def embed_windows(self, windows: np.ndarray, readout: str = "freqcat",
                    layers="all") -> np.ndarray:
    """[n, window_samples] windows -> [n_layers, n, D'] features, in fixed-size batches."""
    windows = np.asarray(windows, np.float32)
    if windows.ndim != 2 or windows.shape[1] != self.window_samples:
      raise ValueError(f"windows must be [n, {self.window_samples}], got {windows.shape}")
    forward = self._compiled(readout, tuple(select_layers(self.num_layers, layers)))
    out = []
    for start in range(0, windows.shape[0], self.batch_size):
      batch = windows[start:start + self.batch_size]
      n = batch.shape[0]
      if n < self.batch_size:
        batch = np.concatenate([batch, np.zeros((self.batch_size - n, batch.shape[1]),
                                                np.float32)])
      out.append(np.asarray(forward(self.params, batch))[:, :n])
    return np.concatenate(out, axis=1)

  def windows(self, wave: np.ndarray, hop_seconds: float | None = None) -> np.ndarray:
    return split_windows(wave, self.window_samples, self.hop_samples(hop_seconds),
                         self.short_policy)

  def file_windows(self, path, hop_seconds: float | None = None) -> Iterator[np.ndarray]:
    """The windows of an audio file, decoded as a stream (see `iter_windows`); raises
    audio.AudioDecodeError naming the file, possibly after some windows."""
    return iter_windows(audio.stream_audio(path, self.sample_rate), self.window_samples,
                        self.hop_samples(hop_seconds), self.short_policy)

  def hop_samples(self, hop_seconds: float | None) -> int:
    """Window hop in samples: the window length by default; bounded to [1/100 s, window]."""
    if hop_seconds is None:
      return self.window_samples
    hop = int(round(float(hop_seconds) * self.sample_rate))
    if not self.sample_rate // 100 <= hop <= self.window_samples:
      raise ValueError(f"hop_seconds={hop_seconds} must be between 0.01 s and the window "
                       f"({self.window_seconds:.2f} s)")
    return hop

  def embed(self, wave, sample_rate: int, readout: str = "freqcat", layers="all",
            hop_seconds: float | None = None) -> np.ndarray:
    """Features [n_layers, n_chunks, D'] of a waveform [samples(, channels)] at any rate."""
    wave = np.asarray(wave)
    if wave.size == 0 or not np.all(np.isfinite(wave)):
      raise ValueError("waveform is empty or holds NaN/Inf samples")
    mono = audio.prepare_waveform(wave, int(sample_rate), self.sample_rate)
    return self.embed_windows(self.windows(mono, hop_seconds), readout, layers)


def load(model_dir, batch_size: int = 8, short_policy: str = "loop",
         attention: str = "auto") -> Model:
  """The `Model` of an exported (or imported) model directory; refuses broken ones."""
  md = export.read_model_dir(model_dir)
  return Model(md.spec, md.params, model_id=md.meta.get("model_id") or md.path.name,
               meta=md.meta, batch_size=batch_size, short_policy=short_policy,
               attention=attention)


# ------------------------------------------------------------------------ MARBLE export

def _relpaths(input_path: pathlib.Path):
  """(file, relative path) pairs: every audio file of a folder, or one file."""
  if input_path.is_file():
    return [(input_path, pathlib.Path(input_path.name))]
  if not input_path.exists():
    raise FileNotFoundError(f"input {input_path} does not exist")
  return [(f, f.relative_to(input_path)) for f in audio.list_audio_files(input_path)]


def _folder_meta(model: Model, readout: str, layers: list[int], hop_seconds: float) -> dict:
  """meta.json of a feature folder before any file is embedded (`features` format)."""
  provenance = model.meta.get("provenance", {})
  return {"D": model.feature_dim(readout), "L": model.num_layers - 1,
          "layers": layers, "layer_names": layer_names(model.num_layers, layers),
          "token_rate": model.token_rate,
          "tokens_per_second": model.token_rate * model.grid[1],
          "sample_rate": model.sample_rate, "readout": readout, "model_id": model.model_id,
          "config_hash": provenance.get("config_hash"), "step": provenance.get("step"),
          "window_seconds": model.window_seconds, "hop_seconds": hop_seconds,
          "short_policy": model.short_policy, "shape": "[layers, n_chunks, D]"}


class _WindowBatcher:
  """Packs the windows of consecutive files into full batches and writes each file's
  features once all its windows are embedded, in file order."""

  def __init__(self, model: Model, readout: str, layers: list[int], out: pathlib.Path,
               relpaths: list[pathlib.Path]):
    self.model, self.readout, self.layers = model, readout, layers
    self.out, self.relpaths = out, relpaths
    self.pending, self.owners = [], []  # windows waiting for a batch, and each one's file
    self.parts = {}                     # file index -> features of its embedded windows
    self.decoded = []                   # files fully decoded, not yet written, in order
    self.written = []

  def add(self, index: int, window: np.ndarray) -> None:
    self.pending.append(window)
    self.owners.append(index)
    if len(self.pending) == self.model.batch_size:
      self._run_batch()
      self._write_finished()

  def drop(self, index: int) -> None:
    """Forgets a file that failed to decode part-way (its windows are the newest)."""
    self.parts.pop(index, None)
    while self.owners and self.owners[-1] == index:
      self.pending.pop()
      self.owners.pop()

  def file_done(self, index: int) -> None:
    self.decoded.append(index)
    self._write_finished()

  def flush(self) -> None:
    if self.pending:
      self._run_batch()
    self._write_finished()

  def _run_batch(self):
    feats = self.model.embed_windows(np.stack(self.pending), self.readout, self.layers)
    start = 0
    for index, group in itertools.groupby(self.owners):
      n = len(list(group))
      self.parts.setdefault(index, []).append(feats[:, start:start + n])
      start += n
    self.pending.clear()
    self.owners.clear()

  def _write_finished(self):
    while self.decoded and self.decoded[0] not in self.owners:
      index = self.decoded.pop(0)
      features.write_features(self.out, self.relpaths[index],
                              np.concatenate(self.parts.pop(index), axis=1))
      self.written.append(str(self.relpaths[index]))


def embed_folder(model: Model, input_path, out, readout: str = "freqcat", layers="all",
                 window_seconds: float | None = None, hop_seconds: float | None = None,
                 progress: bool = True, overwrite: bool = False) -> dict:
  """Embed every audio file under `input_path` into `out` (MARBLE layout); returns meta.

  Files that cannot be decoded are listed in meta["failed"] with the reason; the others
  are embedded and listed in meta["files"]. Windows of consecutive files share batches.
  A folder holding another model's features is refused unless `overwrite` (then only the
  files its meta.json lists are removed; see `features.open_folder`).
  """
  if window_seconds is not None and abs(window_seconds - model.window_seconds) > 0.5 / \
      model.frontend.frames_per_second:
    raise ValueError(f"window_seconds={window_seconds} differs from the model's training "
                     f"window of {model.window_seconds:.2f} s; rotary positions are "
                     "normalised to the window, so only the training length is valid")
  if readout not in READOUTS:
    raise ValueError(f"readout {readout!r} not in {READOUTS}")
  input_path, out = pathlib.Path(input_path), pathlib.Path(out)
  files = _relpaths(input_path)
  chosen = select_layers(model.num_layers, layers)
  hop = model.hop_samples(hop_seconds) / model.sample_rate
  meta = _folder_meta(model, readout, chosen, hop)
  features.open_folder(out, meta, overwrite)
  batcher = _WindowBatcher(model, readout, chosen, out, [relpath for _, relpath in files])
  failed = []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=len(files), desc="embed", unit="file")
  try:
    for index, (path, relpath) in enumerate(files):
      try:
        for window in model.file_windows(path, hop):
          batcher.add(index, window)
      except audio.AudioDecodeError as e:
        failed.append({"path": str(relpath), "reason": e.reason})
        batcher.drop(index)
      else:
        batcher.file_done(index)
      if bar is not None:
        bar.update(1)
    batcher.flush()
  finally:
    if bar is not None:
      bar.close()
  meta.update(n_files=len(batcher.written), files=batcher.written, failed=failed)
  features.write_meta(out, meta)
  return meta
