"""Weight-name mapping between timm-style PyTorch state dicts and our Flax params.

The released PupuJEPA checkpoints use timm's EVA names (`patch_embed.proj`, `blocks.N.attn.qkv`,
`blocks.N.attn.q_bias`, ...; the predictor uses I-JEPA's `predictor_embed`, `mask_token`,
`predictor_blocks.N`, `predictor_norm`, `predictor_proj`). The mapping works on NumPy
arrays, so importing needs no torch; the parity test uses it with a timm reference.
Every name must be consumed: a leftover or missing key is an error naming it.
"""
from __future__ import annotations

import numpy as np

class WeightMappingError(KeyError):
  """A state dict does not match the architecture it is imported into."""


class _Reader:
  """Pops tensors from a state dict by name, so leftovers can be reported."""

  def __init__(self, state_dict, prefix: str):
    self.tensors = {k[len(prefix):]: np.asarray(v, np.float32)
                    for k, v in state_dict.items() if k.startswith(prefix)}
    self.prefix = prefix

  def pop(self, name):
    if name not in self.tensors:
      raise WeightMappingError(f"missing weight {self.prefix}{name}")
    return self.tensors.pop(name)

  def has(self, name) -> bool:
    return name in self.tensors

  def finish(self):
    if self.tensors:
      raise WeightMappingError(
          f"unexpected weights under {self.prefix!r}: {sorted(self.tensors)[:8]}")


def _linear(r: _Reader, name: str, bias: bool = True) -> dict:
  out = {"kernel": r.pop(f"{name}.weight").T}
  if bias:
    out["bias"] = r.pop(f"{name}.bias")
  return out


def _norm(r: _Reader, name: str) -> dict:
  return {"scale": r.pop(f"{name}.weight"), "bias": r.pop(f"{name}.bias")}


def _block(r: _Reader, p: str, spec) -> dict:
  attn = {"qkv": _linear(r, f"{p}.attn.qkv", bias=False),
          "q_bias": r.pop(f"{p}.attn.q_bias"), "v_bias": r.pop(f"{p}.attn.v_bias"),
          "proj": _linear(r, f"{p}.attn.proj")}
  if r.has(f"{p}.attn.k_bias"):  # a constant-zero buffer in EVA; persisted by some exports
    if np.any(r.pop(f"{p}.attn.k_bias")):
      raise WeightMappingError(f"{p}.attn.k_bias is not zero; EVA attention has no k bias")
  if spec.qk_norm:
    attn["q_norm"] = _norm(r, f"{p}.attn.q_norm")
    attn["k_norm"] = _norm(r, f"{p}.attn.k_norm")
  block = {"norm1": _norm(r, f"{p}.norm1"), "attn": attn, "norm2": _norm(r, f"{p}.norm2"),
           "mlp": {"fc1": _linear(r, f"{p}.mlp.fc1"), "fc2": _linear(r, f"{p}.mlp.fc2")}}
  if spec.layer_scale:
    block["gamma_1"] = r.pop(f"{p}.gamma_1")
    block["gamma_2"] = r.pop(f"{p}.gamma_2")
  return block


def _stack(blocks: list[dict]) -> dict:
  import jax  # local: keep module importable without JAX initialisation cost
  return jax.tree.map(lambda *xs: np.stack(xs), *blocks)


def encoder_from_torch(state_dict, spec, prefix: str = "") -> dict:
  """Flax encoder params from timm EVA names under `prefix` (e.g. 'target_encoder.')."""
  r = _Reader(state_dict, prefix)
  conv = r.pop("patch_embed.proj.weight")  # [width, 1, pt, pf]
  params = {
      "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0),
                      "bias": r.pop("patch_embed.proj.bias")},
      "patch_norm": _norm(r, "patch_embed.norm"),
      "stack": {"blocks": _stack([_block(r, f"blocks.{i}", spec)
                                  for i in range(spec.depth)])},
      "norm": _norm(r, "norm"),
  }
  r.finish()
  return params


def predictor_from_torch(state_dict, spec, prefix: str = "") -> dict:
  """Flax predictor params from I-JEPA style predictor names under `prefix`."""
  r = _Reader(state_dict, prefix)
  params = {
      "embed": _linear(r, "predictor_embed"),
      "mask_token": r.pop("mask_token").reshape(1, 1, -1),
      "stack": {"blocks": _stack([_block(r, f"predictor_blocks.{i}", spec)
                                  for i in range(spec.depth)])},
      "norm": _norm(r, "predictor_norm"),
      "proj": _linear(r, "predictor_proj"),
  }
  r.finish()
  return params


def _flat_block(block: dict, p: str, i: int) -> dict:
  out = {}
  def put_linear(name, tree, bias=True):
    out[f"{p}.{name}.weight"] = np.asarray(tree["kernel"][i]).T
    if bias:
      out[f"{p}.{name}.bias"] = np.asarray(tree["bias"][i])
  def put_norm(name, tree):
    out[f"{p}.{name}.weight"] = np.asarray(tree["scale"][i])
    out[f"{p}.{name}.bias"] = np.asarray(tree["bias"][i])
  attn = block["attn"]
  put_norm("norm1", block["norm1"])
  put_linear("attn.qkv", attn["qkv"], bias=False)
  out[f"{p}.attn.q_bias"] = np.asarray(attn["q_bias"][i])
  out[f"{p}.attn.v_bias"] = np.asarray(attn["v_bias"][i])
  if "q_norm" in attn:
    put_norm("attn.q_norm", attn["q_norm"])
    put_norm("attn.k_norm", attn["k_norm"])
  put_linear("attn.proj", attn["proj"])
  put_norm("norm2", block["norm2"])
  put_linear("mlp.fc1", block["mlp"]["fc1"])
  put_linear("mlp.fc2", block["mlp"]["fc2"])
  for g in ("gamma_1", "gamma_2"):
    if g in block:
      out[f"{p}.{g}"] = np.asarray(block[g][i])
  return out


def encoder_to_torch(params, spec, prefix: str = "") -> dict:
  """Inverse of `encoder_from_torch` (timm EVA names), e.g. to feed a torch reference."""
  blocks = params["stack"]["blocks"]
  out = {"patch_embed.proj.weight": np.asarray(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
         "patch_embed.proj.bias": np.asarray(params["patch_embed"]["bias"]),
         "patch_embed.norm.weight": np.asarray(params["patch_norm"]["scale"]),
         "patch_embed.norm.bias": np.asarray(params["patch_norm"]["bias"]),
         "norm.weight": np.asarray(params["norm"]["scale"]),
         "norm.bias": np.asarray(params["norm"]["bias"])}
  for i in range(spec.depth):
    out.update(_flat_block(blocks, f"blocks.{i}", i))
  return {prefix + k: v for k, v in out.items()}


def predictor_to_torch(params, spec, prefix: str = "") -> dict:
  """Inverse of `predictor_from_torch`."""
  blocks = params["stack"]["blocks"]
  out = {"predictor_embed.weight": np.asarray(params["embed"]["kernel"]).T,
         "predictor_embed.bias": np.asarray(params["embed"]["bias"]),
         "mask_token": np.asarray(params["mask_token"]),
         "predictor_norm.weight": np.asarray(params["norm"]["scale"]),
         "predictor_norm.bias": np.asarray(params["norm"]["bias"]),
         "predictor_proj.weight": np.asarray(params["proj"]["kernel"]).T,
         "predictor_proj.bias": np.asarray(params["proj"]["bias"])}
  for i in range(spec.depth):
    out.update(_flat_block(blocks, f"predictor_blocks.{i}", i))
  return {prefix + k: v for k, v in out.items()}
