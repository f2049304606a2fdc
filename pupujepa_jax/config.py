"""The config schema: every field a run can set, its default, and validation.

Experiment files in `experiments/` start from `base_config()` and change fields; nothing
may add a key the schema does not know (a typo would otherwise be silently ignored).
`validate(config)` is called before anything compiles and names the offending field.
Fields marked "(unknown)" are not given by the release; the default is ours and an
ablation in `experiments/ablations/` covers it.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import ml_collections

# Width, depth, heads of each encoder variant (SPEC section 3).
VARIANTS = {
    "tiny": dict(width=192, depth=12, num_heads=3),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": dict(width=768, depth=12, num_heads=12),
    "large": dict(width=1024, depth=24, num_heads=16),
    "huge": dict(width=1280, depth=32, num_heads=16),
}
# Predictor width, depth, heads per variant (unknown; our defaults).
PREDICTOR_DEFAULTS = {
    "tiny": dict(width=384, depth=6, num_heads=6),
    "small": dict(width=384, depth=6, num_heads=6),
    "base": dict(width=512, depth=8, num_heads=16),
    "large": dict(width=512, depth=8, num_heads=16),
    "huge": dict(width=512, depth=8, num_heads=16),
}
MASK_STRATEGIES = ("random", "block", "time_frequency", "multiblock")
TEACHER_MODES = ("targets_only", "full_grid")
LOSSES = ("smooth_l1", "normalized_mse", "mse")
POS_EMBEDS = ("rope", "sincos")
DTYPES = ("float32", "bfloat16")


def model_config(variant: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """Encoder architecture for a named variant."""
  if variant not in VARIANTS:
    raise ValueError(f"model.variant: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  cfg = ml_collections.ConfigDict(dict(
      variant=variant,
      **VARIANTS[variant],
      patch_time=4,           # patch height along time (frames)
      patch_freq=16,          # patch width along mel bins
      mlp_ratio=4.0,          # MLP hidden = mlp_ratio * width (per SwiGLU branch too)
      swiglu=variant == "tiny",   # the released tiny uses SwiGLU and QK-norm
      qk_norm=variant == "tiny",
      layer_scale=0.0,        # 0 disables layer-scale; else its init value
      drop_path=0.0,          # stochastic depth rate at the last block (linear in depth)
      pos_embed="rope",       # "rope" (released) or "sincos" (2-D absolute, ablation)
      rope_max_res=224.0,     # timm RotaryEmbeddingCat(in_pixels=True) max_res (unknown)
      rope_linear_bands=True, # linearly spaced rotary frequency bands (SPEC section 3)
  ))
  cfg.update(overrides)
  return cfg


def base_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """The full schema with the released defaults for `variant`."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 500_000
  c.model = model_config(variant)
  c.predictor = ml_collections.ConfigDict(dict(
      **PREDICTOR_DEFAULTS[variant],
      # Blocks in the predictor follow the encoder's flags (swiglu, qk_norm, ...).
  ))
  c.teacher_mode = "targets_only"
  c.loss = "smooth_l1"         # (unknown) I-JEPA's choice
  c.frontend = ml_collections.ConfigDict(dict(
      sample_rate=24_000, n_fft=1024, hop=240, n_mels=128, f_min=0.0, f_max=12_000.0))
  c.data = ml_collections.ConfigDict(dict(
      source="tfds",           # "tfds" (ArrayRecord from ingest / builders) or "folder"
      path="",                 # dataset dir (tfds) or audio folder (folder)
      crop_frames=1024,        # 10.24 s at 100 frames/s
      batch_size=256,          # global batch
      num_workers=2,           # Grain worker processes per host (0 = in process)
      short_policy="loop",     # tracks shorter than a crop: "loop" or "pad"
      prefetch_buffer=2,
  ))
  c.mask = ml_collections.ConfigDict(dict(
      ratio=0.8,               # targets = floor(ratio * L)
      probs=(0.4, 0.3, 0.3),   # (unknown) final [random, block, time_frequency]
      warmup_start=10_000,     # (unknown) before: random only
      warmup_end=50_000,       # (unknown) block/tf probabilities ramp up to here
      strategy="",             # non-empty: always this strategy (ablations, `masks`)
      max_attempts=150,
      block_scale=(0.01, 0.05),
      stripe_max_time=40,
  ))
  c.optim = ml_collections.ConfigDict(dict(
      lr=1.5e-4,               # peak learning rate (unknown)
      min_lr=1e-6,
      warmup_steps=10_000,
      b1=0.9,
      b2=0.999,
      weight_decay=(0.04, 0.4),  # cosine schedule start -> end
      ema=(0.996, 1.0),          # linear momentum schedule start -> end
      grad_clip=0.0,             # 0 disables global-norm clipping
  ))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  c.compute_dtype = "float32"
  c.remat = False
  c.log_every = 50
  c.checkpoint = ml_collections.ConfigDict(dict(every=5000, keep=3, keep_period=50_000))
  return c


