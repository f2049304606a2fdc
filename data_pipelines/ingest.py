"""Ingest: a folder tree of audio files -> a TFDS ArrayRecord dataset of 24 kHz mono PCM.

`ingest` writes `<out>/audio_folder/<version>/...` (the format of `dataset_format`) plus
`<out>/ingest_report.json`, which lists every skipped file with its reason, the source
folder and a fingerprint of it (relative paths, sizes and mtimes of its audio files, and
the ingest options).

A dataset is never lost to a later ingest:
- re-running on an unchanged folder returns the recorded summary without decoding;
- a changed folder (or other options) is built into a temporary sibling of `<out>`, and
  only a complete build replaces `<out>`, in one atomic exchange of the two folders
  (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames); a build that fails, finds
  no usable file or is killed leaves `<out>` as it was;
- a dataset ingested from another folder is replaced only with `overwrite=True`
  (`--overwrite`), and a non-empty `<out>` that ingest did not make never is.
Leftover temporary folders of killed runs are removed by the next ingest into `<out>`.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pathlib
import secrets
import shutil

from data_pipelines import audio as audio_lib
from data_pipelines import dataset_format
from data_pipelines.dataset_format import (SAMPLE_RATE, audio_features,
                                           build_array_record_dataset, to_int16)

DATASET_NAME = "audio_folder"
REPORT_NAME = "ingest_report.json"
# How many skip reasons an "all files unusable" error quotes.
QUOTED_REASONS = 5
# Suffix of the old dataset while `_publish` swaps folders without an atomic exchange.
_MOVED_ASIDE = ".old"


def _fingerprint(root: pathlib.Path, files: list[pathlib.Path], min_seconds: float,
                 sample_rate: int) -> str:
  h = hashlib.sha256(f"{min_seconds}|{sample_rate}".encode())
  for f in files:
    st = f.stat()
    h.update(f"|{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()


def _staging_prefix(out: pathlib.Path) -> str:
  return f".{out.name}.ingest-"


def _remove_stale_staging(out: pathlib.Path) -> None:
  """Cleans up after ingests into `out` that were killed: removes their build folders,
  and puts back a dataset moved aside by `_publish`'s two-rename fallback."""
  prefix = _staging_prefix(out)
  for path in sorted(out.parent.glob(prefix + "*")):
    pid = path.name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit() or _process_alive(int(pid)):
      continue
    if path.name.endswith(_MOVED_ASIDE) and not out.exists():
      os.rename(path, out)
    else:
      shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _previous_report(out: pathlib.Path) -> dict | None:
  """The report of the dataset `out` holds; None when `out` is missing or empty.

  Raises ValueError when `out` holds something ingest did not make.
  """
  if not out.exists():
    return None
  if not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a folder")
  report_path = out / REPORT_NAME
  if report_path.is_file():
    try:
      return json.loads(report_path.read_text())
    except ValueError:
      return {}  # Unreadable: its source is unknown, so replacing it needs overwrite.
  if any(out.iterdir()):
    raise ValueError(f"--out {out} is not empty and holds no {REPORT_NAME}: it is not a "
                     "dataset made by ingest; choose a new or empty folder")
  return None


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                        ctypes.c_uint]
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
    return False
  raise OSError(code, os.strerror(code), str(b))


def _publish(staging: pathlib.Path, out: pathlib.Path) -> None:
  """Puts the complete build `staging` at `out`; the old `out`, if any, ends in `staging`."""
  if not out.exists():
    os.rename(staging, out)
  elif not _exchange(staging, out):
    # No atomic exchange here: a kill between the two renames leaves the old dataset
    # moved aside, and the next ingest into `out` puts it back.
    old = staging.with_name(staging.name + _MOVED_ASIDE)
    os.rename(out, old)
    try:
      os.rename(staging, out)
    except OSError:
      os.rename(old, out)
      raise
    os.rename(old, staging)


