"""Tests of the offline music build (corpus + probe tasks) and its baselines."""
import csv
import functools
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import librosa
import numpy as np
import pytest
import soundfile

from data_pipelines import offline
from data_pipelines.offline import corpus
from data_pipelines.offline import render
from data_pipelines.offline import tasks as tasks_lib
from pupujepa_jax import baselines, evaluation, frontend

REPO = pathlib.Path(__file__).resolve().parent.parent

HOURS = 0.01
# Train then holds 12 clips: all 12 instrument families and 4 chord qualities (the probe
# needs every test class seen in train).
EXAMPLES = 24
# Probed in the baseline test: one multiclass, one multilabel, one regression task.
PROBED = ("chord", "instruments", "tempo")


def _hashes(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      rel = os.path.relpath(path, root)
      if rel.startswith("cache") or rel in ("summary.json", "build_args.json"):
        continue
      with open(path, "rb") as fh:
        out[rel] = hashlib.sha1(fh.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  a = str(tmp_path_factory.mktemp("offline_a"))
  b = str(tmp_path_factory.mktemp("offline_b"))
  summary_a = offline.build_offline(a, hours=HOURS, seed=3, num_workers=2, progress=False,
                                    examples_per_task=EXAMPLES)
  # Different worker count: the files must not depend on scheduling.
  summary_b = offline.build_offline(b, hours=HOURS, seed=3, num_workers=1, progress=False,
                                    examples_per_task=EXAMPLES)
  return a, b, summary_a, summary_b


def test_two_builds_are_identical(builds):
  a, b, summary_a, _ = builds
  ha, hb = _hashes(a), _hashes(b)
  assert ha == hb
  wavs = [p for p in ha if p.endswith(".wav")]
  assert len(wavs) == len(summary_a["files"]) >= len(offline.TASKS) * EXAMPLES + 1
  assert summary_a["renders"]["skipped"] == 0
  assert summary_a["corpus"]["hours"] >= HOURS


def test_second_call_is_cached(builds):
  a, _, summary_a, _ = builds
  files = sorted(p for p in pathlib.Path(a).rglob("*") if p.is_file())
  mtimes = [p.stat().st_mtime_ns for p in files]
  again = offline.build_offline(a, hours=HOURS, seed=3, num_workers=2, progress=False,
                                examples_per_task=EXAMPLES)
  assert again["cached"] is True
  assert [p.stat().st_mtime_ns for p in files] == mtimes
  assert again["files"] == summary_a["files"]
  with open(os.path.join(a, "summary.json")) as f:
    assert json.load(f)["args_hash"] == summary_a["args_hash"]


def test_labels_and_splits(builds):
  a, _, summary_a, _ = builds
  for task, info in offline.TASK_INFO.items():
    with open(os.path.join(a, "tasks", task, "labels.csv"), newline="") as f:
      reader = csv.DictReader(f)
      assert reader.fieldnames == ["path", "label", "split"]
      rows = list(reader)
    assert len(rows) == EXAMPLES == summary_a["tasks"][task]["examples"]
    pieces = {}
    for row in rows:
      assert os.path.isfile(os.path.join(a, "tasks", task, row["path"]))
      piece = row["path"].split("_", 1)[1][:-len(".wav")]
      pieces.setdefault(piece, set()).add(row["split"])
      if info.type == "regression":
        assert tasks_lib.TEMPO_BPM[0] <= float(row["label"]) <= tasks_lib.TEMPO_BPM[1]
      else:
        assert set(row["label"].split(";")) <= set(info.classes), row["label"]
    assert all(len(s) == 1 for s in pieces.values()), f"{task}: piece in two splits"
    assert {r["split"] for r in rows} == {"train", "valid", "test"}


def test_corpus_excludes_test_pieces(builds):
  a = builds[0]
  names = os.listdir(os.path.join(a, "corpus"))
  assert names
  test_pieces = set()
  for task in offline.TASKS:
    with open(os.path.join(a, "tasks", task, "labels.csv"), newline="") as f:
      test_pieces |= {r["path"].split("_", 1)[1][:-4] for r in csv.DictReader(f)
                      if r["split"] == "test"}
  corpus_pieces = {n.split("_", 1)[1][:-4] for n in names}
  assert test_pieces and not corpus_pieces & test_pieces


def test_audio_is_24k_mono_finite_not_silent(builds):
  a, _, summary_a, _ = builds
  for rel in summary_a["files"][:: max(1, len(summary_a["files"]) // 12)]:
    audio, sr = soundfile.read(os.path.join(a, rel), dtype="float32", always_2d=True)
    assert sr == 24_000 and audio.shape[1] == 1, rel
    assert np.all(np.isfinite(audio)), rel
    assert np.sqrt(np.mean(audio ** 2)) > 0.01, rel
  for task in offline.TASKS:
    clip, _ = soundfile.read(os.path.join(a, "tasks", task, _first_path(a, task)))
    assert len(clip) == int(tasks_lib.CLIP_SECONDS * 24_000)


def _rows(root, task):
  with open(os.path.join(root, "tasks", task, "labels.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _first_path(root, task):
  return _rows(root, task)[0]["path"]


def test_broken_scores_are_skipped_and_counted(tmp_path):
  music21 = render.require("music21")
  broken_file = tmp_path / "broken.mxl"
  broken_file.write_bytes(b"this is not a score")
  good = corpus.select_sources(1, seed=0)[0]
  sources = [good, ("empty/score", music21.stream.Score()), ("bad/file", str(broken_file))]
  pieces, skipped = offline._load_pieces(sources, str(tmp_path / "cache"), None, False)
  assert [p.id for p in pieces] == [good[0]]
  assert len(skipped) == 2
  assert "empty/score" in skipped[0] and "no pitched notes" in skipped[0]
  assert "bad/file" in skipped[1]
  with pytest.raises(corpus.ScoreError, match="not a music21 stream"):
    corpus.extract_piece(object(), "x/object")


def test_failed_render_is_skipped_not_fatal():
  offline._init_worker()
  piece = corpus.Piece(id="x/p", parts=[np.array([[0.0, 1.0, 60.0]])], length=1.0,
                       key=None, time_signature=(4, 4))
  plan = dict(piece="x/p", seconds=1.0, quarter_s=0.5, transpose=0, programs=[400],
              velocities=[0.8], rt60=0.3, wet=0.1, fx_seed=0)
  path, seconds, error = offline._render_job(("corpus", plan, piece, "/nonexistent/x.wav"))
  assert seconds == 0.0 and "400" in error


def test_synth_renders_pitch_and_silence():
  synth = render.Synth()
  note = render.Track(program=0, notes=np.array([[0.1, 0.9, 69.0, 0.9]]))
  audio = synth.render([note], 1.0)
  assert audio.dtype == np.float32 and audio.shape == (24_000,)
  assert np.max(np.abs(audio[:2000])) < 1e-6  # Nothing before the note starts.
  spectrum = np.abs(np.fft.rfft(audio[3000:20000]))
  peak_hz = np.argmax(spectrum) * 24_000 / 17_000
  assert abs(peak_hz - 440.0) < 10.0
  assert np.array_equal(audio, synth.render([note], 1.0))


@pytest.mark.slow
def test_baselines_write_export_layout_and_score(builds, tmp_path):
  a = builds[0]
  tasks_dir = tmp_path / "tasks"
  tasks_dir.mkdir()
  for task in PROBED:
    os.symlink(os.path.join(a, "tasks", task), tasks_dir / task)
  out = str(tmp_path / "baselines")
  scores = baselines.compute_baselines(str(tasks_dir), out, seed=0, n_boot=100)
  assert set(scores) == set(PROBED)
  dims = {"logmel": 256, "chroma": 38, "mfcc": 40}
  for task in PROBED:
    for fs, d in dims.items():
      with open(os.path.join(out, task, fs, "meta.json")) as f:
        meta = json.load(f)
      assert meta["D"] == d and meta["L"] == 0 and meta["sample_rate"] == 24_000
      assert meta["files"] == [r["path"] for r in _rows(a, task)]
      feat = np.load(os.path.join(out, task, fs, _first_path(a, task) + ".npy"))
      assert feat.shape == (1, 1, d) and np.all(np.isfinite(feat))
      for protocol in ("linear", "mlp"):
        summary = scores[task][fs][protocol]
        assert len(summary["seeds"]) == 3 and summary["n_clips"] == 8
        assert summary["mean"] == pytest.approx(np.mean(summary["seeds"]))
        assert summary["ci"][0] <= summary["ci"][1] and np.isfinite(summary["valid"])
  with open(os.path.join(out, "scores.json")) as f:
    assert json.load(f) == json.loads(json.dumps(scores))
  table = baselines.format_scores(scores)
  assert table.count("\n") == 1 + 2 * len(PROBED)
  assert f"| chord | accuracy | mlp | {evaluation.format_score(scores['chord']['logmel']['mlp'])}" \
      in table


def _chord_wave(root_hz, intervals, seconds=2.56):
  t = np.arange(int(seconds * 24_000)) / 24_000
  wave = sum(np.sin(2 * np.pi * root_hz * 2 ** (k / 12) * t) for k in intervals)
  return (0.1 * wave).astype(np.float32)


def test_chroma_and_mfcc_equal_librosa():
  rng = np.random.default_rng(0)
  wave = _chord_wave(261.63, (0, 4, 7)) + 0.001 * rng.standard_normal(61_440).astype(
      np.float32)
  ours = baselines.chroma(wave)
  # librosa on the same framing: reflect padding by (n_fft - hop) / 2, no centring.
  pad = (4096 - 1200) // 2
  want = librosa.feature.chroma_stft(y=np.pad(wave, (pad, pad), mode="reflect"),
                                     sr=24_000, n_fft=4096, hop_length=1200, tuning=0.0,
                                     center=False)
  assert ours.shape == want.shape == (12, 51)
  np.testing.assert_allclose(ours, want, atol=1e-5)
  # C, E and G carry the chroma of a C major triad.
  assert set(np.argsort(ours.mean(1))[-3:]) == {0, 4, 7}
  logmel = frontend.log_mel_np(wave)
  np.testing.assert_allclose(baselines.mfcc(logmel),
                             librosa.feature.mfcc(S=logmel.T, n_mfcc=20).T, atol=1e-4)


def test_chroma_interval_features_ignore_transposition():
  c_major, d_major, c_augmented = (
      baselines.clip_features(_chord_wave(root, intervals))["chroma"]
      for root, intervals in ((261.63, (0, 4, 7)), (293.66, (0, 4, 7)), (261.63, (0, 4, 8))))
  # Means: 12 chroma, then 7 interval magnitudes; then the stds.
  chroma, intervals = slice(0, 12), slice(12, 19)
  assert np.abs(c_major[chroma] - d_major[chroma]).max() > 0.5
  np.testing.assert_allclose(c_major[intervals], d_major[intervals], rtol=0.05, atol=0.02)
  # Another quality at the same root: other interval magnitudes (measured max difference
  # 1.33: the augmented triad, three major thirds, puts its energy in coefficient 3).
  assert np.abs(c_augmented[intervals] - c_major[intervals]).max() > 0.5


@functools.lru_cache(maxsize=1)
def _test_pieces():
  """Synthetic pieces (no score parsing) eligible for every task, in all three splits:
  two parts of quarter notes, 4/4, 64 quarters, a key."""
  pieces = []
  for i in range(90):
    part = np.array([[q, 1.0, 60 + (q * 7 + i) % 12] for q in range(64)], np.float64)
    pieces.append(corpus.Piece(id=f"synthetic/p{i:03d}", parts=[part, part - [0, 0, 12]],
                               length=64.0, key=(0, "major") if i % 2 else (9, "minor"),
                               time_signature=(4, 4)))
  return pieces


def _specs(task, n=240, seed=0):
  return tasks_lib.plan_task(task, _test_pieces(), n, seed)


def test_task_splits_share_the_examples_by_piece():
  for task in offline.TASKS:
    specs = _specs(task)
    counts = {s: sum(x["split"] == s for x in specs) for s in ("train", "valid", "test")}
    assert counts == {"train": 120, "valid": 36, "test": 84}, task
    assert all(corpus.piece_split(x["piece"]) == x["split"] for x in specs)


def test_pitch_and_chord_labels_by_construction():
  for spec in _specs("pitch"):
    bass, *upper = spec["pitches"]
    assert tasks_lib.corpus.PITCH_NAMES[bass % 12] == spec["label"]
    assert 36 <= bass < 60 and min(upper) >= bass + 12  # alone in its register
  chord = _specs("chord")
  for spec in chord:
    classes = {p % 12 for p in spec["pitches"]}
    shapes = [{(r + i) % 12 for i in tasks_lib.CHORD_QUALITIES[q]}
              for q in tasks_lib.CHORD_CLASSES for r in range(12)]
    # Exactly the label's quality at some root, and no other quality at any root.
    matches = [q for q in tasks_lib.CHORD_CLASSES
               if any(classes == {(r + i) % 12 for i in tasks_lib.CHORD_QUALITIES[q]}
                      for r in range(12))]
    assert matches == [spec["label"]] and classes in shapes
  labels = [s["label"] for s in chord]
  assert {labels.count(q) for q in tasks_lib.CHORD_CLASSES} == {60}


def test_tempo_and_instrument_labels_by_construction():
  for spec in _specs("tempo"):
    bpm = float(spec["label"])
    assert tasks_lib.TEMPO_BPM[0] <= bpm <= tasks_lib.TEMPO_BPM[1]
    assert 60.0 / spec["quarter_s"] == pytest.approx(bpm, abs=0.005)
  for spec in _specs("instruments"):
    families = spec["label"].split(";")
    assert 1 <= len(families) <= 2
    # Every labelled family plays (through some part's program).
    assert set(families) <= {render.program_family(p) for p in spec["programs"]}


def test_drums_mark_the_tempo():
  spec = next(s for s in _specs("tempo") if float(s["label"]) > 100)
  piece = next(p for p in _test_pieces() if p.id == spec["piece"])
  track = tasks_lib._drum_track(spec, piece, tasks_lib.CLIP_SECONDS)
  kicks_and_snares = np.sort(track.notes[np.isin(track.notes[:, 2], (36, 38)), 0])
  np.testing.assert_allclose(np.diff(kicks_and_snares), spec["quarter_s"], atol=1e-9)


def test_extra_test_pieces_are_test_pieces_outside_the_selection():
  base = corpus.select_sources(24, seed=0)
  extra = corpus.select_test_sources(20, seed=0, exclude=[s[0] for s in base])
  assert len(extra) == 20 and extra == corpus.select_test_sources(
      20, seed=0, exclude=[s[0] for s in base])
  assert all(corpus.piece_split(s[0]) == "test" for s in extra)
  assert not {s[0] for s in extra} & {s[0] for s in base}
  assert offline.extra_test_pieces(600) == 42


# Run in a child with a private TMPDIR: music21's pickle cache is $TMPDIR/music21.
_PLANT = textwrap.dedent("""
    import json, os, pickle, sys, zlib
    from music21 import converter, environment
    from data_pipelines.offline import corpus

    marker = sys.argv[1]

    class Plant:
      def __reduce__(self):  # unpickling this creates the marker file
        return (open, (marker, "w"))

    sources = corpus.select_sources(4, seed=0)[:4]
    scratch = environment.Environment().getRootTempDir()
    for _, path in sources[:3]:
      pickle_path = converter.PickleFilter(path).getPickleFp(scratch, zipType="gz")
      pickle_path.write_bytes(zlib.compress(pickle.dumps(Plant())))
    pieces = [corpus.parse_source(source) for source in sources]
    print(json.dumps({"parsed": len(pieces), "scratch": sorted(os.listdir(scratch))}))
    """)


def test_scores_never_load_or_write_music21_pickles(tmp_path):
  (tmp_path / "tmp").mkdir()
  (tmp_path / "home").mkdir()
  marker = tmp_path / "unpickled"
  env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), HOME=str(tmp_path / "home"))
  out = subprocess.run([sys.executable, "-c", _PLANT, str(marker)], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True).stdout
  result = json.loads(out)
  assert result["parsed"] == 4  # every score parsed from its source
  assert not marker.exists()
  # Only the three planted files: music21 wrote no pickle of its own.
  assert len(result["scratch"]) == 3


def test_synth_renders_what_a_soundfont_parsed_anew_renders():
  """Renders start from a clone of one parsed soundfont; each must sound exactly like a
  soundfont parsed from the file for that render alone, whatever was rendered before."""
  tsf = render.require("tinysoundfont")._tinysoundfont
  tracks = [render.Track(program=p, notes=np.array([[0.1, 0.9, 60.0 + p % 12, 0.8],
                                                    [0.3, 1.5, 67.0, 0.6]]))
            for p in (0, 24, 40, 73)]
  tracks.append(render.Track(program=0, notes=np.array([[0.0, 0.1, 36.0, 0.9],
                                                        [0.5, 0.55, 42.0, 0.6]]),
                             is_drum=True))
  synth = render.Synth()
  clone_first = synth.render(tracks, 2.0)
  synth.render(tracks[1:3], 1.0)  # other notes in between
  clone_again = synth.render(tracks, 2.0)

  def parsed_anew():
    with open(render.soundfont_path(), "rb") as f:
      sf = tsf.SoundFont(f.read())
    sf.set_output(tsf.OutputMode.Mono, 24_000, 0.0)
    sf.set_max_voices(synth.max_voices)
    return sf

  synth._fresh = parsed_anew
  reference = synth.render(tracks, 2.0)
  assert np.abs(reference).max() > 0.1
  np.testing.assert_array_equal(clone_first, reference)
  np.testing.assert_array_equal(clone_again, reference)
