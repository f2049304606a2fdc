"""The run config: schema and defaults, loading, command-line overrides, diffs, validation.

A run's config is an `ml_collections.ConfigDict`. The groups that jitted code reads have
one typed, frozen definition each, and the ConfigDict defaults are made from it:
`model` from `models.Architecture` (plus `variant` and `drop_path`), `predictor` from
`models.PredictorSize`, `frontend` from `frontend.FrontendConfig`, `mask` from
`masking.MaskConfig`. `architecture(cfg)`, `frontend(cfg)`, `mask(cfg)`, `runtime(cfg)`,
`serving_spec(cfg)` turn a config back into those types.

Experiment files in `experiments/` start from `base_config()` and change fields; nothing
may add a key the schema does not know. `validate(config)` runs before anything compiles
and names the offending field. Fields marked "(unknown)" are not given by the release;
the default is ours and an ablation in `experiments/ablations/` covers it.

This module also owns `--config.a.b=value` overrides (`apply_overrides`) and their
inverse (`override_args`), and the diff of two configs (`differences`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import pathlib

import ml_collections

from pupujepa_jax import frontend as frontend_lib
from pupujepa_jax import masking
from pupujepa_jax.models import spec as spec_lib

# Width, depth, heads of each encoder variant (SPEC section 3).
VARIANTS = {
    "tiny": dict(width=192, depth=12, num_heads=3),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
    "huge": dict(width=1280, depth=32, num_heads=16),
}
# Predictor width, depth, heads per variant (unknown; our defaults; 512 x 8 fits the
# released large checkpoint).
PREDICTOR_DEFAULTS = {
    "tiny": dict(width=384, depth=6, num_heads=6),
    "small": dict(width=384, depth=6, num_heads=6),
    "base": dict(width=512, depth=8, num_heads=16),
    "large": dict(width=512, depth=8, num_heads=16),
    "huge": dict(width=512, depth=8, num_heads=16),
}
TEACHER_MODES = ("targets_only", "full_grid")
TEACHER_PATCH_EMBEDS = ("shared", "ema")
LOSSES = ("smooth_l1", "normalized_mse", "mse")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "dots", "full")
DATA_SOURCES = ("tfds", "folder")
SHORT_POLICIES = ("loop", "pad")
# Fields that may change between a run and its resumption without changing its result.
RESUMABLE_FIELDS = ("total_steps", "log_every", "checkpoint.every", "checkpoint.keep",
                    "checkpoint.keep_period", "data.num_workers", "data.prefetch_buffer",
                    "data.cache_mb", "data.path", "attention", "layer_loop", "monitor.every",
                    "monitor.labels")


class ConfigError(ValueError):
  """A config field has a wrong name, value or combination."""


def _group(values: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(values)


def base_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The full schema with the released defaults for `variant`."""
  if variant not in VARIANTS:
    raise ConfigError(f"model.variant: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  from pupujepa_jax import models
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 500_000
  arch = dataclasses.replace(models.Architecture(), **VARIANTS[variant])
  c.model = _group(dict(variant=variant, **dataclasses.asdict(arch),
                        drop_path=0.0))  # stochastic depth at the last block (linear)
  c.predictor = _group(PREDICTOR_DEFAULTS[variant])
  c.teacher_mode = "targets_only"      # released; "full_grid" = I-JEPA (ablation)
  c.teacher_patch_embed = "shared"     # released; "ema" = the teacher's own EMA copy
  c.loss = "smooth_l1"                 # (unknown) I-JEPA's choice
  c.frontend = _group(dataclasses.asdict(frontend_lib.FrontendConfig()))
  c.data = _group(dict(
      source="tfds",           # "tfds" (ArrayRecord from ingest / builders) or "folder"
      path="",                 # dataset dir (tfds) or audio folder (folder)
      batch_size=256,          # global batch
      num_workers=2,           # Grain worker processes per host (0 = in process)
      short_policy="loop",     # tracks shorter than a crop: "loop" or "pad"
      prefetch_buffer=2,
      cache_mb=512,            # records kept in memory per worker, MiB (0 = none)
  ))
  mask = dataclasses.asdict(masking.MaskConfig())
  c.mask = _group({k: tuple(v) if isinstance(v, list) else v for k, v in mask.items()})
  c.optim = _group(dict(
      lr=1.5e-4,               # peak learning rate (unknown)
      min_lr=1e-6,
      warmup_steps=10_000,
      b1=0.9,
      b2=0.999,
      weight_decay=(0.04, 0.4),  # cosine schedule start -> end
      ema=(0.996, 1.0),          # linear momentum schedule start -> end
      grad_clip=0.0,             # 0 disables global-norm clipping
  ))
  c.mesh = _group(dict(data=-1, fsdp=1))  # -1: all remaining devices
  c.compute_dtype = "float32"
  c.remat = "none"            # "none", "dots" (keep matmul outputs) or "full"
  c.attention = "auto"        # attention kernel (models.attention.KERNELS)
  c.layer_loop = "auto"       # "scan", "unrolled" or "auto" (unrolled on CPUs)
  c.log_every = 50
  # Online kNN probe of the teacher on a small labelled set (labels.csv with paths
  # relative to its folder) every `every` steps; 0 or an empty path turns it off.
  c.monitor = _group(dict(every=0, labels=""))
  c.checkpoint = _group(dict(every=5000, keep=3, keep_period=50_000))
  return c


# --------------------------------------------------------------- typed views of a config

def architecture(cfg):
  from pupujepa_jax import models
  names = {f.name for f in dataclasses.fields(models.Architecture)}
  return models.Architecture(**{k: v for k, v in cfg.model.items() if k in names})


def frontend(cfg) -> frontend_lib.FrontendConfig:
  return frontend_lib.FrontendConfig(**dict(cfg.frontend))


def serving_spec(cfg):
  from pupujepa_jax import models
  return models.ServingSpec(architecture(cfg), frontend(cfg))


def predictor_size(cfg):
  from pupujepa_jax import models
  return models.PredictorSize(**dict(cfg.predictor))


def runtime(cfg):
  from pupujepa_jax import models
  return models.Runtime(compute_dtype=cfg.compute_dtype, remat=cfg.remat,
                        attention=cfg.attention, layer_loop=cfg.layer_loop,
                        drop_path=float(cfg.model.drop_path))


def mask(cfg) -> masking.MaskConfig:
  values = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in cfg.mask.items()}
  return masking.MaskConfig(**values)


