"""Tests for data_pipelines.pipeline: the Grain pretraining pipeline."""
import itertools
import pickle

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile

from data_pipelines import audio
from data_pipelines import dataset_format
from data_pipelines import pipeline
from pupujepa_jax import config as config_lib
from pupujepa_jax import frontend as frontend_lib
from pupujepa_jax import sharding

CROP_FRAMES = 128
FE = frontend_lib.DEFAULT
CROP_SAMPLES = FE.samples_for_frames(CROP_FRAMES)
NUM_RECORDS = 12


def _waves():
  """Noise records; two are shorter than a crop (30720 samples)."""
  rng = np.random.default_rng(0)
  lengths = [20_000, 9_000] + [CROP_SAMPLES + 3_000 * i for i in range(NUM_RECORDS - 2)]
  return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def _write_dataset(data_dir, waves):
  def examples():
    for i, wave in enumerate(waves):
      yield f"{i:04d}", {"audio": dataset_format.to_int16(wave), "path": f"track{i}.wav",
                         "duration": wave.shape[0] / FE.sample_rate}
  dataset_format.build_array_record_dataset("toy_audio", data_dir, dataset_format.audio_features(),
                                        {"train": examples},
                                        metadata={"sample_rate": FE.sample_rate})
  return data_dir


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  return _write_dataset(tmp_path_factory.mktemp("toy"), _waves())


def _data_cfg(path, **overrides):
  data = config_lib.base_config().data
  data.update(path=str(path), batch_size=4, num_workers=0,
              prefetch_buffer=2)
  data.update(overrides)
  return data


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_batches_have_the_promised_shape_and_values(dataset_dir):
  it = pipeline.make_pretrain_iterator(_data_cfg(dataset_dir), FE, CROP_FRAMES, seed=0, process_index=0,
                                       process_count=1)
  for batch in _take(it, 4):
    assert list(batch) == ["audio"]
    crops = batch["audio"]
    assert crops.shape == (4, CROP_SAMPLES) and crops.dtype == np.float32
    assert np.all(np.isfinite(crops)) and 0.05 < crops.std() < 0.2  # the 0.1-std noise


def test_crops_are_the_recorded_slices_of_the_stored_audio(dataset_dir):
  source = dataset_format.load_data_source(dataset_dir)
  ds = pipeline.make_pretrain_dataset(_data_cfg(dataset_dir), FE, CROP_FRAMES, seed=3, process_index=0,
                                      process_count=1, with_metadata=True)
  it = iter(ds)
  seen = set()
  for batch in _take(it, 6):
    for crop, index, offset in zip(batch["audio"], batch["record_index"], batch["offset"]):
      wave = dataset_format.pcm_to_float(source[int(index)]["audio"])
      assert 0 <= offset <= max(wave.shape[0] - CROP_SAMPLES, wave.shape[0] - 1)
      np.testing.assert_array_equal(crop, audio.take_crop(wave, int(offset), CROP_SAMPLES,
                                                          "loop"))
      seen.add(int(index))
  assert len(seen) == NUM_RECORDS  # 24 examples = 2 epochs of 12: every record appears


def test_same_seed_same_stream_other_seed_other_stream(dataset_dir):
  cfg = _data_cfg(dataset_dir)
  a = _take(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=7, process_index=0, process_count=1), 4)
  b = _take(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=7, process_index=0, process_count=1), 4)
  c = _take(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=8, process_index=0, process_count=1), 4)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["audio"], c[0]["audio"])


def test_epochs_are_reshuffled(dataset_dir):
  ds = pipeline.make_pretrain_dataset(_data_cfg(dataset_dir), FE, CROP_FRAMES, seed=0, process_index=0,
                                      process_count=1, with_metadata=True)
  order = np.concatenate([b["record_index"] for b in _take(iter(ds), 6)])
  first, second = order[:NUM_RECORDS], order[NUM_RECORDS:]
  assert sorted(first) == sorted(second) == list(range(NUM_RECORDS))
  assert not np.array_equal(first, second)


def test_restored_state_yields_exactly_the_same_batches(dataset_dir):
  cfg = _data_cfg(dataset_dir)
  it = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=1, process_index=0, process_count=1)
  _take(it, 5)  # crosses an epoch boundary (3 batches per epoch)
  state = it.get_state()
  expected = _take(it, 4)
  restored = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=1, process_index=0, process_count=1)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 4), expected)


