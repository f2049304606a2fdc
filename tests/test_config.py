"""Config loading and validation: every refusal is a ConfigError naming the file or field."""
import pytest

from pupujepa_jax import config as config_lib


@pytest.mark.parametrize("source, culprit", [
    ("def get_config(:\n", "does not parse"),
    ("import no_such_module_here\n", "fails to load: ModuleNotFoundError"),
    ("x = 1\n", "has no get_config(arg) function"),
    ("def get_config(arg=''):\n  return {}['missing']\n",
     "get_config('') failed: KeyError"),
    ("def get_config(arg=''):\n  return {'model': 1}\n", "get_config returned dict"),
])
def test_config_file_errors_name_the_file(tmp_path, source, culprit):
  file = tmp_path / "exp.py"
  file.write_text(source)
  with pytest.raises(config_lib.ConfigError, match=rf"config file '{file}'.*") as info:
    config_lib.load_config(str(file))
  assert culprit in str(info.value)


def test_get_config_argument_errors_name_the_argument():
  with pytest.raises(config_lib.ConfigError, match="config argument 'wdith' unknown"):
    config_lib.load_config("experiments/pupujepa.py:wdith=3")
  with pytest.raises(config_lib.ConfigError, match="config argument batch: expected int"):
    config_lib.load_config("experiments/pupujepa.py:batch=many")


@pytest.mark.parametrize("values, culprit", [
    ([1, 2], "a config must be an object of fields, got list"),
    ("tiny", "a config must be an object of fields, got str"),
])
def test_from_dict_refuses_what_is_not_a_config(values, culprit):
  with pytest.raises(config_lib.ConfigError, match=culprit):
    config_lib.from_dict(values)


def _config(**fields):
  cfg = config_lib.base_config("tiny")
  config_lib.apply_overrides(cfg, [f"--config.{k}={v}" for k, v in fields.items()])
  return cfg


@pytest.mark.parametrize("field", ["total_steps", "log_every", "checkpoint.every",
                                   "data.batch_size", "data.prefetch_buffer", "optim.lr"])
def test_fields_that_must_be_positive(field):
  with pytest.raises(config_lib.ConfigError, match=rf"^{field}=0(\.0)? must be > 0"):
    config_lib.validate(_config(**{field: 0}))
  with pytest.raises(config_lib.ConfigError, match=rf"^{field}=-1(\.0)? must be > 0"):
    config_lib.validate(_config(**{field: -1}))


@pytest.mark.parametrize("field", ["optim.warmup_steps", "optim.min_lr", "optim.grad_clip",
                                   "checkpoint.keep", "checkpoint.keep_period",
                                   "data.num_workers"])
def test_fields_that_may_be_zero_but_not_negative(field):
  config_lib.validate(_config(**{field: 0}))
  with pytest.raises(config_lib.ConfigError, match=rf"^{field}=-1(\.0)? must be >= 0"):
    config_lib.validate(_config(**{field: -1}))


@pytest.mark.parametrize("field, value, culprit", [
    ("seed", -1, r"seed=-1 must be in \[0, 2\*\*32\)"),
    ("seed", 2 ** 32, r"seed=4294967296 must be in \[0, 2\*\*32\)"),
    ("model.num_heads", 0, "model.num_heads=0 is outside the accepted range"),
    ("model.patch_time", 0, "model.patch_time=0 is outside the accepted range"),
    ("model.width", 0, "model.width=0 is outside the accepted range"),
    ("predictor.num_heads", 0, "predictor.num_heads=0 is outside"),
    ("model.num_heads", 5, "model.width=192 is not divisible by model.num_heads=5"),
])
def test_fields_are_bounded(field, value, culprit):
  with pytest.raises(config_lib.ConfigError, match=culprit):
    config_lib.validate(_config(**{field: value}))


def test_a_group_set_to_a_value_is_named():
  with pytest.raises(config_lib.ConfigError, match="model: is a group of fields"):
    _config(model=3)
  cfg = config_lib.from_dict({**config_lib.to_dict(config_lib.base_config()), "model": 3})
  with pytest.raises(config_lib.ConfigError, match="model: expected a group of fields, got 3"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("spec", ["experiments/pupujepa.py", "experiments/cpu_demo.py",
                                  "experiments/pupujepa.py:variant=huge,batch=2048,fsdp=8"])
def test_shipped_configs_validate(spec):
  config_lib.validate(config_lib.load_config(spec))