def ingest(input_dir, out_dir, min_seconds: float = 1.0, *, sample_rate: int = SAMPLE_RATE,
           workers: int | None = None, overwrite: bool = False) -> dict:
  """Turn a folder tree of audio into a TFDS ArrayRecord dataset of mono int16 PCM.

  Files that cannot be decoded, are empty, shorter than `min_seconds`, contain NaN/Inf
  or claim a sample rate outside `frontend.SAMPLE_RATE_RANGE` are skipped and listed with
  their reason in `<out_dir>/ingest_report.json`.

  Args:
    input_dir: folder searched recursively for audio (see audio.AUDIO_EXTENSIONS).
    out_dir: folder of the dataset (see the module docstring for what replaces it).
    min_seconds: shorter tracks are skipped.
    sample_rate: target rate of the stored PCM.
    workers: decoding threads (default: CPU count).
    overwrite: replace a dataset that was ingested from another folder.

  Returns:
    Summary dict: kept, skipped, hours, dataset_dir, report, reused (True when an
    unchanged folder was ingested before and nothing was redone).

  Raises:
    FileNotFoundError: `input_dir` is missing or holds no audio files.
    ValueError: no file was usable (`out_dir` is left as it was); `out_dir` holds a
      dataset of another folder and `overwrite` is False; `out_dir` holds other files.
  """
  root = pathlib.Path(input_dir).resolve()
  files = audio_lib.list_audio_files(root)
  out = pathlib.Path(out_dir).resolve()
  fingerprint = _fingerprint(root, files, min_seconds, sample_rate)
  if out.parent.is_dir():
    _remove_stale_staging(out)
  previous = _previous_report(out)
  if previous is not None:
    if previous.get("fingerprint") == fingerprint and _has_dataset(out):
      return _summary(previous, out / REPORT_NAME, reused=True)
    if previous.get("input_dir") != str(root) and not overwrite:
      raise ValueError(f"--out {out} holds a dataset ingested from "
                       f"{previous.get('input_dir') or 'an unknown folder'}, not {root}; "
                       "pass --overwrite to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  # mkdir, not tempfile.mkdtemp: the folder becomes `out`, so it gets the usual
  # permissions (umask), not mkdtemp's owner-only ones.
  staging = out.parent / f"{_staging_prefix(out)}{os.getpid()}-{secrets.token_hex(4)}"
  staging.mkdir()
  try:
    report = _build(root, files, staging, out, fingerprint, min_seconds, sample_rate,
                    workers or os.cpu_count() or 1)
    _publish(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return _summary(report, out / REPORT_NAME, reused=False)


def _has_dataset(out: pathlib.Path) -> bool:
  try:
    dataset_format.find_dataset_dir(out)
  except FileNotFoundError:
    return False
  return True


def _build(root, files, staging: pathlib.Path, out: pathlib.Path, fingerprint: str,
           min_seconds: float, sample_rate: int, workers: int) -> dict:
  """Writes the dataset and its report into `staging`; returns the report."""
  skipped, kept = [], []

  def examples():
    skipped.clear()
    kept.clear()
    for f, wave in audio_lib.decode_files(files, sample_rate, min_seconds, workers):
      rel = f.relative_to(root).as_posix()
      if isinstance(wave, audio_lib.AudioDecodeError):
        skipped.append({"path": rel, "reason": wave.reason})
        continue
      kept.append(wave.shape[0] / sample_rate)
      yield rel, {"audio": to_int16(wave), "path": rel, "duration": kept[-1]}

  try:
    builder = build_array_record_dataset(
        DATASET_NAME, staging, audio_features(), {"train": examples},
        description=f"Audio ingested from {root}",
        metadata={"sample_rate": sample_rate, "source": str(root),
                  "source_fingerprint": fingerprint})
  except Exception:
    if kept or not skipped:
      raise
    # TFDS refuses to write a split without examples.
  if not kept:
    reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:QUOTED_REASONS])
    more = f"; and {len(skipped) - QUOTED_REASONS} more" if len(skipped) > QUOTED_REASONS \
        else ""
    raise ValueError(f"no usable audio in {root}: all {len(skipped)} files were skipped "
                     f"({reasons}{more}); {out} was left as it was")
  dataset_dir = out / pathlib.Path(builder.data_dir).relative_to(staging)
  report = {
      "input_dir": str(root),
      "dataset_dir": str(dataset_dir),
      "fingerprint": fingerprint,
      "sample_rate": sample_rate,
      "min_seconds": min_seconds,
      "kept": len(kept),
      "hours": sum(kept) / 3600.0,
      "skipped": skipped,
  }
  (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
  return report


def _summary(report: dict, report_path: pathlib.Path, reused: bool) -> dict:
  return {"kept": report["kept"], "skipped": len(report["skipped"]), "hours": report["hours"],
          "dataset_dir": report["dataset_dir"], "report": str(report_path), "reused": reused}
