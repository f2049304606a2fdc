"""The released PyTorch checkpoint layout, both ways: `model.safetensors` + `args.json`.

A release checkpoint is one `model.safetensors` holding the whole `PupuJEPA` state dict
(`patch_embed.*`, `student.*`, `teacher.*`, `predictor.*`; names in
`models.release_names`) next to an `args.json` written with trailing commas (JSON5,
read with the `json5` package) and grouped into `preprocess`, `model` and `train`.

- `import_release` turns one into a model dir for embedding (patch embedding + teacher)
  and/or, with `workdir`, a training workdir at step 0 (student, predictor, teacher and a
  fresh optimizer state) from which `pupujepa train --workdir` continues pretraining or
  fine-tunes.
- `export_release` writes a training workdir's checkpoint in the same layout, so a model
  trained here loads in the release's code and in the ports that read it.

Everything is checked before anything is written: args that ask for a front-end, token
order, norm or input other than the released ones, missing or extra tensors, and shapes
that disagree with args.json are refused with the culprit named.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from pupujepa_jax import config as config_lib
from pupujepa_jax import export, frontend as frontend_lib, models
from pupujepa_jax.models import release_names

WEIGHTS_FILE = "model.safetensors"
ARGS_FILE = "args.json"
GROUPS = ("preprocess", "model", "train")
# args.json `preprocess` keys -> FrontendConfig fields (first spelling is the one written).
PREPROCESS_KEYS = {
    "sample_rate": ("sample_rate", "sr"),
    "n_fft": ("n_fft", "win_length"),
    "hop": ("hop_length", "hop", "hop_size"),
    "n_mels": ("n_mels", "num_mels"),
    "f_min": ("f_min", "fmin"),
    "f_max": ("f_max", "fmax"),
    "norm_mean": ("norm_mean", "mean"),
    "norm_std": ("norm_std", "std"),
}


class ReleaseError(export.ModelDirError):
  """A release checkpoint (or its args.json) cannot be used; names the culprit."""


# ----------------------------------------------------------------------------- args.json

def read_args(file) -> dict:
  """The grouped args of a release `args.json` (JSON with trailing commas)."""
  import json5
  file = pathlib.Path(file)
  try:
    args = json5.loads(file.read_text())
  except OSError as e:
    raise ReleaseError(f"{file}: cannot read ({e.strerror or e})") from e
  except ValueError as e:
    raise ReleaseError(f"{file}: not valid JSON5/JSON ({e})") from e
  if not isinstance(args, dict) or not isinstance(args.get("model"), dict):
    raise ReleaseError(f"{file}: expected an object with a 'model' group (and "
                       f"'preprocess', 'train'), got keys {sorted(args)[:8] if isinstance(args, dict) else type(args).__name__}")
  for group in GROUPS:
    if not isinstance(args.get(group, {}), dict):
      raise ReleaseError(f"{file}: '{group}' must be an object")
  return args


def _pair(value, name, source):
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int)
                                                                   for v in value):
    return tuple(value)
  raise ReleaseError(f"{source}: model.{name}={value!r} must be an int or [int, int]")


def config_from_args(args: dict, source="args.json"):
  """A validated training config for the architecture and recipe of release `args`."""
  m, pre, train = args["model"], args.get("preprocess", {}), args.get("train", {})

  def need(key):
    if key not in m:
      raise ReleaseError(f"{source}: model.{key} is missing")
    return m[key]

  refusals = {"in_chans": 1, "frequency_first": False, "norm_layer": "layer"}
  for key, released in refusals.items():
    if m.get(key, released) != released:
      raise ReleaseError(f"{source}: model.{key}={m[key]!r} is not supported (the released "
                         f"models use {released!r})")
  fe = frontend_lib.FrontendConfig()
  for field, keys in PREPROCESS_KEYS.items():
    given = next((pre[k] for k in keys if k in pre), None)
    if given is not None and not np.isclose(float(given), float(getattr(fe, field))):
      raise ReleaseError(f"{source}: preprocess.{next(k for k in keys if k in pre)}={given!r} "
                         f"asks for a front-end other than the released one "
                         f"({field}={getattr(fe, field)!r})")
  width, depth, heads = int(need("embed_dim")), int(need("depth")), int(need("num_heads"))
  patch = _pair(m.get("patch_size", (4, 16)), "patch_size", source)
  image = _pair(m.get("image_size", (1024, fe.n_mels)), "image_size", source)
  if image[1] != fe.n_mels:
    raise ReleaseError(f"{source}: model.image_size={list(image)} has {image[1]} mel bins; "
                       f"the released front-end has {fe.n_mels}")
  variant = next((v for v, s in config_lib.VARIANTS.items()
                  if (s["width"], s["depth"], s["num_heads"]) == (width, depth, heads)), "tiny")
  cfg = config_lib.base_config(variant)
  layer_scale = m.get("layer_scale_init_value")
  # timm's EvaBlock swallows qk_norm: a released model never has q/k norms, whatever
  # args.json says, so the flag is not carried over.
  cfg.model.update(width=width, depth=depth, num_heads=heads, patch_time=patch[0],
                   patch_freq=patch[1], crop_frames=image[0],
                   mlp_ratio=float(m.get("mlp_ratio", 4.0)),
                   swiglu=bool(m.get("use_swiglu", True)), qk_norm=False, k_bias=True,
                   layer_scale=float(layer_scale or 0.0),
                   drop_path=float(m.get("drop_path_rate", 0.0)))
  for ours, theirs in (("width", "decoder_embed_dim"), ("depth", "decoder_depth"),
                       ("num_heads", "decoder_num_heads")):
    if theirs in m:
      cfg.predictor[ours] = int(m[theirs])
  if "mask_ratio" in m:
    cfg.mask.ratio = float(m["mask_ratio"])
  if "mask_probs" in m:
    probs = tuple(float(p) for p in m["mask_probs"])
    cfg.mask.probs = probs + (0.0,) * (len(cfg.mask.probs) - len(probs))
  for key in ("mask_warmup_start", "mask_warmup_end"):
    if key in m:
      cfg.mask[key.replace("mask_", "")] = int(m[key])
  for ours, theirs in (("lr", "lr"), ("min_lr", "min_lr"), ("warmup_steps", "warmup_steps")):
    if theirs in train:
      cfg.optim[ours] = type(cfg.optim[ours])(train[theirs])
  if "batch_size" in train:
    cfg.data.batch_size = int(train["batch_size"])
  if "total_steps" in train:
    cfg.total_steps = int(train["total_steps"])
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ReleaseError(f"{source}: {e}") from e
  return cfg


def args_from_config(cfg) -> dict:
  """The grouped release args of a config (what `config_from_args` reads back)."""
  m, p, fe = cfg.model, cfg.predictor, config_lib.frontend(cfg)
  preprocess = {keys[0]: getattr(fe, field) for field, keys in PREPROCESS_KEYS.items()}
  preprocess["win_length"] = fe.n_fft
  model = {"embed_dim": m.width, "depth": m.depth, "num_heads": m.num_heads,
           "mlp_ratio": m.mlp_ratio, "patch_size": [m.patch_time, m.patch_freq],
           "image_size": [m.crop_frames, fe.n_mels], "in_chans": 1,
           "frequency_first": False, "norm_layer": "layer", "use_swiglu": m.swiglu,
           "qk_norm": False, "layer_scale_init_value": m.layer_scale or None,
           "drop_path_rate": m.drop_path, "drop_path_uniform": False,
           "decoder_embed_dim": p.width, "decoder_depth": p.depth,
           "decoder_num_heads": p.num_heads, "mask_ratio": cfg.mask.ratio,
           "mask_probs": list(cfg.mask.probs[:3]),
           "mask_warmup_start": cfg.mask.warmup_start,
           "mask_warmup_end": cfg.mask.warmup_end}
  train = {"lr": cfg.optim.lr, "min_lr": cfg.optim.min_lr,
           "warmup_steps": cfg.optim.warmup_steps, "batch_size": cfg.data.batch_size,
           "total_steps": cfg.total_steps, "grad_checkpointing_step": None}
  return {"preprocess": preprocess, "model": model, "train": train}


def _check_exportable(cfg) -> None:
  """The options the release's code cannot express."""
  m = cfg.model
  problems = [f"{name}={value!r}" for name, value, released in (
      ("model.qk_norm", m.qk_norm, False), ("model.k_bias", m.k_bias, True),
      ("model.pos_embed", m.pos_embed, "rope"),
      ("model.rope_linear_bands", m.rope_linear_bands, False),
      ("model.rope_max_res", m.rope_max_res, 224.0),
      ("teacher_patch_embed", cfg.teacher_patch_embed, "shared"),
      ("frontend", config_lib.frontend(cfg), frontend_lib.FrontendConfig()))
      if value != released]
  if cfg.mask.probs[3]:
    problems.append(f"mask.probs={tuple(cfg.mask.probs)} (multiblock)")
  if problems:
    raise ReleaseError("the release's code cannot build this run's model: "
                       + ", ".join(problems))


