"""Parameter names of the released PyTorch PupuJEPA, both ways, on NumPy arrays.

The release's `PupuJEPA` state dict (SPEC section 3; timm 1.0.28 module names):
  patch_embed.proj.{weight [D, 1, pt, pf], bias}, patch_embed.norm_layer.{weight, bias}
  {student,teacher}.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*
  {student,teacher}.norm.*
  predictor.proj_in.* (absent when widths agree), predictor.mask_token [1, 1, P],
  predictor.blocks.N.*, predictor.norm.*, predictor.proj_out.*
Options no released config uses map to timm's names too: `attn.q_norm` / `attn.k_norm`
(QK-norm) and `gamma_1` / `gamma_2` (layer-scale).

Ours: `{"patch_embed": {"proj", "norm"}, "student": {"blocks", "norm"}, "predictor":
{...}}` and the teacher `{"blocks", "norm"}`, with a leading depth axis on block params
(`nn.scan`) and Flax's [in, out] kernels. Importing needs no torch. Every name must be
consumed and every expected name present: a leftover or missing tensor is an error
naming it.
"""
from __future__ import annotations

import numpy as np

# The top-level modules of the release's state dict.
RELEASE_GROUPS = ("patch_embed", "student", "teacher", "predictor")


class WeightMappingError(KeyError):
  """A state dict does not match the architecture it is imported into."""

  def __str__(self):  # KeyError would print the message with quotes
    return str(self.args[0]) if self.args else ""


class _Reader:
  """Pops tensors from a state dict by name, so leftovers can be reported."""

  def __init__(self, state_dict, prefix: str = ""):
    self.tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    self.prefix = prefix

  def pop(self, name):
    if name not in self.tensors:
      raise WeightMappingError(f"missing tensor {self.prefix}{name}")
    return np.asarray(self.tensors.pop(name))

  def has(self, name) -> bool:
    return name in self.tensors

  def finish(self):
    if self.tensors:
      names = sorted(self.prefix + k for k in self.tensors)
      raise WeightMappingError(f"unexpected tensors {names[:8]}"
                               + (" ..." if len(names) > 8 else ""))


def _linear(r: _Reader, name: str) -> dict:
  return {"kernel": r.pop(f"{name}.weight").T, "bias": r.pop(f"{name}.bias")}


def _norm(r: _Reader, name: str) -> dict:
  return {"scale": r.pop(f"{name}.weight"), "bias": r.pop(f"{name}.bias")}


def _read_block(r: _Reader, p: str, qk_norm: bool, layer_scale: bool) -> dict:
  attn = {"qkv": _linear(r, f"{p}.attn.qkv"), "proj": _linear(r, f"{p}.attn.proj")}
  if qk_norm:
    attn["q_norm"] = _norm(r, f"{p}.attn.q_norm")
    attn["k_norm"] = _norm(r, f"{p}.attn.k_norm")
  block = {"norm1": _norm(r, f"{p}.norm1"), "attn": attn, "norm2": _norm(r, f"{p}.norm2"),
           "mlp": {"fc1": _linear(r, f"{p}.mlp.fc1"), "fc2": _linear(r, f"{p}.mlp.fc2")}}
  if layer_scale:
    block["gamma_1"] = r.pop(f"{p}.gamma_1")
    block["gamma_2"] = r.pop(f"{p}.gamma_2")
  return block


def _read_blocks(r: _Reader, prefix: str, depth: int, qk_norm: bool, layer_scale: bool):
  blocks = [_read_block(r, f"{prefix}blocks.{i}", qk_norm, layer_scale) for i in range(depth)]
  extra = sorted(k for k in r.tensors if k.startswith(f"{prefix}blocks.{depth}."))
  if extra:
    raise WeightMappingError(f"unexpected tensors {[r.prefix + k for k in extra][:4]}: "
                             f"more than the {depth} blocks of the architecture")
  return _stack(blocks)


def _stack(blocks: list[dict]) -> dict:
  if isinstance(blocks[0], dict):
    return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
  return np.stack(blocks)


def _write_blocks(out: dict, blocks: dict, prefix: str) -> None:
  depth = np.shape(blocks["norm1"]["scale"])[0]
  for i in range(depth):
    for path, value in _leaves(blocks):
      module, leaf = ".".join(path[:-1]), path[-1]
      value = np.asarray(value[i])
      if leaf in ("gamma_1", "gamma_2"):
        out[f"{prefix}blocks.{i}.{leaf}"] = value
      else:
        _put(out, f"{prefix}blocks.{i}.{module}", leaf, value)


def _put(out: dict, name: str, leaf: str, value) -> None:
  value = np.asarray(value)
  if leaf == "kernel":
    out[f"{name}.weight"] = value.T
  elif leaf == "scale":
    out[f"{name}.weight"] = value
  else:
    out[f"{name}.{leaf}"] = value