def frontend_from_config(cfg):
  """The `FrontendConfig` a run's config describes."""
  from pupujepa_jax import frontend
  return frontend.FrontendConfig(**dict(cfg.frontend))


def grid_shape(cfg) -> tuple[int, int]:
  """Token grid (time patches, frequency patches) for the run's crop."""
  return (cfg.data.crop_frames // cfg.model.patch_time,
          cfg.frontend.n_mels // cfg.model.patch_freq)


class ConfigError(ValueError):
  """A config field has a wrong name, value or combination."""


def _check_keys(cfg, schema, prefix=""):
  for key in cfg.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"{name}: unknown config field (known here: {sorted(schema.keys())})")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        raise ConfigError(f"{name}: expected a group of fields, got {cfg[key]!r}")
      _check_keys(cfg[key], schema[key], name + ".")
  for key in schema.keys():
    if key not in cfg:
      raise ConfigError(f"{prefix}{key}: missing config field")


def validate(cfg, num_devices: int | None = None) -> None:
  """Raise ConfigError naming the field if `cfg` is unknown, impossible or inconsistent."""
  _check_keys(cfg, base_config())
  m, p, d = cfg.model, cfg.predictor, cfg.data
  if m.variant not in VARIANTS:
    raise ConfigError(f"model.variant: unknown variant {m.variant!r}; known: {sorted(VARIANTS)}")
  if d.crop_frames % m.patch_time:
    raise ConfigError(f"data.crop_frames={d.crop_frames} is not divisible by "
                      f"model.patch_time={m.patch_time}")
  if cfg.frontend.n_mels % m.patch_freq:
    raise ConfigError(f"frontend.n_mels={cfg.frontend.n_mels} is not divisible by "
                      f"model.patch_freq={m.patch_freq}")
  for name, group in (("model", m), ("predictor", p)):
    if group.width % group.num_heads:
      raise ConfigError(f"{name}.width={group.width} is not divisible by "
                        f"{name}.num_heads={group.num_heads}")
    if m.pos_embed == "rope" and (group.width // group.num_heads) % 4:
      raise ConfigError(f"{name}: head dim {group.width // group.num_heads} must be a "
                        "multiple of 4 for 2-D rotary embeddings")
  if m.pos_embed not in POS_EMBEDS:
    raise ConfigError(f"model.pos_embed: {m.pos_embed!r} not in {POS_EMBEDS}")
  if cfg.teacher_mode not in TEACHER_MODES:
    raise ConfigError(f"teacher_mode: {cfg.teacher_mode!r} not in {TEACHER_MODES}")
  if cfg.loss not in LOSSES:
    raise ConfigError(f"loss: {cfg.loss!r} not in {LOSSES}")
  if cfg.compute_dtype not in DTYPES:
    raise ConfigError(f"compute_dtype: {cfg.compute_dtype!r} not in {DTYPES}")
  mk = cfg.mask
  if mk.strategy and mk.strategy not in MASK_STRATEGIES:
    raise ConfigError(f"mask.strategy: unknown strategy {mk.strategy!r}; "
                      f"known: {MASK_STRATEGIES}")
  if len(mk.probs) != 3 or any(x < 0 for x in mk.probs) or not math.isclose(sum(mk.probs), 1.0):
    raise ConfigError(f"mask.probs={tuple(mk.probs)} must be 3 non-negative numbers summing "
                      "to 1 ([random, block, time_frequency])")
  if not 0.0 < mk.ratio < 1.0:
    raise ConfigError(f"mask.ratio={mk.ratio} must be in (0, 1)")
  if mk.warmup_end < mk.warmup_start:
    raise ConfigError(f"mask.warmup_end={mk.warmup_end} < mask.warmup_start={mk.warmup_start}")
  h, w = grid_shape(cfg)
  n_targets = int(math.floor(mk.ratio * h * w))
  if n_targets < 1 or n_targets >= h * w:
    raise ConfigError(f"mask.ratio={mk.ratio} leaves no context or no targets on a "
                      f"{h}x{w} grid")
  if d.short_policy not in ("loop", "pad"):
    raise ConfigError(f"data.short_policy: {d.short_policy!r} not in ('loop', 'pad')")
  if d.source not in ("tfds", "folder"):
    raise ConfigError(f"data.source: {d.source!r} not in ('tfds', 'folder')")
  if cfg.optim.warmup_steps > cfg.total_steps:
    raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds "
                      f"total_steps={cfg.total_steps}")
  if num_devices is not None:
    mesh_shape(cfg, num_devices)  # raises on a mesh that does not fit


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


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Load `path/to/file.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_pupujepa_cfg_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg) function")
  return module.get_config(arg) if arg else module.get_config()


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
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out