# --------------------------------------------------------------------------- weights

def _groups(names) -> set[str]:
  return {n.split(".")[0] for n in names}


def _expected(cfg, groups) -> dict[str, tuple]:
  """Release name -> shape for the `groups` of cfg's model (nothing allocated)."""
  from pupujepa_jax import train_step
  abstract = train_step.abstract_state(cfg)
  fake = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape),
                      {"params": abstract["params"], "teacher": abstract["teacher"]})
  flat = release_names.training_to_release(fake["params"], fake["teacher"])
  return {k: tuple(v.shape) for k, v in flat.items() if k.split(".")[0] in groups}


def _check_weights(header: dict, cfg, groups, source) -> None:
  other_groups = set(release_names.RELEASE_GROUPS) - set(groups)
  problems = export.tensor_problems(_expected(cfg, groups), header, "args.json implies",
                                    ignore=lambda name: name.split(".")[0] in other_groups)
  if problems:
    raise ReleaseError(f"{source}: " + "; ".join(problems))


def import_release(weights, args_file, out=None, workdir=None,
                   model_id: str | None = None) -> dict:
  """Convert a release checkpoint into a model dir (`out`) and/or a workdir (`workdir`)."""
  from pupujepa_jax import checkpointing, optim, workdir as workdir_lib
  if out is None and workdir is None:
    raise ReleaseError("give --out (a model dir for embedding) and/or --workdir (a training "
                       "state to continue from)")
  weights, args_file = pathlib.Path(weights), pathlib.Path(args_file)
  args = read_args(args_file)
  cfg = config_from_args(args, args_file)
  if not weights.is_file():
    raise ReleaseError(f"{weights}: missing")
  header = export.read_safetensors_header(weights)
  present = _groups(header)
  model_groups = ("patch_embed", "teacher")
  if out is not None and not set(model_groups) <= present:
    raise ReleaseError(f"{weights}: a model dir needs {list(model_groups)}; the file holds "
                       f"only {sorted(present)}")
  if workdir is not None and not set(release_names.RELEASE_GROUPS) <= present:
    raise ReleaseError(f"{weights}: continuing training needs "
                       f"{list(release_names.RELEASE_GROUPS)}; the file lacks "
                       f"{sorted(set(release_names.RELEASE_GROUPS) - present)}")
  groups = release_names.RELEASE_GROUPS if workdir is not None else model_groups
  _check_weights(header, cfg, groups, weights)
  tensors = export.load_safetensors(weights)
  model_id = model_id or weights.parent.name or weights.stem
  result = {"model_id": model_id, "model": dataclasses.asdict(config_lib.architecture(cfg)),
            "predictor": cfg.predictor.to_dict()}
  text = args_file.read_text()
  if workdir is not None:
    with workdir_lib.exclusive(workdir):  # No trainer may start on it mid-import.
      if workdir_lib.holds_run(workdir):
        raise ReleaseError(f"{workdir} already holds a run; import into a new workdir")
      params, teacher = release_names.training_from_release(
          {k: v for k, v in tensors.items() if k.split(".")[0] in groups},
          config_lib.architecture(cfg), config_lib.predictor_size(cfg))
      state = {"step": np.int32(0), "params": params, "teacher": teacher,
               "opt_state": optim.make_optimizer(cfg).init(params)}
      checkpointing.save_state(workdir, 0, state)
      workdir_lib.write_run_files(cfg, workdir, imported_from=str(weights.absolute()),
                                  args_sha256=export.config_hash(text))
    result["workdir"] = str(workdir)
  if out is not None:
    encoder = release_names.model_dir_from_release(tensors, config_lib.architecture(cfg))
    export.write_model_dir(out, encoder, config_lib.serving_spec(cfg), model_id=model_id,
                           source=f"release:{weights.name}",
                           step=int(args.get("train", {}).get("step", 0) or 0),
                           cfg_hash=export.config_hash(text))
    export.read_model_dir(out)
    result["out"] = str(out)
  return result


def export_release(workdir, out, step: int | None = None) -> dict:
  """Write checkpoint `step` (default latest) of a workdir as a release checkpoint."""
  import safetensors.numpy
  from pupujepa_jax import workdir as workdir_lib
  cfg, _, step, state = workdir_lib.restore(workdir, step)
  _check_exportable(cfg)
  flat = release_names.training_to_release(jax.device_get(state["params"]),
                                           jax.device_get(state["teacher"]))
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  args = args_from_config(cfg)
  args["train"]["step"] = int(step)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".release.", dir=out))
  try:
    safetensors.numpy.save_file(flat, str(tmp / WEIGHTS_FILE))
    (tmp / ARGS_FILE).write_text(json.dumps(args, indent=2))
    for name in (WEIGHTS_FILE, ARGS_FILE):
      (tmp / name).replace(out / name)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return {"out": str(out), "step": int(step), "tensors": len(flat)}
