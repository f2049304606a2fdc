"""Attention kernels side by side: forward and forward+backward seconds, per shape.

Not a test. Times every kernel this machine runs (see pupujepa_jax.models.attention) on
the shapes of the released tiny's train step (predictor over all 2048 tokens, teacher on
1638 targets, student on 410 context tokens), and PyTorch's fused
`scaled_dot_product_attention` on the same shapes when torch is installed. Kernels are
timed round-robin (min of `--repeats`), so machine noise hits all of them alike.

  python benchmarks/attention.py                    # CPU: xla, blockwise, torch
  python benchmarks/attention.py --dtype bfloat16   # GPU: also cudnn
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pupujepa_jax.models import attention

# (name, batch, tokens, heads, head dim) of the released tiny at batch 8.
SHAPES = (("predictor", 8, 2048, 6, 64), ("teacher", 8, 1638, 3, 64),
          ("student", 8, 410, 3, 64))


def _jax_fns(kernel: str):
  fn = functools.partial(attention.dot_product_attention, kernel=kernel)
  fwd = jax.jit(fn)
  grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)))
  return fwd, grad


def _torch_fns(dtype: str):
  import torch
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def prepare(x):
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch_dtype).transpose(1, 2)

  def fwd(q, k, v):
    with torch.no_grad():
      return sdpa(q, k, v)

  def grad(q, k, v):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    sdpa(q, k, v).float().sum().backward()
    return q.grad

  return prepare, fwd, grad


def _time(fn, args, sync):
  start = time.perf_counter()
  sync(fn(*args))
  return time.perf_counter() - start


def run(kernels, dtype: str, repeats: int, with_torch: bool) -> list[dict]:
  jdtype = jnp.dtype(dtype)
  rows = []
  for name, b, n, h, d in SHAPES:
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (b, n, h, d)).astype(jdtype) for key in keys)
    contenders = {}
    for kernel in kernels:
      chosen, reason = attention.resolve_kernel(kernel, jax.default_backend(), jdtype, d)
      if reason:
        continue  # this machine cannot run it as requested
      fwd, grad = _jax_fns(kernel)
      contenders[kernel] = (fwd, grad, (q, k, v), jax.block_until_ready)
    if with_torch:
      prepare, fwd, grad = _torch_fns(dtype)
      contenders["torch_sdpa"] = (fwd, grad, tuple(prepare(x) for x in (q, k, v)),
                                  lambda x: x)
    best = {name_: {"forward_s": float("inf"), "forward_backward_s": float("inf")}
            for name_ in contenders}
    for fwd, grad, args, sync in contenders.values():  # compile / warm up
      sync(fwd(*args))
      sync(grad(*args))
    for _ in range(repeats):
      for kernel, (fwd, grad, args, sync) in contenders.items():
        best[kernel]["forward_s"] = min(best[kernel]["forward_s"], _time(fwd, args, sync))
        best[kernel]["forward_backward_s"] = min(best[kernel]["forward_backward_s"],
                                                 _time(grad, args, sync))
    flops = 4 * b * h * n * n * d
    for kernel, times in best.items():
      rows.append({"shape": name, "tokens": n, "kernel": kernel, **{
          k: round(t, 4) for k, t in times.items()},
          "forward_gflops": round(flops / times["forward_s"] / 1e9, 1)})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kernels", default="xla,blockwise,cudnn,splash")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_torch", action="store_true")
  args = parser.parse_args()
  with_torch = not args.no_torch
  if with_torch:
    try:
      import torch  # noqa: F401  (the reference side; optional)
    except ImportError:
      with_torch = False
  rows = run(args.kernels.split(","), args.dtype, args.repeats, with_torch)
  print(json.dumps({"backend": jax.default_backend(), "dtype": args.dtype, "rows": rows},
                   indent=1))


if __name__ == "__main__":
  main()
