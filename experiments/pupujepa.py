"""PupuJEPA pretraining on 10.24 s log-mel crops, any released variant (tiny ... huge).

Launch (one GPU node or a CPU box):
  pupujepa train --config experiments/pupujepa.py:variant=tiny,data=/data/pupu_tfds \
      --workdir /ckpt/pupujepa_tiny
Multi-host (each host runs the same command; pods auto-detect, elsewhere pass
--coordinator/--num_processes/--process_id):
  pupujepa train --config experiments/pupujepa.py:variant=large,batch=2048,fsdp=8 ...

Arguments (comma separated): variant=tiny|small|base|large|huge, data=PATH (dataset dir
written by `pupujepa data ingest` or a builder), folder=PATH (read an audio folder
directly instead), batch=N (global batch), steps=N, fsdp=N (FSDP axis size), bf16,
remat=none|dots|full (rematerialisation policy of the blocks), smoke (a minutes-long CPU
run of a tiny architecture on short crops, for tests).
"""
from pupujepa_jax import config as config_lib


def get_config(arg: str = ""):
  a = config_lib.parse_arg(arg, variant="tiny", data="", folder="", batch=256,
                           steps=500_000, fsdp=1, bf16=False, remat="none", smoke=False)
  c = config_lib.base_config(a.variant)
  c.total_steps = a.steps
  c.data.batch_size = a.batch
  c.data.source = "folder" if a.folder else "tfds"
  c.data.path = a.folder or a.data
  c.mesh.fsdp = a.fsdp
  c.compute_dtype = "bfloat16" if a.bf16 else "float32"
  c.remat = a.remat
  if a.smoke:
    apply_smoke(c)
  return c


def apply_smoke(c):
  """Shrink a config to a seconds-per-step CPU size (tests and quick checks)."""
  c.model.update(width=64, depth=2, num_heads=2)
  c.predictor.update(width=32, depth=1, num_heads=1)
  c.model.crop_frames = 64
  c.data.update(batch_size=8, num_workers=0)
  c.total_steps = min(c.total_steps, 200)
  c.optim.update(lr=1e-3, warmup_steps=10)
  c.mask.update(warmup_start=0, warmup_end=0)
  c.log_every = 1
  c.checkpoint.update(every=5, keep=2, keep_period=0)
  return c
