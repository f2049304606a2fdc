"""The pretraining input pipeline (Grain): audio records -> random raw-audio crops.

    source (TFDS ArrayRecord dataset, or an audio folder decoded on the fly)
      -> in-memory cache of the last records read (`data.cache_mb` per worker)
      -> seeded shuffle, reshuffled every epoch, repeated forever (one global stream)
      -> this process's slice of every global batch (only those records are read)
      -> random crop of `samples_for_frames(crop_frames)` samples (short tracks looped or
         zero-padded)
      -> local batches {"audio": float32 [batch_size // process_count, crop_samples]}
      -> `mp_prefetch` worker processes (num_workers > 0)

The log-mel front-end runs inside the jitted train step (`frontend.log_mel_jnp` on the
device, `train_step.batch_spectrogram`), not here: the workers only slice arrays, so on
a small CPU machine they do not compete with the step for the cores, and on GPUs/TPUs
the front-end costs next to nothing. Reading a record still means decompressing and
parsing a whole track (~10 ms for 30 s of audio) for a crop of a second or ten, so each
worker keeps the records it read in a bounded cache (`RecordCache`): a corpus that fits
is read once, not once per epoch, and the crop is converted to float32 after it is cut.

Every random choice is seeded from (run seed, global stream position), so global batches
are a pure function of (seed, step): the same with 0 or N workers and with 1 or N
processes (a 2-host run sees the batches a 1-host run sees), and restorable from `iterator.get_state()`. The trainer stores that state in its orbax
checkpoint next to the model:

    ocp.args.Composite(state=..., data=pipeline.checkpoint_args_save(iterator))   # save
    ocp.args.Composite(state=..., data=pipeline.checkpoint_args_restore(iterator))  # restore

Grain's handler writes one `process_<i>-of-<n>.json` per JAX process, so each host
restores its own shard's position. The trainer turns the local batches of all processes
into global jax.Arrays on the training mesh (`sharding.global_batch`).
"""
from __future__ import annotations

import collections
import functools
import pathlib

import grain
import numpy as np

from data_pipelines import audio as audio_lib
from data_pipelines import dataset_format
from pupujepa_jax import frontend as frontend_lib

SHORT_POLICIES = audio_lib.SHORT_POLICIES


class AudioFolderSource:
  """Random-access records {"audio", "path", "duration"} of an audio folder, decoded on read.

  For small experiments; a decode error stops the pipeline (ingest the folder instead to
  skip bad files up front).
  """

  def __init__(self, root, sample_rate: int):
    self._root = pathlib.Path(root)
    self._files = [p.relative_to(self._root).as_posix()
                   for p in audio_lib.list_audio_files(self._root)]
    self._sample_rate = sample_rate

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict:
    rel = self._files[index]
    wave = audio_lib.load_audio(self._root / rel, sample_rate=self._sample_rate)
    return {"audio": wave, "path": rel, "duration": wave.shape[0] / self._sample_rate}


class RecordCache:
  """A record source that keeps the records it returns, least recently used first out,
  up to `max_bytes` of their arrays. Each worker process holds its own (a pickled
  cache travels empty). Records come back read-only, shared between reads."""

  def __init__(self, source, max_bytes: int):
    self._source = source
    self._max_bytes = max_bytes
    self._records = collections.OrderedDict()
    self._bytes = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._records.get(index)
    if record is not None:
      self._records.move_to_end(index)
      return record
    record = self._source[index]
    size = _record_bytes(record)
    if size <= self._max_bytes:
      for value in record.values():
        if isinstance(value, np.ndarray):
          value.flags.writeable = False
      self._records[index] = record
      self._bytes += size
      while self._bytes > self._max_bytes:
        self._bytes -= _record_bytes(self._records.popitem(last=False)[1])
    return record

  def __getstate__(self):
    return {**self.__dict__, "_records": collections.OrderedDict(), "_bytes": 0}

  @property
  def cached_bytes(self) -> int:
    return self._bytes


def _record_bytes(record: dict) -> int:
  return sum(value.nbytes for value in record.values() if isinstance(value, np.ndarray))


def open_source(data_cfg, frontend_cfg: frontend_lib.FrontendConfig):
  """The random-access record source the `data` config group names."""
  if not data_cfg.path:
    raise ValueError("data.path: empty; set it to a dataset dir (tfds) or audio folder")
  if data_cfg.source == "folder":
    return AudioFolderSource(data_cfg.path, frontend_cfg.sample_rate)
  if data_cfg.source == "tfds":
    rate = dataset_format.dataset_sample_rate(data_cfg.path)
    if rate is not None and rate != frontend_cfg.sample_rate:
      raise ValueError(f"data.path: dataset {data_cfg.path} holds {rate} Hz audio, the "
                       f"front-end expects {frontend_cfg.sample_rate} Hz")
    return dataset_format.load_data_source(data_cfg.path)
  raise ValueError(f"data.source: {data_cfg.source!r} not in ('tfds', 'folder')")


def draw_offset(num_samples: int, crop_samples: int, short_policy: str,
                rng: np.random.Generator) -> int:
  """Start of a uniformly random crop; for a looped short track, a random loop phase."""
  if num_samples >= crop_samples:
    return int(rng.integers(0, num_samples - crop_samples + 1))
  return int(rng.integers(0, num_samples)) if short_policy == "loop" else 0


