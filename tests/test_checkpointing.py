"""Checkpoint verification on real orbax checkpoints: digests independent of sharding,
damaged steps named and skipped, NaN never written, a foreign model is a config error,
protected steps survive rotation, and export restores through the same checks."""
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pupujepa_jax import checkpointing, cli, sharding, train_step
from pupujepa_jax import workdir as workdir_lib
from tests import model_fixtures


def _state(seed=0, rows=256):
  """A small train-state-like pytree: a float32 matrix (large enough that its bytes fill
  the biggest data file), a vector and an int32 step."""
  rng = np.random.default_rng(seed)
  return {"step": jnp.int32(seed),
          "params": {"w": jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32),
                     "b": jnp.asarray(rng.standard_normal(256), jnp.float32)}}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _on_one_device(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda _: device, state)


def _restore(manager, state, step=None):
  return checkpointing.restore(manager, _abstract(state), _on_one_device(state), step)


def _write(tmp_path, steps, keep=3, protect=None):
  manager = checkpointing.make_manager(tmp_path, keep=keep, async_save=False,
                                       protect=protect)
  for step in steps:
    checkpointing.save(manager, step, _state(step), health={"loss": 0.5, "param_norm": 1.0})
  manager.wait_until_finished()
  return manager


def flip_bytes(step_dir, count=64):
  """Invert `count` bytes in the middle of the largest array data file (size unchanged)."""
  data_files = [p for p in (pathlib.Path(step_dir) / "state").rglob("*")
                if p.is_file() and p.parent.name == "d"]
  target = max(data_files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
  target.write_bytes(bytes(data))
  return target


def test_digests_do_not_depend_on_sharding_and_see_one_flipped_bit():
  state = _state(1)
  single = checkpointing.summarize(state)
  mesh = sharding.make_mesh(2, 4)
  sharded = jax.device_put(state, {"step": NamedSharding(mesh, P()),
                                   "params": {"w": NamedSharding(mesh, P("fsdp", "data")),
                                              "b": NamedSharding(mesh, P("fsdp"))}})
  assert checkpointing.summarize(sharded) == single
  assert sorted(single.digests) == ["params/b", "params/w", "step"] and not single.non_finite
  # One bit of one element, or two elements swapped, change that array's digest only.
  w = np.asarray(state["params"]["w"])
  flipped = w.copy()
  flipped.view(np.uint32)[100, 7] ^= 1 << 3
  swapped = w.copy()
  swapped[0, 0], swapped[0, 1] = w[0, 1], w[0, 0]
  for changed in (flipped, swapped):
    other = checkpointing.summarize({**state, "params": {**state["params"],
                                                        "w": jnp.asarray(changed)}})
    assert other.digests["params/w"] != single.digests["params/w"]
    assert {k: v for k, v in other.digests.items() if k != "params/w"} == {
        k: v for k, v in single.digests.items() if k != "params/w"}


def test_a_state_holding_nan_is_never_written(tmp_path):
  manager = checkpointing.make_manager(tmp_path, async_save=False)
  state = _state()
  state["params"]["b"] = state["params"]["b"].at[3].set(jnp.nan)
  with pytest.raises(checkpointing.NonFiniteStateError, match=r"step 5 .*NaN or Inf in "
                     r"params/b"):
    checkpointing.save(manager, 5, state)
  assert list(manager.all_steps()) == []


def test_a_damaged_step_is_named_and_the_newest_good_one_restored(tmp_path, caplog):
  manager = _write(tmp_path, [1, 2, 3])
  flip_bytes(tmp_path / "checkpoints" / "3")
  with caplog.at_level(logging.WARNING):
    restored = _restore(manager, _state())
  assert restored.step == 2 and restored.health == {"loss": 0.5, "param_norm": 1.0}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), _state(2))
  assert list(restored.rejected) == [3]
  assert restored.rejected[3].startswith(f"checkpoint step 3 under {manager.directory} is "
                                         "damaged")
  assert any("checkpoint step 3 under" in r.getMessage() for r in caplog.records)
  with pytest.raises(checkpointing.CheckpointDamagedError, match="checkpoint step 3 under"):
    _restore(manager, _state(), step=3)
  # Set aside (by the workdir's writer): out of rotation, reason kept, step free again.
  moved = checkpointing.set_aside(manager, restored.rejected)
  assert moved == [tmp_path / "checkpoints_rejected" / "3"]
  assert (moved[0] / "REASON").read_text().strip() == restored.rejected[3]
  assert sorted(manager.all_steps()) == [1, 2]
  checkpointing.save(manager, 3, _state(3))
  manager.wait_until_finished()
  assert _restore(manager, _state()).step == 3


