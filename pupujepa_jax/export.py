"""The exported-model format: write it from a training workdir or a released PyTorch
checkpoint, and read it back with every file checked.

A model directory holds exactly two files (no pickle anywhere):
  params.safetensors  the teacher encoder (patch embedding, blocks, final norm) under
                      timm EVA names (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`,
                      ...), so exported and released models share one format;
  config.json         {"format_version", "model_id", "model" (cfg.model fields),
                      "frontend" (cfg.frontend fields), "crop_frames", "step",
                      "config_hash" (sha256 of the training config JSON), "source"}.

`read_model_dir` refuses a missing, corrupted, truncated or mismatched directory with a
`ModelDirError` naming the file and the problem. `pupujepa_jax.inference.load` builds
the embedding `Model` on top of it.

`import_torch` accepts the release's `args.json` in any of the spellings listed in
`ARG_ALIASES` (flat or nested in groups); fields it leaves out are read off the weights
(width, depth, MLP kind and ratio, QK-norm, layer-scale; heads from the QK-norm shape or
the variant table). A value in args.json that contradicts the weights is an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re

import jax
import ml_collections
import numpy as np

from pupujepa_jax import config as config_lib
from pupujepa_jax import models
from pupujepa_jax.models import torch_import

FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
# Prefixes of the EMA teacher in released / I-JEPA style checkpoints, in preference order.
TEACHER_PREFIXES = ("target_encoder.", "teacher.", "ema_encoder.", "momentum_encoder.")
# Top-level names of an unprefixed timm EVA encoder state dict.
ENCODER_ROOTS = ("patch_embed", "blocks", "norm")
# args.json spellings accepted for each field (first match wins, searched in nested groups).
ARG_ALIASES = {
    "variant": ("variant", "model", "model_size", "model_name", "arch", "size"),
    "width": ("embed_dim", "width", "hidden_size", "dim"),
    "depth": ("depth", "num_layers", "n_layers"),
    "num_heads": ("num_heads", "heads", "n_heads", "num_attention_heads"),
    "mlp_ratio": ("mlp_ratio",),
    "swiglu": ("swiglu", "use_swiglu", "swiglu_mlp"),
    "qk_norm": ("qk_norm", "use_qk_norm"),
    "layer_scale": ("layer_scale", "init_values", "layer_scale_init", "layer_scale_init_value"),
    "patch_size": ("patch_size", "patch"),
    "patch_time": ("patch_time", "patch_t", "patch_height"),
    "patch_freq": ("patch_freq", "patch_f", "patch_width"),
    "crop_frames": ("crop_frames", "target_length", "num_frames", "n_frames"),
    "n_mels": ("n_mels", "num_mel_bins", "num_mels"),
    "sample_rate": ("sample_rate", "sr", "sampling_rate"),
    "n_fft": ("n_fft",),
    "hop": ("hop", "hop_length", "hop_size"),
    "f_min": ("f_min", "fmin"),
    "f_max": ("f_max", "fmax"),
    "rope_max_res": ("rope_max_res",),
    "rope_linear_bands": ("rope_linear_bands",),
}


class ModelDirError(ValueError):
  """A model directory (or a checkpoint being imported) is unusable; says why."""


@dataclasses.dataclass
class ModelDir:
  """A validated model directory: the run-like config, encoder params and config.json."""
  cfg: ml_collections.ConfigDict
  params: dict
  meta: dict
  path: pathlib.Path


# ------------------------------------------------------------------------------ config

def model_config(model: dict, frontend: dict, crop_frames: int) -> ml_collections.ConfigDict:
  """A full (validated) config with the given architecture, front-end and window length."""
  variant = model.get("variant", "tiny")
  if variant not in config_lib.VARIANTS:
    raise ModelDirError(f"model.variant: unknown variant {variant!r}; "
                        f"known: {sorted(config_lib.VARIANTS)}")
  cfg = config_lib.base_config(variant)
  for group, values in (("model", model), ("frontend", frontend)):
    unknown = sorted(set(values) - set(cfg[group].keys()))
    if unknown:
      raise ModelDirError(f"{group}: unknown fields {unknown}")
    cfg[group].update(values)
  cfg.data.crop_frames = int(crop_frames)
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ModelDirError(str(e)) from e
  return cfg


def config_hash(cfg_json: str) -> str:
  return hashlib.sha256(cfg_json.encode()).hexdigest()


def abstract_encoder(cfg):
  """ShapeDtypeStructs of the encoder params of `cfg` (nothing is allocated)."""
  spec = jax.ShapeDtypeStruct((1, cfg.data.crop_frames, cfg.frontend.n_mels), np.float32)
  return jax.eval_shape(lambda x: models.make_encoder(cfg).init(jax.random.key(0), x),
                        spec)["params"]


def expected_tensors(cfg) -> dict[str, tuple]:
  """timm name -> shape of every tensor `params.safetensors` must hold for `cfg`."""
  # Zero-stride views stand in for the params: the name mapping runs without memory.
  fake = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape),
                      abstract_encoder(cfg))
  flat = torch_import.encoder_to_torch(fake, models.encoder_spec(cfg))
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_tensors(tensors: dict, cfg, source) -> None:
  """Raise ModelDirError naming missing, unexpected or mis-shaped tensors of `source`."""
  expected = expected_tensors(cfg)
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  wrong = [f"{k} has shape {tuple(tensors[k].shape)}, the config expects {shape}"
           for k, shape in expected.items()  # mapping order: patch embedding first
           if k in tensors and tuple(tensors[k].shape) != shape]
  problems = []
  if missing:
    problems.append(f"missing tensors {missing[:6]}" + (" ..." if len(missing) > 6 else ""))
  if unexpected:
    problems.append(f"unexpected tensors {unexpected[:6]}"
                    + (" ..." if len(unexpected) > 6 else ""))
  if wrong:
    problems.append(f"{len(wrong)} tensors of the wrong shape: " + "; ".join(wrong[:3]))
  if problems:
    raise ModelDirError(f"{source} does not match its architecture "
                        f"(width={cfg.model.width}, depth={cfg.model.depth}): "
                        + "; ".join(problems))


# --------------------------------------------------------------------------- write/read

def write_model_dir(out, params: dict, cfg, *, step: int, cfg_hash: str, model_id: str,
                    source: str) -> pathlib.Path:
  """Write encoder `params` of `cfg` as a model directory; returns its path."""
  import safetensors.numpy
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  flat = torch_import.encoder_to_torch(jax.device_get(params), models.encoder_spec(cfg))
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  check_tensors(flat, cfg, "exported params")
  safetensors.numpy.save_file(flat, str(out / PARAMS_FILE))
  meta = {"format_version": FORMAT_VERSION, "model_id": model_id,
          "model": cfg.model.to_dict(), "frontend": cfg.frontend.to_dict(),
          "crop_frames": int(cfg.data.crop_frames), "step": int(step),
          "config_hash": cfg_hash, "source": source}
  (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
  return out


def _read_meta(path: pathlib.Path) -> dict:
  file = path / CONFIG_FILE
  if not file.is_file():
    raise ModelDirError(f"{file}: missing (not a model directory)")
  try:
    meta = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelDirError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise ModelDirError(f"{file}: expected a JSON object")
  for key in ("format_version", "model", "frontend", "crop_frames"):
    if key not in meta:
      raise ModelDirError(f"{file}: missing field {key!r}")
  if meta["format_version"] != FORMAT_VERSION:
    raise ModelDirError(f"{file}: format_version {meta['format_version']!r} is not "
                        f"supported (this code reads {FORMAT_VERSION})")
  return meta


def read_model_dir(path) -> ModelDir:
  """Read and validate a model directory (see module docstring)."""
  import safetensors.numpy
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ModelDirError(f"model directory {path} does not exist")
  meta = _read_meta(path)
  try:
    cfg = model_config(meta["model"], meta["frontend"], meta["crop_frames"])
  except ModelDirError as e:
    raise ModelDirError(f"{path / CONFIG_FILE}: {e}") from e
  file = path / PARAMS_FILE
  if not file.is_file():
    raise ModelDirError(f"{file}: missing")
  try:
    tensors = safetensors.numpy.load_file(str(file))
  except Exception as e:  # safetensors raises its own error type for truncated headers
    raise ModelDirError(f"{file}: unreadable, truncated or not a safetensors file "
                        f"({type(e).__name__}: {e})") from e
  check_tensors(tensors, cfg, f"{file} (with {path / CONFIG_FILE})")
  for name, value in tensors.items():
    if not np.all(np.isfinite(value)):
      raise ModelDirError(f"{file}: tensor {name} holds NaN or Inf")
  params = torch_import.encoder_from_torch(tensors, models.encoder_spec(cfg))
  return ModelDir(cfg=cfg, params=params, meta=meta, path=path)


# ----------------------------------------------------------------------- from a workdir

def read_workdir_config(workdir) -> tuple[ml_collections.ConfigDict, str]:
  """(config, its JSON text) of a training workdir."""
  file = pathlib.Path(workdir) / "config.json"
  if not file.is_file():
    raise ModelDirError(f"{file}: missing (not a training workdir)")
  text = file.read_text()
  try:
    cfg = ml_collections.ConfigDict(json.loads(text))
  except json.JSONDecodeError as e:
    raise ModelDirError(f"{file}: not valid JSON ({e})") from e
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ModelDirError(f"{file}: {e}") from e
  return cfg, text


def restore_state(workdir, step: int | None = None):
  """(config, config JSON, step, full train state) of a workdir checkpoint, on one device."""
  from pupujepa_jax import checkpointing, sharding, train_step
  cfg, text = read_workdir_config(workdir)
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  manager = checkpointing.make_manager(workdir, read_only=True, async_save=False)
  try:
    step, state = checkpointing.restore(manager, train_step.abstract_state(cfg),
                                        train_step.state_shardings(cfg, mesh), step)
  finally:
    manager.close()
  return cfg, text, step, state


def export_workdir(workdir, out, step: int | None = None,
                   model_id: str | None = None) -> dict:
  """Export the teacher of checkpoint `step` (default: latest) of `workdir` to `out`."""
  cfg, text, step, state = restore_state(workdir, step)
  cfg.compute_dtype = "float32"
  model_id = model_id or f"{pathlib.Path(workdir).absolute().name}@{step}"
  write_model_dir(out, state["teacher"], cfg, step=step, cfg_hash=config_hash(text),
                  model_id=model_id, source="workdir")
  read_model_dir(out)  # what was written must read back
  return {"out": str(out), "step": int(step), "model_id": model_id,
          "params": models.count_params(state["teacher"])}


# --------------------------------------------------------------------- from PyTorch

def _flat_args(obj, out=None) -> dict:
  """Leaf values of a (nested) args mapping; the first occurrence of a name wins."""
  out = {} if out is None else out
  nested = []
  for key, value in obj.items():
    if isinstance(value, dict):
      nested.append(value)
    elif key not in out:
      out[key] = value
  for value in nested:
    _flat_args(value, out)
  return out


def parse_release_args(args: dict) -> dict:
  """Our field names -> values from a release args mapping (see ARG_ALIASES)."""
  flat = _flat_args(args)
  found = {}
  for field, aliases in ARG_ALIASES.items():
    for alias in aliases:
      if alias in flat and flat[alias] is not None:
        found[field] = flat[alias]
        break
  if "variant" in found:
    name = str(found["variant"]).lower()
    matches = [v for v in config_lib.VARIANTS if re.search(rf"(^|[^a-z]){v}([^a-z]|$)", name)]
    if len(matches) != 1:
      raise ModelDirError(f"args.json: cannot tell the model variant from "
                          f"{found['variant']!r}; expected one of {sorted(config_lib.VARIANTS)}")
    found["variant"] = matches[0]
  if "patch_size" in found:
    size = found.pop("patch_size")
    size = [size, size] if isinstance(size, int) else list(size)
    found.setdefault("patch_time", size[0])
    found.setdefault("patch_freq", size[1])
  return found


def select_encoder_weights(state: dict, source) -> tuple[dict, str]:
  """(unprefixed teacher tensors, chosen prefix) from a release state dict."""
  marker = "patch_embed.proj.weight"
  prefixes = sorted(k[:-len(marker)] for k in state if k.endswith(marker))
  for prefix in TEACHER_PREFIXES:
    if prefix in prefixes:
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix
  if "" in prefixes:
    return {k: v for k, v in state.items() if k.split(".")[0] in ENCODER_ROOTS}, ""
  tops = sorted({k.split(".")[0] + "." for k in state if "." in k})
  raise ModelDirError(f"{source}: no teacher encoder found; looked for the prefixes "
                      f"{list(TEACHER_PREFIXES)} or unprefixed timm EVA names. Encoder "
                      f"prefixes found: {prefixes or 'none'}; top-level prefixes: {tops[:12]}")


def infer_architecture(tensors: dict, source) -> dict:
  """Architecture fields that the encoder weights determine on their own."""
  try:
    conv = tensors["patch_embed.proj.weight"]
    width = conv.shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
    fc1, fc2 = tensors["blocks.0.mlp.fc1.weight"], tensors["blocks.0.mlp.fc2.weight"]
  except (KeyError, ValueError) as e:
    raise ModelDirError(f"{source}: the encoder weights lack {e} (not a timm EVA "
                        "encoder?)") from e
  hidden = fc2.shape[1]
  arch = {"width": int(width), "depth": int(depth), "patch_time": int(conv.shape[2]),
          "patch_freq": int(conv.shape[3]), "swiglu": bool(fc1.shape[0] == 2 * hidden),
          "mlp_ratio": float(hidden / width),
          "qk_norm": "blocks.0.attn.q_norm.weight" in tensors,
          "layer_scale": 1.0 if "blocks.0.gamma_1" in tensors else 0.0}
  if arch["qk_norm"]:
    arch["num_heads"] = int(width // tensors["blocks.0.attn.q_norm.weight"].shape[0])
  return arch


def release_config(args: dict, tensors: dict, source) -> ml_collections.ConfigDict:
  """Config of a released checkpoint: args.json, completed and checked by the weights."""
  given = parse_release_args(args)
  arch = infer_architecture(tensors, source)
  for field, value in arch.items():
    if field in given and field != "layer_scale" and given[field] != value and not (
        isinstance(value, float) and np.isclose(float(given[field]), value)):
      raise ModelDirError(f"args.json: {field}={given[field]!r} but the weights in "
                          f"{source} have {field}={value!r}")
  if bool(given.get("layer_scale")) != bool(arch["layer_scale"]):
    raise ModelDirError(f"args.json: layer_scale={given.get('layer_scale')!r} but the weights "
                        f"{'have' if arch['layer_scale'] else 'lack'} gamma_1/gamma_2")
  variant = given.get("variant") or next(
      (v for v, s in config_lib.VARIANTS.items() if s["width"] == arch["width"]), None)
  if "num_heads" not in arch and "num_heads" not in given:
    if variant is None or config_lib.VARIANTS[variant]["width"] != arch["width"]:
      raise ModelDirError(f"args.json: unknown architecture (width {arch['width']} matches no "
                          "variant and num_heads is not given); add num_heads")
    arch["num_heads"] = config_lib.VARIANTS[variant]["num_heads"]
  model = {"variant": variant or "tiny", **{k: given[k] for k in ("rope_max_res",
           "rope_linear_bands", "num_heads") if k in given}, **arch}
  if given.get("layer_scale"):
    model["layer_scale"] = float(given["layer_scale"])
  frontend = {k: given[k] for k in ("sample_rate", "n_fft", "hop", "n_mels", "f_min", "f_max")
              if k in given}
  return model_config(model, frontend, given.get("crop_frames", 1024))


def import_torch(weights, args_file, out, model_id: str | None = None) -> dict:
  """Convert a released PupuJEPA checkpoint (safetensors + args.json) to a model dir."""
  import safetensors.numpy
  weights, args_file = pathlib.Path(weights), pathlib.Path(args_file)
  try:
    text = args_file.read_text()
    args = json.loads(text)
  except OSError as e:
    raise ModelDirError(f"{args_file}: cannot read ({e.strerror or e})") from e
  except json.JSONDecodeError as e:
    raise ModelDirError(f"{args_file}: not valid JSON ({e})") from e
  if not isinstance(args, dict):
    raise ModelDirError(f"{args_file}: expected a JSON object")
  if not weights.is_file():
    raise ModelDirError(f"{weights}: missing")
  try:
    state = safetensors.numpy.load_file(str(weights))
  except Exception as e:  # safetensors raises its own error type
    raise ModelDirError(f"{weights}: unreadable or not a safetensors file "
                        f"({type(e).__name__}: {e})") from e
  tensors, prefix = select_encoder_weights(state, weights)
  tensors.pop("rope.pos_embed", None)  # a cached rotary table some timm versions persist
  tensors = {k: v for k, v in tensors.items() if not k.endswith("attn.k_bias")
             or np.any(v)}  # EVA's constant zero k bias carries no information
  cfg = release_config(args, tensors, weights)
  check_tensors(tensors, cfg, f"{weights} (prefix {prefix!r})")
  params = torch_import.encoder_from_torch(tensors, models.encoder_spec(cfg))
  model_id = model_id or weights.stem
  write_model_dir(out, params, cfg, step=int(_flat_args(args).get("step", 0) or 0),
                  cfg_hash=config_hash(text), model_id=model_id, source=f"torch:{prefix}")
  read_model_dir(out)
  return {"out": str(out), "model_id": model_id, "prefix": prefix,
          "model": cfg.model.to_dict(), "crop_frames": cfg.data.crop_frames}
