"""The model-dir format: what an exported (or imported) encoder is on disk.

A model directory holds exactly two files (no pickle anywhere):
  params.safetensors  the released embedding's weights under the release's names:
                      `patch_embed.*` and `teacher.*` (a model dir is the part of a
                      release checkpoint that inference reads);
  config.json         {"format_version": 2, "model_id", "serving": ServingSpec.to_dict()
                       (architecture incl. window length, front-end), "provenance":
                       {"source", "step", "config_hash"}}.

`read_model_dir` checks, in this order and before loading any tensor data: config.json's
size and JSON, every serving-spec field against its type and sane bounds, then the
safetensors header (names, shapes, dtypes) against the architecture; then it loads the
tensors and refuses NaN or Inf. Every refusal is a `ModelDirError` naming the file and
the problem. `write_model_dir` writes into a temporary sibling and renames it into place,
so an interrupted export never leaves a half-written model dir.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from pupujepa_jax import models
from pupujepa_jax.models import release_names

FORMAT_VERSION = 2
PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 1 << 20


class ModelDirError(ValueError):
  """A model directory (or a checkpoint being imported) is unusable; says why."""


@dataclasses.dataclass
class ModelDir:
  """A validated model directory: serving spec, encoder params and config.json."""
  spec: models.ServingSpec
  params: dict           # {"patch_embed", "blocks", "norm"}
  meta: dict
  path: pathlib.Path


def config_hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def expected_tensors(spec: models.ServingSpec) -> dict[str, tuple]:
  """Release name -> shape of every tensor `params.safetensors` must hold for `spec`."""
  shapes = jax.eval_shape(lambda k: models.init_encoder(spec.architecture,
                                                        spec.frontend.n_mels, k),
                          jax.random.key(0))
  # Zero-stride views stand in for the params: the name mapping runs without memory.
  fake = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), shapes)
  return {k: tuple(v.shape) for k, v in release_names.model_dir_to_release(fake).items()}


def tensor_problems(expected: dict, shapes: dict, expected_by: str,
                    ignore=lambda name: False) -> list[str]:
  """What is wrong with a checkpoint's {name: shape} against the `expected` one: missing,
  unexpected (unless `ignore(name)`) and mis-shaped tensors, a few of each named."""
  def few(names):
    return f"{names[:6]}" + (" ..." if len(names) > 6 else "")
  missing = sorted(set(expected) - set(shapes))
  unexpected = sorted(n for n in set(shapes) - set(expected) if not ignore(n))
  wrong = [f"{k} has shape {tuple(shapes[k])}, {expected_by} {shape}"
           for k, shape in expected.items() if k in shapes and tuple(shapes[k]) != shape]
  return ([f"missing tensors {few(missing)}"] if missing else []) + (
      [f"unexpected tensors {few(unexpected)}"] if unexpected else []) + (
      [f"{len(wrong)} tensors of the wrong shape: " + "; ".join(wrong[:3])] if wrong else [])


def check_tensors(shapes: dict, spec: models.ServingSpec, source) -> None:
  """Raise ModelDirError naming missing, unexpected or mis-shaped tensors of `source`.

  `shapes` maps names to shapes (from a safetensors header, before any data is read).
  """
  problems = tensor_problems(expected_tensors(spec), shapes, "the config expects")
  if problems:
    arch = spec.architecture
    raise ModelDirError(f"{source} does not match its architecture (width={arch.width}, "
                        f"depth={arch.depth}): " + "; ".join(problems))


def read_safetensors_header(file: pathlib.Path) -> dict[str, tuple]:
  """{name: shape} from a safetensors file's header, reading no tensor data."""
  from safetensors import safe_open
  try:
    with safe_open(str(file), framework="numpy") as f:
      shapes = {}
      for name in f.keys():
        sl = f.get_slice(name)
        if sl.get_dtype() not in ("F32", "F16", "BF16"):
          raise ModelDirError(f"{file}: tensor {name} has dtype {sl.get_dtype()}, expected "
                              "floating point")
        shapes[name] = tuple(sl.get_shape())
      return shapes
  except ModelDirError:
    raise
  except Exception as e:  # safetensors raises its own error types for damaged headers
    raise ModelDirError(f"{file}: unreadable, truncated or not a safetensors file "
                        f"({type(e).__name__}: {e})") from e


