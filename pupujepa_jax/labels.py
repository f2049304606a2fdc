"""Label vocabularies shared by datasets, offline tasks and the probe (one definition).

Light on purpose (no JAX): data workers and builders import it.
"""
# Sharp spellings; mir_eval reads them as well as flats.
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# 24 keys: the 12 majors, then the 12 minors.
KEY_CLASSES = tuple(f"{tonic} {mode}" for mode in ("major", "minor") for tonic in PITCH_CLASSES)
