"""The feature-folder layout (SPEC section 6, MARBLE-compatible): one module for every
writer (`inference.embed_folder`, `baselines`) and the reader (`probe`).

    <folder>/<relpath>.npy   float32 [L + 1, n_chunks, D] of the audio file <relpath>
    <folder>/meta.json       what the features are (D, L, readout, model_id, ...) and
                             `files`: the relpaths whose .npy belong to these features

Only the files `meta.json` lists are features of that model: a folder may hold other
`.npy` files (left by an interrupted run, or by the user) and readers ignore them.
Writers call `open_folder` first: it refuses a folder holding another model's features
unless asked to overwrite, and then removes only the files the old `meta.json` lists.
`meta.json` is removed while a folder is rewritten and written last, so an interrupted
run leaves no `meta.json` rather than one describing a mix. Every file is written
atomically (a temporary file, then a rename).

NumPy only (no JAX): the baselines write this layout without a model.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

META_FILE = "meta.json"
SUFFIX = ".npy"
# The meta.json fields that decide what the features are: features differing in any of
# them must not share a folder.
IDENTITY_KEYS = ("model_id", "config_hash", "step", "readout", "layers", "window_seconds",
                 "hop_seconds", "short_policy", "sample_rate")


def feature_file(folder, relpath) -> pathlib.Path:
  """Where the features of audio file `relpath` (relative to the input root) live."""
  return pathlib.Path(folder) / (str(relpath) + SUFFIX)


def _atomic_write(target: pathlib.Path, write) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, target)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_features(folder, relpath, features: np.ndarray) -> pathlib.Path:
  """Writes float32 [L + 1, n_chunks, D] features of `relpath` atomically."""
  features = np.asarray(features, np.float32)
  if features.ndim != 3:
    raise ValueError(f"features of {relpath} must be [L + 1, n_chunks, D], got "
                     f"{features.shape}")
  target = feature_file(folder, relpath)
  _atomic_write(target, lambda f: np.save(f, features))
  return target


def write_meta(folder, meta: dict) -> pathlib.Path:
  """Writes `meta.json` atomically; `meta["files"]` must list the features' relpaths."""
  if not isinstance(meta.get("files"), list):
    raise ValueError("meta.json must list the feature files it describes under 'files'")
  target = pathlib.Path(folder) / META_FILE
  _atomic_write(target, lambda f: f.write(json.dumps(meta, indent=2).encode()))
  return target


def read_meta(folder) -> dict | None:
  """The folder's meta.json (None when it has none); ValueError naming it if unreadable."""
  path = pathlib.Path(folder) / META_FILE
  if not path.is_file():
    return None
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read ({e}); remove it to reuse the folder") from e
  if not isinstance(meta, dict):
    raise ValueError(f"{path}: expected a JSON object; remove it to reuse the folder")
  return meta


def identity(meta: dict) -> dict:
  """The fields of `meta` that decide what its features are (see IDENTITY_KEYS)."""
  return {k: meta.get(k) for k in IDENTITY_KEYS}


def describe(meta: dict) -> str:
  """A short human description of whose features `meta` describes."""
  details = ", ".join(f"{k} {meta[k]}" for k in IDENTITY_KEYS[1:] if meta.get(k) is not None)
  return f"model {meta.get('model_id')!r}" + (f" ({details})" if details else "")


def listed_files(meta: dict) -> list[str]:
  """The relpaths whose features belong to `meta` (its `files`)."""
  files = meta.get("files")
  return [str(f) for f in files] if isinstance(files, list) else []


def open_folder(folder, meta: dict, overwrite: bool = False) -> None:
  """Makes `folder` ready for features described by `meta` (its identity fields).

  A folder holding features of another model (or readout, layers, hop ...) is refused,
  naming that model, unless `overwrite`; then the files its meta.json lists are removed,
  and nothing else. Features of the same model stay (a writer may reuse them). In every
  case the old meta.json is removed, so readers see no features until `write_meta`.
  """
  folder = pathlib.Path(folder)
  old = read_meta(folder)
  if old is not None:
    if identity(old) != identity(meta):
      if not overwrite:
        raise ValueError(f"{folder} holds features of {describe(old)}, not of "
                         f"{describe(meta)}; pass --overwrite (overwrite=True) to replace "
                         "them")
      (folder / META_FILE).unlink()
      for relpath in listed_files(old):
        feature_file(folder, relpath).unlink(missing_ok=True)
    else:
      (folder / META_FILE).unlink()
  folder.mkdir(parents=True, exist_ok=True)


def read_features(folder, relpath, meta: dict) -> np.ndarray:
  """The [L + 1, n_chunks > 0, D] features of `relpath`, which `meta` must list.

  Raises ValueError naming the file when it is not listed, missing, of another shape,
  or holds NaN/Inf.
  """
  path = feature_file(folder, relpath)
  if relpath not in set(listed_files(meta)):
    failed = {f.get("path"): f.get("reason") for f in meta.get("failed") or []
              if isinstance(f, dict)}
    why = f" (embedding failed: {failed[relpath]})" if relpath in failed else ""
    raise ValueError(f"missing feature file {path}: {pathlib.Path(folder) / META_FILE} "
                     f"does not list {relpath!r}{why}")
  if not path.is_file():
    raise ValueError(f"missing feature file {path} (listed in "
                     f"{pathlib.Path(folder) / META_FILE})")
  arr = np.load(path, mmap_mode="r")
  if arr.ndim != 3 or arr.shape[1] == 0:
    raise ValueError(f"{path}: expected shape [L+1, n_chunks>0, D], got {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{path}: features hold NaN or Inf values")
  return arr


def require_meta(folder) -> dict:
  """The folder's meta.json, which must list its feature files."""
  meta = read_meta(folder)
  where = pathlib.Path(folder) / META_FILE
  if meta is None:
    raise ValueError(f"{where} is missing: {folder} is not a finished feature folder "
                     "(`pupujepa embed` or the baselines write it last)")
  if "files" not in meta:
    raise ValueError(f"{where} lists no feature files (written by an older version); "
                     "embed the audio again")
  return meta
