"""The CPU demo: a small PupuJEPA pretrained in minutes on the offline music corpus.

Sized for a 2-core CPU machine (`make demo` runs it end to end). By hand:
  pupujepa data offline --out demo_out/data
  pupujepa data ingest --input demo_out/data/corpus --out demo_out/data/corpus_tfds
  pupujepa train --config experiments/cpu_demo.py:data=demo_out/data/corpus_tfds \
      --workdir demo_out/pretrain

Arguments (the pretraining levers the demo's ablation table measures): data=PATH (dataset
dir from `pupujepa data ingest`), steps=N, batch=N, lr=PEAK, ema=START (momentum rises
linearly to ema_end), ema_end=END, loss=smooth_l1|normalized_mse|mse, ratio=MASKED_SHARE,
random_share=P (the curriculum's final probability of random masking; block and
time-frequency share the rest equally, as released),
width=N, depth=N, crop=FRAMES; monitor=LABELS_CSV and monitor_every=N turn on the
online kNN monitor (`make demo` passes the pitch task's train and valid clips). The architecture keeps the released block flavour (SwiGLU,
fused qkv with bias, 2-D log-band RoPE, 4x16 patches, shared patch embedding) at a smaller
size, and trains on 1.28 s crops (inference windows match).
"""
from pupujepa_jax import config as config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, data="", steps=850, batch=32, lr=1.5e-3, ema=0.996,
                           ema_end=1.0, loss="smooth_l1", ratio=0.8, random_share=0.4,
                           width=128, depth=4, crop=128, monitor="", monitor_every=50)
  c = config_lib.base_config("tiny")
  c.model.update(width=a.width, depth=a.depth, num_heads=max(1, a.width // 32))
  c.predictor.update(width=a.width // 2, depth=2, num_heads=max(1, a.width // 64))
  c.model.crop_frames = a.crop
  c.data.update(source="tfds", path=a.data, batch_size=a.batch, num_workers=1)
  c.total_steps = a.steps
  c.loss = a.loss
  c.optim.update(lr=a.lr, min_lr=1e-5, warmup_steps=max(1, a.steps // 10),
                 ema=(a.ema, a.ema_end))
  structured = (1.0 - a.random_share) / 2
  c.mask.update(ratio=a.ratio, probs=(a.random_share, structured, structured, 0.0),
                warmup_start=a.steps // 10, warmup_end=a.steps // 2)
  c.monitor.update(labels=a.monitor, every=a.monitor_every if a.monitor else 0)
  c.log_every = 10
  c.checkpoint.update(every=100, keep=2, keep_period=0)
  return c