class CropAudio(grain.transforms.Map):
  """[(stream position, (record index, record))] -> a local batch of random audio crops.

  Each crop's randomness comes from (seed, global stream position) alone, so an example
  is the same whichever process, worker or batch slice computes it.
  """

  def __init__(self, frontend_cfg: frontend_lib.FrontendConfig, crop_frames: int,
               short_policy: str, seed: int, with_metadata: bool = False):
    self._crop_samples = frontend_cfg.samples_for_frames(crop_frames)
    self._short_policy = short_policy
    self._seed = seed
    self._with_metadata = with_metadata

  def _example(self, position: int, index: int, record) -> dict:
    stored = np.asarray(record["audio"])
    if stored.shape[0] == 0:
      raise ValueError(f"record {index} ({record.get('path')!r}) holds no audio")
    rng = np.random.default_rng(_derive_seed(self._seed, 1, position))
    offset = draw_offset(stored.shape[0], self._crop_samples, self._short_policy, rng)
    # Cut first, convert the crop only: the track may be 30x longer than the crop.
    crop = audio_lib.take_crop(stored, offset, self._crop_samples, self._short_policy)
    out = {"audio": dataset_format.pcm_to_float(crop)}
    if self._with_metadata:
      out.update(record_index=np.int64(index), offset=np.int64(offset))
    return out

  def map(self, elements) -> dict:
    examples = [self._example(pos, index, record) for pos, (index, record) in elements]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _with_record_index(num_records: int, index: int, record) -> tuple[int, dict]:
  # Later epochs ask Grain's source for index + epoch * len, which it wraps around.
  return index % num_records, record


def _with_position(position: int, element) -> tuple[int, tuple]:
  return position, element


def _derive_seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _process_shard(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only the trainer's process needs JAX, never the workers.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


def _init_worker(worker_index: int, worker_count: int):
  """One BLAS thread per worker: the workers already fill the cores, and oversubscribed
  OpenBLAS threads made the mel matmul ~20x slower on a busy machine."""
  del worker_index, worker_count
  import threadpoolctl  # Installed with scikit-learn.
  threadpoolctl.threadpool_limits(1)


def _mark_absl_flags_parsed():
  # Grain worker processes read absl flags and crash when they were never parsed.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_pretrain_dataset(data_cfg, frontend_cfg: frontend_lib.FrontendConfig,
                          crop_frames: int, *, seed: int, process_index: int | None = None,
                          process_count: int | None = None,
                          with_metadata: bool = False) -> grain.IterDataset:
  """The pretraining pipeline as a Grain IterDataset (see the module docstring).

  `with_metadata` adds int64 `record_index` (into the source) and `offset` (crop start,
  samples) per example, for tests and debugging.
  """
  process_index, process_count = _process_shard(process_index, process_count)
  if data_cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by the "
                     f"{process_count} processes")
  if data_cfg.short_policy not in SHORT_POLICIES:
    raise ValueError(f"data.short_policy: {data_cfg.short_policy!r} not in {SHORT_POLICIES}")
  source = open_source(data_cfg, frontend_cfg)
  if data_cfg.cache_mb:
    source = RecordCache(source, int(data_cfg.cache_mb * 2 ** 20))
  local_batch = data_cfg.batch_size // process_count
  ds = grain.MapDataset.source(source).map_with_index(
      functools.partial(_with_record_index, len(source)))
  # One global stream for all processes: seeded shuffle (a new order every epoch), tagged
  # with stream positions; global batch b is local slices b*P .. b*P + P-1, and process p
  # takes slice p of each. So batches are identical for any process count, and a process
  # only reads the records of its own slice.
  ds = ds.shuffle(seed=_derive_seed(seed, 0)).repeat(None).map_with_index(_with_position)
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=list)
  ds = ds[process_index::process_count]
  ds = ds.map(CropAudio(frontend_cfg, crop_frames, data_cfg.short_policy, seed,
                         with_metadata))
  # Batching before to_iter_dataset: each worker (or read thread) builds whole batches.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                            prefetch_buffer_size=data_cfg.prefetch_buffer))
  if data_cfg.num_workers > 0:
    _mark_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.prefetch_buffer),
        worker_init_fn=_init_worker)
  return ds


def make_pretrain_iterator(data_cfg, frontend_cfg: frontend_lib.FrontendConfig,
                           crop_frames: int, *, seed: int, process_index: int | None = None,
                           process_count: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of local batches {"audio": float32 [local_batch, crop_samples]}.

  `get_state()` / `set_state()` save and restore its position (see checkpoint_args_*).
  Call `close()` when done if num_workers > 0 (it stops the worker processes).
  """
  return iter(make_pretrain_dataset(data_cfg, frontend_cfg, crop_frames, seed=seed,
                                    process_index=process_index, process_count=process_count))


def checkpoint_args_save(iterator):
  """Orbax args that save the iterator's position (one file per JAX process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_args_restore(iterator):
  """Orbax args that restore into `iterator` (built with the same config and seed)."""
  return grain.checkpoint.CheckpointRestore(iterator)