def grid_shape(cfg) -> tuple[int, int]:
  """Token grid (time patches, frequency patches) of the run's crop."""
  return architecture(cfg).grid(cfg.frontend.n_mels)


# ---------------------------------------------------------------------------- validation

def _check_keys(cfg, schema, prefix=""):
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"{name}: unknown config field (known here: {sorted(schema.keys())})")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"{name}: expected a group of fields, got {cfg[key]!r}")
      _check_keys(cfg[key], schema[key], name + ".")
    elif isinstance(cfg[key], ml_collections.ConfigDict):
      raise ConfigError(f"{name}: expected a value, got a group of fields")
  for key in schema.keys():
    if key not in cfg:
      raise ConfigError(f"{prefix}{key}: missing config field")


def _check_value_types(cfg, schema, prefix=""):
  """Each leaf has its default's type (an int is accepted where a float is expected)."""
  for key in schema.keys():
    name, value, default = f"{prefix}{key}", cfg[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      _check_value_types(value, default, name + ".")
      continue
    if isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
          value)
    elif isinstance(default, (tuple, list)):
      ok = isinstance(value, (tuple, list)) and all(
          isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          for v in value)
    else:
      ok = isinstance(value, type(default))
    if not ok:
      raise ConfigError(f"{name}: expected {type(default).__name__}, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False):
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _one_of(name: str, value, choices):
  if value not in choices:
    raise ConfigError(f"{name}: {value!r} not in {choices}")


def validate(cfg, num_devices: int | None = None) -> None:
  """Raise ConfigError naming the field if `cfg` is unknown, impossible or inconsistent."""
  from pupujepa_jax.models import attention, transformer
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"a config must be an ml_collections.ConfigDict, got {type(cfg).__name__}")
  # The variant picks the schema's defaults; a `model` that is not a group is reported
  # by the key check below.
  variant = "tiny"
  if isinstance(cfg.get("model"), ml_collections.ConfigDict):
    variant = cfg.model.get("variant")
    if not isinstance(variant, str) or variant not in VARIANTS:
      raise ConfigError(f"model.variant: unknown variant {variant!r}; "
                        f"known: {sorted(VARIANTS)}")
  schema = base_config(variant)
  _check_keys(cfg, schema)
  _check_value_types(cfg, schema)
  try:
    spec_lib.validate_frontend(frontend(cfg), "frontend.")
    architecture(cfg).validate(cfg.frontend.n_mels, "model.")
    mask(cfg).validate(grid_shape(cfg))
    _validate_predictor(cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  _one_of("teacher_mode", cfg.teacher_mode, TEACHER_MODES)
  _one_of("teacher_patch_embed", cfg.teacher_patch_embed, TEACHER_PATCH_EMBEDS)
  _one_of("loss", cfg.loss, LOSSES)
  _one_of("compute_dtype", cfg.compute_dtype, DTYPES)
  _one_of("remat", cfg.remat, REMAT)
  _one_of("attention", cfg.attention, attention.KERNELS)
  _one_of("layer_loop", cfg.layer_loop, transformer.LAYER_LOOPS)
  _one_of("data.short_policy", cfg.data.short_policy, SHORT_POLICIES)
  _one_of("data.source", cfg.data.source, DATA_SOURCES)
  if not 0 <= cfg.seed < 2 ** 32:  # jax keys keep 32 bits of it, Grain refuses negatives
    raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32)")
  if not 0.0 <= cfg.model.drop_path < 1.0:
    raise ConfigError(f"model.drop_path={cfg.model.drop_path} must be in [0, 1)")
  for name in ("total_steps", "log_every", "checkpoint.every", "data.batch_size",
               "data.prefetch_buffer", "optim.lr"):
    _positive(name, _get(cfg, name))
  for name in ("optim.warmup_steps", "optim.min_lr", "optim.grad_clip", "checkpoint.keep",
               "checkpoint.keep_period", "data.num_workers", "data.cache_mb",
               "monitor.every"):
    _positive(name, _get(cfg, name), allow_zero=True)
  o = cfg.optim
  if o.min_lr > o.lr:
    raise ConfigError(f"optim.min_lr={o.min_lr} exceeds optim.lr={o.lr}")
  for name in ("b1", "b2"):
    if not 0.0 <= o[name] < 1.0:
      raise ConfigError(f"optim.{name}={o[name]} must be in [0, 1)")
  for name, low, high in (("weight_decay", 0.0, 10.0), ("ema", 0.0, 1.0)):
    values = tuple(o[name])
    if len(values) != 2 or not all(low <= v <= high for v in values):
      raise ConfigError(f"optim.{name}={values} must be (start, end) within [{low}, {high}]")
  if o.warmup_steps > cfg.total_steps:
    raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds "
                      f"total_steps={cfg.total_steps}")
  if num_devices is not None:
    mesh_shape(cfg, num_devices)  # raises on a mesh that does not fit