def test_orbax_checkpoint_manager_round_trip(dataset_dir, tmp_path):
  cfg = _data_cfg(dataset_dir)
  it = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=2, process_index=0, process_count=1)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(data=pipeline.checkpoint_args_save(it)))
    manager.wait_until_finished()
  expected = _take(it, 3)
  fresh = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=2, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    assert manager.latest_step() == 2
    manager.restore(2, args=ocp.args.Composite(data=pipeline.checkpoint_args_restore(fresh)))
  _assert_same_batches(_take(fresh, 3), expected)


def test_two_processes_read_disjoint_shards_that_cover_the_data(dataset_dir):
  cfg = _data_cfg(dataset_dir)  # global batch 4 -> local batch 2 per process
  shards = []
  for process in range(2):
    ds = pipeline.make_pretrain_dataset(cfg, FE, CROP_FRAMES, seed=0, process_index=process,
                                        process_count=2, with_metadata=True)
    batches = _take(iter(ds), 3)
    assert all(b["audio"].shape == (2, CROP_SAMPLES) for b in batches)
    first_epoch = np.concatenate([b["record_index"] for b in batches])
    assert len(set(first_epoch)) == NUM_RECORDS // 2  # one epoch of its own shard
    shards.append(set(first_epoch.tolist()))
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(NUM_RECORDS))


def test_global_batches_do_not_depend_on_the_process_count(dataset_dir):
  cfg = _data_cfg(dataset_dir)
  single = _take(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=5, process_index=0,
                                                 process_count=1), 3)
  halves = [_take(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=5, process_index=p,
                                                  process_count=2), 3) for p in range(2)]
  for step, batch in enumerate(single):
    joined = np.concatenate([halves[0][step]["audio"], halves[1][step]["audio"]])
    np.testing.assert_array_equal(joined, batch["audio"])


@pytest.mark.parametrize("policy", ["loop", "pad"])
def test_short_tracks_are_looped_or_padded(tmp_path, policy):
  wave = (0.2 * np.random.default_rng(1).standard_normal(7_000)).astype(np.float32)
  _write_dataset(tmp_path, [wave])
  ds = pipeline.make_pretrain_dataset(_data_cfg(tmp_path, batch_size=3, short_policy=policy),
                                      FE, CROP_FRAMES, seed=0, process_index=0, process_count=1,
                                      with_metadata=True)
  batch = next(iter(ds))
  stored = dataset_format.pcm_to_float(dataset_format.to_int16(wave))
  for got, offset in zip(batch["audio"], batch["offset"]):
    if policy == "pad":
      assert offset == 0
      crop = np.concatenate([stored, np.zeros(CROP_SAMPLES - stored.shape[0], np.float32)])
    else:
      crop = np.roll(np.tile(stored, 5), -int(offset))[:CROP_SAMPLES]
    np.testing.assert_array_equal(got, crop)


def test_take_crop():
  wave = np.arange(10, dtype=np.float32)
  np.testing.assert_array_equal(audio.take_crop(wave, 3, 4, "loop"), [3, 4, 5, 6])
  np.testing.assert_array_equal(audio.take_crop(wave, 8, 25, "loop"),
                                [8, 9] + list(range(10)) * 2 + [0, 1, 2])
  np.testing.assert_array_equal(audio.take_crop(wave, 0, 12, "pad"), list(range(10)) + [0, 0])
  with pytest.raises(ValueError, match="short_policy"):
    audio.take_crop(wave, 0, 12, "wrap")


def test_global_batches_on_the_fake_device_mesh(dataset_dir):
  mesh = sharding.make_mesh(4, 2)
  cfg = _data_cfg(dataset_dir, batch_size=8)
  local = _take(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=0, process_index=0,
                                                process_count=1), 2)
  it = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=0, process_index=0, process_count=1)
  for expected, local_batch in zip(local, itertools.islice(it, 2)):
    crops = sharding.global_batch(local_batch, mesh)["audio"]
    assert isinstance(crops, jax.Array) and crops.shape == (8, CROP_SAMPLES)
    assert crops.sharding == sharding.batch_sharding(mesh)
    assert len(crops.addressable_shards) == 8
    assert crops.addressable_shards[0].data.shape == (1, CROP_SAMPLES)
    np.testing.assert_array_equal(np.asarray(crops), expected["audio"])


def test_record_cache_changes_no_batch(dataset_dir):
  """Batches over three epochs are the same read through the cache or straight from disk."""
  cached, uncached = (_take(pipeline.make_pretrain_iterator(
      _data_cfg(dataset_dir, cache_mb=mb), FE, CROP_FRAMES, seed=5, process_index=0,
      process_count=1), 9) for mb in (64, 0))
  _assert_same_batches(cached, uncached)


