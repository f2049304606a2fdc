"""A PyTorch reference of the released PupuJEPA encoder and predictor, built from timm.

Test-only: it assembles timm's public `EvaBlock` and `RotaryEmbeddingCat` the way the release
does (no prefix tokens, extent-normalised rotary grid with linear bands, LayerNorm eps 1e-6,
QK-norm added as per-head LayerNorms) and loads a timm-named state dict, so parity tests
compare our Flax modules against independent code on identical weights.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from timm.layers import RotaryEmbeddingCat
from timm.models.eva import EvaBlock
from torch import nn

LayerNorm = functools.partial(nn.LayerNorm, eps=1e-6)


def _blocks(spec):
  blocks = nn.ModuleList()
  for _ in range(spec.depth):
    block = EvaBlock(spec.width, spec.num_heads, qkv_bias=True, mlp_ratio=spec.mlp_ratio,
                     swiglu_mlp=spec.swiglu, num_prefix_tokens=0, norm_layer=LayerNorm,
                     init_values=spec.layer_scale or None)
    if spec.qk_norm:  # timm's EvaBlock does not forward qk_norm; the attention supports it
      block.attn.q_norm = LayerNorm(spec.head_dim)
      block.attn.k_norm = LayerNorm(spec.head_dim)
    blocks.append(block)
  return blocks


def _rope(spec, grid, index):
  rope = RotaryEmbeddingCat(spec.head_dim, max_res=spec.rope_max_res, in_pixels=True,
                            linear_bands=spec.rope_linear_bands)
  table = rope.get_embed(list(grid))  # [H*W, 2 * head_dim]
  return table[torch.as_tensor(index)].unsqueeze(1)  # [B, 1, N, 2 * head_dim]


class TorchEncoder(nn.Module):

  def __init__(self, spec, patch=(4, 16)):
    super().__init__()
    self.spec, self.patch = spec, patch
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(1, spec.width, patch, stride=patch)
    self.patch_embed.norm = LayerNorm(spec.width)
    self.blocks = _blocks(spec)
    self.norm = LayerNorm(spec.width)

  def forward(self, spectrogram, index=None):
    x = self.patch_embed.proj(spectrogram[:, None])  # [B, D, H, W]
    grid = tuple(x.shape[2:])
    x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
    if index is None:
      index = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2]).copy()
    x = torch.gather(x, 1, torch.as_tensor(index)[..., None].expand(-1, -1, x.shape[-1]))
    rope = _rope(self.spec, grid, index)
    for block in self.blocks:
      x = block(x, rope=rope)
    return self.norm(x)


class TorchPredictor(nn.Module):

  def __init__(self, spec, out_width, grid):
    super().__init__()
    self.spec, self.grid = spec, grid
    self.predictor_embed = nn.Linear(out_width, spec.width)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.width))
    self.predictor_blocks = _blocks(spec)
    self.predictor_norm = LayerNorm(spec.width)
    self.predictor_proj = nn.Linear(spec.width, out_width)

  def forward(self, context, context_index, target_index):
    x = self.predictor_embed(context)
    b, n_targets = target_index.shape
    x = torch.cat([x, self.mask_token.expand(b, n_targets, -1)], dim=1)
    rope = _rope(self.spec, self.grid, np.concatenate([context_index, target_index], 1))
    for block in self.predictor_blocks:
      x = block(x, rope=rope)
    return self.predictor_proj(self.predictor_norm(x[:, -n_targets:]))


def randomise(module, seed):
  """Non-trivial norms, biases and mask token so every weight matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 or "mask_token" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "weight" in name else 0.0))
  return module


def load(module: nn.Module, state_dict: dict) -> nn.Module:
  tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
  missing, unexpected = module.load_state_dict(tensors, strict=False)
  # k_bias is EVA's non-persistent zero buffer, so it is never in a state dict.
  missing = [k for k in missing if not k.endswith("attn.k_bias")]
  if missing or unexpected:
    raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
  return module.eval()