def load_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  import safetensors.numpy
  try:
    tensors = safetensors.numpy.load_file(str(file))
  except Exception as e:  # truncated data after a valid header
    raise ModelDirError(f"{file}: unreadable, truncated or not a safetensors file "
                        f"({type(e).__name__}: {e})") from e
  for name, value in tensors.items():
    if not np.all(np.isfinite(value)):
      raise ModelDirError(f"{file}: tensor {name} holds NaN or Inf")
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


# --------------------------------------------------------------------------- write/read

def write_model_dir(out, params: dict, spec: models.ServingSpec, *, model_id: str,
                    source: str, step: int = 0, cfg_hash: str | None = None) -> pathlib.Path:
  """Write encoder `params` {"patch_embed", "blocks", "norm"} as a model directory.

  An existing directory is replaced only once the new one is complete.
  """
  import safetensors.numpy
  out = pathlib.Path(out)
  spec.validate()
  flat = release_names.model_dir_to_release(jax.device_get(params))
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  check_tensors({k: v.shape for k, v in flat.items()}, spec, "exported params")
  meta = {"format_version": FORMAT_VERSION, "model_id": model_id,
          "serving": spec.to_dict(),
          "provenance": {"source": source, "step": int(step), "config_hash": cfg_hash}}
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    safetensors.numpy.save_file(flat, str(tmp / PARAMS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
      if not (out / CONFIG_FILE).is_file() and any(out.iterdir()):
        raise ModelDirError(f"{out} exists and is not a model directory; refusing to "
                            "replace it")
      old = out.with_name(f".{out.name}.old")
      shutil.rmtree(old, ignore_errors=True)
      out.rename(old)
      tmp.rename(out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def read_meta(path: pathlib.Path) -> tuple[dict, models.ServingSpec]:
  """(config.json, its validated serving spec) of a model dir; refuses before allocating."""
  file = path / CONFIG_FILE
  if not file.is_file():
    raise ModelDirError(f"{file}: missing (not a model directory)")
  if file.stat().st_size > MAX_CONFIG_BYTES:
    raise ModelDirError(f"{file}: {file.stat().st_size} bytes is too large for a model config")
  try:
    meta = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelDirError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(meta, dict):
    raise ModelDirError(f"{file}: expected a JSON object")
  version = meta.get("format_version")
  if version != FORMAT_VERSION:
    raise ModelDirError(f"{file}: format_version {version!r} is not supported (this code "
                        f"reads {FORMAT_VERSION}; re-export the model with this version)")
  try:
    spec = models.ServingSpec.from_dict(meta.get("serving"), "serving")
  except (models.SpecError, TypeError) as e:
    raise ModelDirError(f"{file}: {e}") from e
  return meta, spec


def read_model_dir(path) -> ModelDir:
  """Read and validate a model directory (see module docstring)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise ModelDirError(f"model directory {path} does not exist")
  meta, spec = read_meta(path)
  file = path / PARAMS_FILE
  if not file.is_file():
    raise ModelDirError(f"{file}: missing")
  check_tensors(read_safetensors_header(file), spec, f"{file} (with {path / CONFIG_FILE})")
  params = release_names.model_dir_from_release(load_safetensors(file), spec.architecture)
  return ModelDir(spec=spec, params=params, meta=meta, path=path)


# ----------------------------------------------------------------------- from a workdir

def export_workdir(workdir, out, step: int | None = None,
                   model_id: str | None = None) -> dict:
  """Export the released embedding (patch embedding + teacher) of checkpoint `step`."""
  from pupujepa_jax import config as config_lib
  from pupujepa_jax import workdir as workdir_lib
  cfg, text, step, state = workdir_lib.restore(workdir, step)
  model_id = model_id or f"{pathlib.Path(workdir).absolute().name}@{step}"
  encoder = models.encoder_params(state["params"], state["teacher"])
  write_model_dir(out, encoder, config_lib.serving_spec(cfg), model_id=model_id,
                  source="workdir", step=step, cfg_hash=config_hash(text))
  read_model_dir(out)  # what was written must read back
  return {"out": str(out), "step": int(step), "model_id": model_id,
          "params": models.count_params(encoder)}