class _CountingSource:
  def __init__(self, sizes):
    self.sizes, self.reads = sizes, []

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, index):
    self.reads.append(index)
    return {"audio": np.full(self.sizes[index], index, np.int16), "path": f"{index}.wav"}


def test_record_cache_keeps_recent_records_within_its_bound():
  source = _CountingSource([100, 100, 100, 500])  # int16: 200, 200, 200 and 1000 bytes
  cache = pipeline.RecordCache(source, max_bytes=450)
  for index in (0, 1, 0, 2, 1, 3, 0):
    np.testing.assert_array_equal(cache[index]["audio"], index)
    assert cache.cached_bytes <= 450
  # Two records fit: 2 pushes out the least recently used (1, as 0 was read again), 1
  # then pushes out 0; 3 is too big to keep and evicts nothing.
  assert source.reads == [0, 1, 2, 1, 3, 0]
  assert len(cache) == 4 and cache.cached_bytes == 400
  with pytest.raises(ValueError, match="read-only"):
    cache[0]["audio"][0] = 1  # records are shared between reads
  worker_copy = pickle.loads(pickle.dumps(cache))  # what a Grain worker receives
  assert worker_copy.cached_bytes == 0
  np.testing.assert_array_equal(worker_copy[0]["audio"], 0)
  assert worker_copy.cached_bytes == 200


def test_folder_source_decodes_on_the_fly(tmp_path):
  rng = np.random.default_rng(2)
  (tmp_path / "sub").mkdir()
  soundfile.write(tmp_path / "a.wav", 0.1 * rng.standard_normal((48_000, 2)), 32_000)
  soundfile.write(tmp_path / "sub" / "b.flac", 0.1 * rng.standard_normal(40_000), 24_000)
  cfg = _data_cfg(tmp_path, source="folder", batch_size=2)
  batch = next(pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=0, process_index=0,
                                               process_count=1))
  assert batch["audio"].shape == (2, CROP_SAMPLES)
  assert np.all(np.isfinite(batch["audio"])) and batch["audio"].std() > 0.01


def test_bad_configs_name_the_field(dataset_dir, tmp_path):
  def make(**overrides):
    overrides.setdefault("path", dataset_dir)
    pipeline.make_pretrain_iterator(_data_cfg(**overrides), FE, CROP_FRAMES, seed=0, process_index=0,
                                    process_count=3)
  with pytest.raises(ValueError, match="data.batch_size=4"):
    make()
  with pytest.raises(ValueError, match="data.short_policy"):
    make(batch_size=6, short_policy="wrap")
  with pytest.raises(ValueError, match="data.source"):
    make(batch_size=6, source="webdataset")
  with pytest.raises(ValueError, match="data.path"):
    make(batch_size=6, path="")
  with pytest.raises(FileNotFoundError, match="no prepared TFDS dataset"):
    make(batch_size=6, path=str(tmp_path))


@pytest.mark.slow
def test_worker_processes_give_the_same_stream_and_restore(dataset_dir):
  in_process = _take(pipeline.make_pretrain_iterator(_data_cfg(dataset_dir), FE, CROP_FRAMES, seed=4,
                                                     process_index=0, process_count=1), 3)
  cfg = _data_cfg(dataset_dir, num_workers=2)
  it = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=4, process_index=0, process_count=1)
  try:
    first = _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
  finally:
    it.close()
  _assert_same_batches(first, in_process)
  restored = pipeline.make_pretrain_iterator(cfg, FE, CROP_FRAMES, seed=4, process_index=0, process_count=1)
  try:
    restored.set_state(state)
    _assert_same_batches(_take(restored, 3), expected)
  finally:
    restored.close()


def test_the_step_computes_the_front_end_of_the_crops(dataset_dir):
  """The crops' log-mels, computed in the jitted step, equal the NumPy front-end's."""
  from pupujepa_jax import train_step
  cfg = config_lib.load_config("experiments/pupujepa.py:smoke")
  cfg.model.crop_frames = CROP_FRAMES
  batch = next(pipeline.make_pretrain_iterator(_data_cfg(dataset_dir), FE, CROP_FRAMES,
                                               seed=0, process_index=0, process_count=1))
  spec = jax.jit(lambda b: train_step.batch_spectrogram(cfg, b))(batch)
  assert spec.shape == (4, CROP_FRAMES, FE.n_mels)
  np.testing.assert_allclose(np.asarray(spec), frontend_lib.log_mel_np(batch["audio"], FE),
                             atol=1e-4, rtol=0)