def _validate_predictor(cfg) -> None:
  p = cfg.predictor
  for name in ("width", "depth", "num_heads"):
    if not 1 <= p[name] <= spec_lib.MAX_WIDTH:
      raise ConfigError(f"predictor.{name}={p[name]} is outside [1, {spec_lib.MAX_WIDTH}]")
  if p.width % p.num_heads:
    raise ConfigError(f"predictor.width={p.width} is not divisible by "
                      f"predictor.num_heads={p.num_heads}")
  if cfg.model.pos_embed == "rope" and (p.width // p.num_heads) % 4:
    raise ConfigError(f"predictor: head dim {p.width // p.num_heads} must be a multiple of "
                      "4 for 2-D rotary embeddings")


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def mesh_shape(cfg, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes of the mesh for `num_devices`; checks they divide the batch."""
  fsdp = cfg.mesh.fsdp
  data = cfg.mesh.data
  if fsdp < 1:
    raise ConfigError(f"mesh.fsdp={fsdp} must be >= 1")
  if data == -1:
    if num_devices % fsdp:
      raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  if data * fsdp != num_devices:
    raise ConfigError(f"mesh data={data} x fsdp={fsdp} != {num_devices} devices")
  if cfg.data.batch_size % (data * fsdp):
    raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the "
                      f"{data * fsdp} devices of mesh (data={data}, fsdp={fsdp})")
  return data, fsdp


# ---------------------------------------------------------------------- loading and args

def load_config(spec: str) -> ml_collections.ConfigDict:
  """Load `path/to/file.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  if file.suffix != ".py":
    raise ConfigError(f"config file {path!r} is not a Python file (configs are "
                      "experiments/*.py files with get_config(arg))")
  module_spec = importlib.util.spec_from_file_location(f"_pupujepa_cfg_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"config file {path!r} does not parse: {e}") from e
  except Exception as e:  # the file is user code: any error is the file's
    raise ConfigError(f"config file {path!r} fails to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg) function")
  try:
    cfg = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"config file {path!r}: get_config({arg!r}) failed: "
                      f"{type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"config file {path!r}: get_config returned {type(cfg).__name__}, "
                      "not a ConfigDict")
  return cfg


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """Parse a big_vision style argument `a=1,b=x,flag` over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} unknown; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      out[key] = True
    else:
      try:
        out[key] = parse_value(value, default)
      except ValueError as e:
        raise ConfigError(f"config argument {key}: {e}") from e
  return out


def parse_value(text: str, like):
  """Parse override text into the type of the existing value `like`."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("true", "1", "yes")
  if isinstance(like, (tuple, list)):
    items = [x for x in text.strip("()[]").split(",") if x.strip()]
    return tuple(parse_value(x.strip(), like[0] if like else 0.0) for x in items)
  try:
    if isinstance(like, int):
      return int(text)
    if isinstance(like, float):
      return float(text)
  except ValueError:
    raise ValueError(f"expected {type(like).__name__}, got {text!r}") from None
  return text


def format_value(value) -> str:
  """A value as override text that `parse_value` reads back to the same value."""
  if isinstance(value, (tuple, list)):
    return ",".join(format_value(v) for v in value)
  if isinstance(value, float):
    return repr(value)
  return str(value)


def override_args(overrides: dict) -> list[str]:
  """`{"a.b": 1}` -> `["--config.a.b=1"]`: the inverse of `apply_overrides`."""
  return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def apply_overrides(cfg, overrides) -> ml_collections.ConfigDict:
  """Apply `--config.a.b=value` overrides; unknown fields and groups are errors naming them."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ConfigError(f"unrecognised argument {item!r} "
                        "(overrides look like --config.data.batch_size=64)")
    key, value = item[len("--config."):].split("=", 1)
    *groups, leaf = key.split(".")
    node = cfg
    for g in groups:
      if g not in node or not isinstance(node[g], ml_collections.ConfigDict):
        raise ConfigError(f"{key}: unknown config field")
      node = node[g]
    if leaf not in node:
      raise ConfigError(f"{key}: unknown config field")
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f"{key}: is a group of fields; set its fields ({key}.<field>) "
                        "one by one")
    try:
      node[leaf] = parse_value(value, node[leaf])
    except (ValueError, TypeError) as e:
      raise ConfigError(f"{key}: {e}") from e
  return cfg


def flatten(values: dict, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1} (tuples as lists, as JSON holds them)."""
  out = {}
  for key, value in values.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
  return out


def differences(old: dict, new: dict, ignore=RESUMABLE_FIELDS) -> dict:
  """{dotted field: (old, new)} of the fields that differ, except `ignore`d ones."""
  a, b = flatten(old), flatten(new)
  return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
          if k not in ignore and a.get(k, "<absent>") != b.get(k, "<absent>")}


def to_dict(cfg) -> dict:
  """The JSON-able form of a config (what a workdir's config.json holds)."""
  import json
  return json.loads(cfg.to_json())


def from_dict(values: dict) -> ml_collections.ConfigDict:
  """A config from `to_dict` output, with lists back to tuples where the schema has them."""
  if not isinstance(values, dict):
    raise ConfigError(f"a config must be an object of fields, got {type(values).__name__}")
  try:
    cfg = ml_collections.ConfigDict(values)
  except (TypeError, ValueError, KeyError) as e:
    raise ConfigError(f"not a config: {e}") from e
  _restore_tuples(cfg)
  return cfg


def _restore_tuples(node) -> None:
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      _restore_tuples(value)
    elif isinstance(value, list):
      node[key] = tuple(value)