def test_damaged_or_missing_verification_records_are_damage(tmp_path):
  manager = _write(tmp_path, [1, 2, 3])
  record = tmp_path / "checkpoints" / "3" / checkpointing.RECORD_ITEM / "metadata"
  digests = json.loads(record.read_text())
  digests["digests"]["params/b"] = "0" * 16
  record.write_text(json.dumps(digests))
  text = (tmp_path / "checkpoints" / "2" / checkpointing.RECORD_ITEM / "metadata")
  text.write_text(text.read_text()[:-40])  # truncated JSON
  for path in (tmp_path / "checkpoints" / "1" / checkpointing.RECORD_ITEM).iterdir():
    path.unlink()
  (tmp_path / "checkpoints" / "1" / checkpointing.RECORD_ITEM).rmdir()
  with pytest.raises(checkpointing.CheckpointDamagedError) as info:
    _restore(manager, _state())
  message = str(info.value)
  assert message.startswith(f"no checkpoint under {manager.directory} verifies")
  assert "step 3 under" in message and "params/b differ from what was written" in message
  assert "step 2 under" in message and "unreadable" in message
  assert "step 1 under" in message and "no verification record" in message
  assert sorted(manager.all_steps()) == [1, 2, 3]  # a reader moves nothing


def test_another_model_shape_is_a_config_mismatch_not_damage(tmp_path):
  manager = _write(tmp_path, [1, 2])
  wider = _state(rows=128)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"step 2 under .* holds another model than this config \(1 "
                           r"differences: params/w has shape \(256, 256\) float32, this "
                           r"config expects \(128, 256\) float32\)"):
    _restore(manager, wider)
  assert sorted(manager.all_steps()) == [1, 2]


def test_protected_steps_survive_rotation(tmp_path):
  protect = {1}
  manager = _write(tmp_path, [1, 2, 3], keep=1, protect=protect)
  assert sorted(manager.all_steps()) == [1, 3]
  protect.discard(1)  # the set is read at every rotation
  checkpointing.save(manager, 4, _state(4))
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [4]


def test_export_restores_the_newest_step_that_verifies(tmp_path, capsys):
  workdir = model_fixtures.make_workdir(tmp_path, step=1)
  _, _, _, state = workdir_lib.restore(workdir)
  state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, state)
  checkpointing.save_state(workdir, 2, state)
  flip_bytes(workdir / "checkpoints" / "2")
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "m")]) == 0
  assert json.loads(capsys.readouterr().out)["step"] == 1
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "m2"),
                   "--step", "2"]) == 2
  refusal = capsys.readouterr().err.strip().splitlines()[-1]
  assert refusal.startswith(f"pupujepa export: error: checkpoint step 2 under "
                            f"{workdir.absolute() / 'checkpoints'} is damaged")
  assert not (tmp_path / "m2").exists()
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  cfg, _ = workdir_lib.read_config(workdir)
  manager = checkpointing.make_manager(workdir, read_only=True)
  restored = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                   train_step.state_shardings(cfg, mesh))
  assert restored.step == 1 and list(restored.rejected) == [2]


def test_a_damaged_data_pipeline_position_is_a_damaged_step(tmp_path):
  """The iterator position saved with a step is verified like the arrays: a position
  file that still parses but was changed rejects its step, and the older one resumes
  exactly where it was saved."""
  import grain
  from data_pipelines import pipeline

  def iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=0).batch(4).to_iter_dataset())

  manager = checkpointing.make_manager(tmp_path, keep=3, async_save=False)
  it = iterator()
  following = {}
  for step in (1, 2):
    next(it)
    checkpointing.save(manager, step, _state(step), pipeline.checkpoint_args_save(it))
    manager.wait_until_finished()
    following[step] = next(it)
  position = tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json"
  state = json.loads(position.read_text())
  counter = next(k for k, v in state.items() if isinstance(v, int) and v > 0)
  state[counter] += 1  # still valid JSON, another position
  position.write_text(json.dumps(state, indent=4))

  resumed = iterator()
  restored = checkpointing.restore(manager, _abstract(_state()), _on_one_device(_state()),
                                   data_args=pipeline.checkpoint_args_restore(resumed))
  assert restored.step == 1 and list(restored.rejected) == [2]
  assert ("the data pipeline position (data/process_0-of-1.json) differs from what was "
          "written") in restored.rejected[2]
  np.testing.assert_array_equal(next(resumed), following[1])
