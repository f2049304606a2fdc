"""The CPU demo: a small PupuJEPA pretrained in minutes on the offline music corpus.

Sized for a 2-core CPU machine (`make demo` runs it end to end). By hand:
  pupujepa data offline --out demo_out/data
  pupujepa data ingest --input demo_out/data/corpus --out demo_out/data/corpus_tfds
  pupujepa train --config experiments/demo.py:data=demo_out/data/corpus_tfds \
      --workdir demo_out/pretrain

Arguments: data=PATH (dataset dir from `pupujepa data ingest`), steps=N, batch=N.
The architecture keeps the released block flavour (SwiGLU, QK-norm, 2-D RoPE, 4x16
patches) at a smaller size, and trains on 1.28 s crops (inference windows match).
"""
from pupujepa_jax import config as config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, data="", steps=850, batch=32, lr=1.5e-3)
  c = config_lib.base_config("tiny")
  c.model.update(width=128, depth=4, num_heads=4)
  c.predictor.update(width=64, depth=2, num_heads=2)
  c.model.crop_frames = 128
  c.data.update(source="tfds", path=a.data, batch_size=a.batch, num_workers=1)
  c.total_steps = a.steps
  c.optim.update(lr=a.lr, min_lr=1e-5, warmup_steps=max(1, a.steps // 10))
  c.mask.update(warmup_start=a.steps // 10, warmup_end=a.steps // 2)
  c.log_every = 10
  c.checkpoint.update(every=100, keep=2, keep_period=0)
  return c