def _leaves(tree: dict, path=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, path + (key,))
    else:
      yield path + (key,), value


# ---------------------------------------------------------------------------- encoders

def patch_embed_from_release(r: _Reader) -> dict:
  conv = r.pop("patch_embed.proj.weight")  # [width, 1, pt, pf]
  return {"proj": {"kernel": conv.transpose(2, 3, 1, 0), "bias": r.pop("patch_embed.proj.bias")},
          "norm": _norm(r, "patch_embed.norm_layer")}


def patch_embed_to_release(patch_embed: dict, prefix: str = "patch_embed.") -> dict:
  return {f"{prefix}proj.weight": np.asarray(patch_embed["proj"]["kernel"]).transpose(3, 2, 0, 1),
          f"{prefix}proj.bias": np.asarray(patch_embed["proj"]["bias"]),
          f"{prefix}norm_layer.weight": np.asarray(patch_embed["norm"]["scale"]),
          f"{prefix}norm_layer.bias": np.asarray(patch_embed["norm"]["bias"])}


def encoder_from_release(r: _Reader, name: str, arch) -> dict:
  """{"blocks", "norm"} of the `name` ("student" / "teacher") encoder."""
  return {"blocks": _read_blocks(r, f"{name}.", arch.depth, arch.qk_norm,
                                 bool(arch.layer_scale)),
          "norm": _norm(r, f"{name}.norm")}


def encoder_to_release(encoder: dict, name: str) -> dict:
  out = {}
  _write_blocks(out, encoder["blocks"], f"{name}.")
  _put(out, f"{name}.norm", "scale", encoder["norm"]["scale"])
  _put(out, f"{name}.norm", "bias", encoder["norm"]["bias"])
  return out


def predictor_from_release(r: _Reader, arch, size) -> dict:
  params = {}
  if size.width != arch.width:
    params["proj_in"] = _linear(r, "predictor.proj_in")
  params["mask_token"] = r.pop("predictor.mask_token").reshape(1, 1, -1)
  params["blocks"] = _read_blocks(r, "predictor.", size.depth, arch.qk_norm,
                                  bool(arch.layer_scale))
  params["norm"] = _norm(r, "predictor.norm")
  params["proj_out"] = _linear(r, "predictor.proj_out")
  return params


def predictor_to_release(predictor: dict) -> dict:
  out = {"predictor.mask_token": np.asarray(predictor["mask_token"])}
  for module in ("proj_in", "norm", "proj_out"):
    for leaf, value in predictor.get(module, {}).items():
      _put(out, f"predictor.{module}", leaf, value)
  _write_blocks(out, predictor["blocks"], "predictor.")
  return out


# ------------------------------------------------------------------- whole checkpoints

def model_dir_from_release(state_dict: dict, arch) -> dict:
  """Encoder params {"patch_embed", "blocks", "norm"} (the teacher) from release names.

  `state_dict` holds `patch_embed.*` and `teacher.*` (a model dir's file); other
  top-level groups are not read.
  """
  keep = {k: v for k, v in state_dict.items() if k.split(".")[0] in ("patch_embed", "teacher")}
  r = _Reader(keep)
  params = {"patch_embed": patch_embed_from_release(r), **encoder_from_release(r, "teacher", arch)}
  r.finish()
  return params


def model_dir_to_release(encoder: dict) -> dict:
  """Release names of an encoder {"patch_embed", "blocks", "norm"} as a model dir holds it."""
  return {**patch_embed_to_release(encoder["patch_embed"]),
          **encoder_to_release(encoder, "teacher")}


def training_from_release(state_dict: dict, arch, size) -> tuple[dict, dict]:
  """(params {"patch_embed", "student", "predictor"}, teacher {"blocks", "norm"})."""
  r = _Reader(state_dict)
  params = {"patch_embed": patch_embed_from_release(r),
            "student": encoder_from_release(r, "student", arch),
            "predictor": predictor_from_release(r, arch, size)}
  teacher = encoder_from_release(r, "teacher", arch)
  r.finish()
  return params, teacher


def training_to_release(params: dict, teacher: dict) -> dict:
  """The release's whole state dict from our trained params and teacher."""
  if "patch_embed" in teacher:
    raise WeightMappingError(
        "the release layout has one patch embedding; this run trained the teacher's own "
        "EMA copy (teacher_patch_embed='ema'), which it cannot hold")
  return {**patch_embed_to_release(params["patch_embed"]),
          **encoder_to_release(params["student"], "student"),
          **encoder_to_release(teacher, "teacher"),
          **predictor_to_release(params["predictor"])}
