"""What a trained encoder is: its architecture, and the serving spec a model dir stores.

`Architecture` holds every field needed to rebuild the encoder's parameters and run it,
including the window length: rotary positions are normalised to the token grid, so a
model only sees windows of the length it was trained on. `ServingSpec` adds the
front-end; it is all that inference, export and pictures need (no training config
crosses into serving). Both are frozen dataclasses; `validate` bounds every field before
anything is allocated, so a hostile or mistyped `config.json` is refused with the field
named instead of exhausting memory.
"""
from __future__ import annotations

import dataclasses
import math

from pupujepa_jax import frontend as frontend_lib

POS_EMBEDS = ("rope", "sincos")
# Sanity bounds: far beyond any published model, small enough that a refused value
# cannot make us allocate gigabytes before the tensors are checked.
MAX_WIDTH = 16_384
MAX_DEPTH = 256
MAX_CROP_FRAMES = 16_384      # 164 s at 100 frames/s
MAX_TOKENS = 65_536
SAMPLE_RATE_RANGE = frontend_lib.SAMPLE_RATE_RANGE  # one definition, in the front-end


class SpecError(ValueError):
  """A field of an architecture, front-end or serving spec is invalid; names the field."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The encoder (patch embedding + blocks + final norm); defaults are the released tiny."""
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  patch_time: int = 4          # patch height along time (frames)
  patch_freq: int = 16         # patch width along mel bins
  crop_frames: int = 1024      # window length in frames (10.24 s at 100 frames/s)
  mlp_ratio: float = 4.0       # MLP hidden = mlp_ratio * width (per SwiGLU branch)
  swiglu: bool = True          # released: SwiGLU in every size; False = GELU MLP
  qk_norm: bool = False        # released: no QK-norm (timm's EvaBlock drops the flag)
  k_bias: bool = True          # released: full q/k/v bias; False = EVA's zero key bias
  layer_scale: float = 0.0     # 0 disables layer-scale; else its init value
  pos_embed: str = "rope"      # "rope" (released) or "sincos" (2-D absolute, ablation)
  rope_max_res: float = 224.0  # timm RotaryEmbeddingCat max_res
  rope_linear_bands: bool = False  # released: log-spaced rotary bands

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def grid(self, n_mels: int) -> tuple[int, int]:
    """Token grid (time patches, frequency patches) of one window."""
    return (self.crop_frames // self.patch_time, n_mels // self.patch_freq)

  def validate(self, n_mels: int, prefix: str = "model.") -> None:
    _check_types(self, prefix)
    _check_range(prefix + "width", self.width, 1, MAX_WIDTH)
    _check_range(prefix + "depth", self.depth, 1, MAX_DEPTH)
    _check_range(prefix + "num_heads", self.num_heads, 1, self.width)
    _check_range(prefix + "patch_time", self.patch_time, 1, self.crop_frames)
    _check_range(prefix + "patch_freq", self.patch_freq, 1, n_mels)
    _check_range(prefix + "crop_frames", self.crop_frames, 1, MAX_CROP_FRAMES)
    _check_range(prefix + "mlp_ratio", self.mlp_ratio, 1 / self.width, 64.0)
    _check_range(prefix + "layer_scale", self.layer_scale, 0.0, 1e3)
    _check_range(prefix + "rope_max_res", self.rope_max_res, 1.0, 1e6)
    if self.width % self.num_heads:
      raise SpecError(f"{prefix}width={self.width} is not divisible by "
                      f"{prefix}num_heads={self.num_heads}")
    if self.pos_embed not in POS_EMBEDS:
      raise SpecError(f"{prefix}pos_embed: {self.pos_embed!r} not in {POS_EMBEDS}")
    if self.pos_embed == "rope" and self.head_dim % 4:
      raise SpecError(f"{prefix}: head dim {self.head_dim} must be a multiple of 4 for 2-D "
                      "rotary embeddings")
    if self.pos_embed == "sincos" and self.width % 4:
      raise SpecError(f"{prefix}width={self.width} must be a multiple of 4 for sin-cos "
                      "positions")
    if self.crop_frames % self.patch_time:
      raise SpecError(f"{prefix}crop_frames={self.crop_frames} is not divisible by "
                      f"{prefix}patch_time={self.patch_time}")
    if n_mels % self.patch_freq:
      raise SpecError(f"frontend.n_mels={n_mels} is not divisible by "
                      f"{prefix}patch_freq={self.patch_freq}")
    tokens = math.prod(self.grid(n_mels))
    if tokens > MAX_TOKENS:
      raise SpecError(f"{prefix}: a window of {tokens} tokens exceeds the limit of "
                      f"{MAX_TOKENS}")


def validate_frontend(fe: frontend_lib.FrontendConfig, prefix: str = "frontend.") -> None:
  """Bounds of the front-end fields (the sample rate range is documented in the README)."""
  _check_types(fe, prefix)
  _check_range(prefix + "sample_rate", fe.sample_rate, *SAMPLE_RATE_RANGE)
  _check_range(prefix + "n_fft", fe.n_fft, 16, 65_536)
  _check_range(prefix + "hop", fe.hop, 1, fe.n_fft)
  _check_range(prefix + "n_mels", fe.n_mels, 1, 1024)
  _check_range(prefix + "f_min", fe.f_min, 0.0, fe.sample_rate / 2)
  _check_range(prefix + "f_max", fe.f_max, fe.f_min, fe.sample_rate / 2)
  _check_range(prefix + "norm_std", fe.norm_std, 1e-6, 1e6)
  _check_range(prefix + "norm_mean", fe.norm_mean, -1e6, 1e6)


@dataclasses.dataclass(frozen=True)
class ServingSpec:
  """What a model dir stores besides the weights: the encoder and its front-end."""
  architecture: Architecture = Architecture()
  frontend: frontend_lib.FrontendConfig = frontend_lib.FrontendConfig()

  @property
  def grid(self) -> tuple[int, int]:
    return self.architecture.grid(self.frontend.n_mels)

  @property
  def window_samples(self) -> int:
    return self.frontend.samples_for_frames(self.architecture.crop_frames)

  def validate(self, prefix: str = "") -> "ServingSpec":
    validate_frontend(self.frontend, prefix + "frontend.")
    self.architecture.validate(self.frontend.n_mels, prefix + "architecture.")
    return self

  def to_dict(self) -> dict:
    return {"architecture": dataclasses.asdict(self.architecture),
            "frontend": dataclasses.asdict(self.frontend)}

  @classmethod
  def from_dict(cls, data, source: str = "spec") -> "ServingSpec":
    """Build and validate from `to_dict()` output; unknown or missing fields are errors."""
    if not isinstance(data, dict):
      raise SpecError(f"{source}: expected an object with 'architecture' and 'frontend'")
    parts = {}
    for key, kind in (("architecture", Architecture),
                      ("frontend", frontend_lib.FrontendConfig)):
      parts[key] = from_fields(kind, data.get(key), f"{source}: {key}.")
    return cls(**parts).validate(f"{source}: ")


def from_fields(kind, values, prefix: str):
  """A frozen dataclass of `kind` from a dict, refusing unknown, missing or mistyped fields."""
  if not isinstance(values, dict):
    raise SpecError(f"{prefix.rstrip('.')}: expected an object, got {type(values).__name__}")
  names = {f.name for f in dataclasses.fields(kind)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise SpecError(f"{prefix}{unknown[0]}: unknown field (known: {sorted(names)})")
  missing = sorted(names - set(values))
  if missing:
    raise SpecError(f"{prefix}{missing[0]}: missing field")
  out = kind(**values)
  _check_types(out, prefix)
  return out


def _check_types(obj, prefix: str) -> None:
  """Every field has its declared type (bool is not an int; an int is a valid float)."""
  for field in dataclasses.fields(obj):
    value = getattr(obj, field.name)
    kind = {"int": int, "float": float, "bool": bool, "str": str}[str(field.type)]
    ok = (isinstance(value, bool) if kind is bool else
          (isinstance(value, (int, float)) and not isinstance(value, bool)
           and math.isfinite(value)) if kind is float else
          (isinstance(value, int) and not isinstance(value, bool)) if kind is int else
          isinstance(value, str))
    if not ok:
      raise SpecError(f"{prefix}{field.name}: expected {kind.__name__}, got {value!r}")


def _check_range(name: str, value, low, high) -> None:
  if not low <= value <= high:
    raise SpecError(f"{name}={value} is outside the accepted range [{low}, {high}]")
