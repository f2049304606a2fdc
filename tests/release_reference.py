"""A PyTorch reference built the way the release builds PupuJEPA (test-only).

Assembled from timm 1.0.28's public pieces exactly as the release's `model/pupujepa.py`
and `model/patch_embed_rope.py` do: `EvaBlock(attn_type="rope", qkv_bias=True,
norm_layer=nn.LayerNorm, num_prefix_tokens=0, swiglu_mlp=True)` blocks,
`create_rope_embed("cat", dim, num_heads)` rotary tables, a conv + LayerNorm patch
embedding (`patch_embed.proj`, `patch_embed.norm_layer`), `student` / `teacher` =
blocks + norm (the teacher a deepcopy of the student), and a predictor with `proj_in`
(identity for equal widths), `mask_token`, `blocks`, `norm`, `proj_out`. The state dict
therefore carries the release's parameter names. Masks are inputs here (the release
draws them inside `forward`); everything else follows the release's forward.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from timm.layers import create_rope_embed
from timm.models.eva import EvaBlock
from torch import nn


def _eva_blocks(dim, depth, num_heads, mlp_ratio):
  return nn.ModuleList([
      EvaBlock(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
               norm_layer=nn.LayerNorm, attn_type="rope", num_prefix_tokens=0, drop_path=0.0,
               swiglu_mlp=True, init_values=None)
      for _ in range(depth)])


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
    self.norm_layer = nn.LayerNorm(dim)

  def forward(self, x):  # [B, 1, T, F] -> [B, (T/pt)*(F/pf), D], time-major
    b = x.shape[0]
    out = self.proj(x).permute(0, 2, 3, 1)
    return self.norm_layer(out.reshape(b, -1, out.shape[-1]))


class Encoder(nn.Module):
  def __init__(self, dim, depth, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.blocks = _eva_blocks(dim, depth, num_heads, mlp_ratio)
    self.norm = nn.LayerNorm(dim)

  def forward(self, x, rope):
    for block in self.blocks:
      x = block(x, rope=rope)
    return self.norm(x)


class Predictor(nn.Module):
  def __init__(self, dim, pred_dim, depth, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.proj_in = nn.Linear(dim, pred_dim) if dim != pred_dim else nn.Identity()
    self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
    self.blocks = _eva_blocks(pred_dim, depth, num_heads, mlp_ratio)
    self.norm = nn.LayerNorm(pred_dim)
    self.proj_out = nn.Linear(pred_dim, dim)

  def forward(self, x_ctx, rope_ctx, rope_tgt):
    b, n_tgt = rope_tgt.shape[:2]
    x = torch.cat([self.proj_in(x_ctx), self.mask_token.expand(b, n_tgt, -1)], dim=1)
    rope = torch.cat([rope_ctx, rope_tgt], dim=1).unsqueeze(1)
    for block in self.blocks:
      x = block(x, rope=rope)
    x = self.norm(x)
    return self.proj_out(x[:, x_ctx.shape[1]:])


class PupuJEPA(nn.Module):
  def __init__(self, dim, depth, num_heads, pred_dim, pred_depth, pred_heads,
               patch=(4, 16)):
    super().__init__()
    self.patch = tuple(patch)
    self.patch_embed = PatchEmbed(self.patch, dim)
    self.rope_encoder = create_rope_embed(rope_type="cat", dim=dim, num_heads=num_heads,
                                          feat_shape=None)
    self.rope_predictor = create_rope_embed(rope_type="cat", dim=pred_dim,
                                            num_heads=pred_heads, feat_shape=None)
    self.student = Encoder(dim, depth, num_heads)
    self.predictor = Predictor(dim, pred_dim, pred_depth, pred_heads)
    self.teacher = copy.deepcopy(self.student)
    for p in self.teacher.parameters():
      p.requires_grad = False

  def grid(self, imgs):
    return (imgs.shape[2] // self.patch[0], imgs.shape[3] // self.patch[1])

  def forward(self, imgs, masks_enc, masks_pred):
    """(predictions, teacher targets) for [B, 1, T, F] images and index masks."""
    grid = self.grid(imgs)
    x_all = self.patch_embed(imgs)
    rope_enc = self.rope_encoder.get_embed(grid)
    rope_pred = self.rope_predictor.get_embed(grid)
    with torch.no_grad():
      idx = masks_pred.unsqueeze(-1).expand(-1, -1, x_all.shape[-1])
      h_target = self.teacher(torch.gather(x_all, 1, idx),
                              rope=rope_enc[masks_pred].unsqueeze(1))
    idx = masks_enc.unsqueeze(-1).expand(-1, -1, x_all.shape[-1])
    z_context = self.student(torch.gather(x_all, 1, idx),
                             rope=rope_enc[masks_enc].unsqueeze(1))
    z_pred = self.predictor(z_context, rope_pred[masks_enc], rope_pred[masks_pred])
    return z_pred, h_target

  @torch.no_grad()
  def embed(self, imgs):
    """What inference consumers of the release compute: patch_embed + teacher, full grid."""
    rope = self.rope_encoder.get_embed(self.grid(imgs))  # [N, 2 * head_dim], all tokens
    return self.teacher(self.patch_embed(imgs), rope=rope)


def randomise(module: nn.Module, seed: int) -> nn.Module:
  """Non-trivial norms, biases and mask token so every weight matters; the teacher then
  differs from the student so a swapped branch is caught."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 or "mask_token" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if name.endswith("weight")
                                                             else 0.0))
    for p in module.teacher.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return module


def state_dict_numpy(module: nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy(module: nn.Module, state: dict) -> nn.Module:
  module.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()},
                         strict=True)
  return module


class AttentionRecorder:
  """Records timm's own attention probabilities of every block of `blocks`.

  timm's AttentionRope, with its fused kernel switched off, computes
  `softmax(q k^T * scale)` and passes it through `attn_drop`; a forward hook there sees
  exactly the probabilities the block applies to v.
  """

  def __init__(self, blocks):
    self.weights = []
    self._handles = []
    for block in blocks:
      block.attn.fused_attn = False
      self._handles.append(block.attn.attn_drop.register_forward_hook(
          lambda module, inputs, output: self.weights.append(output.detach().numpy())))

  def stacked(self) -> np.ndarray:
    """[depth, B, heads, N, N] of the last forward pass."""
    return np.stack(self.weights[-len(self._handles):])


def release_log_mel(wave: np.ndarray) -> np.ndarray:
  """The released front-end (SPEC section 2) in torch + librosa: [B, samples] -> [B, T, 128].

  Independent of `pupujepa_jax.frontend`: torch.stft with a periodic Hann window on a
  reflect-padded signal, magnitude, librosa's Slaney mel filterbank, log, fixed norm.
  """
  import librosa
  n_fft, hop = 1024, 240
  pad = (n_fft - hop) // 2
  x = torch.nn.functional.pad(torch.from_numpy(np.asarray(wave, np.float32))[:, None],
                              (pad, pad), mode="reflect")[:, 0]
  spec = torch.stft(x, n_fft, hop_length=hop, win_length=n_fft,
                    window=torch.hann_window(n_fft), center=False, return_complex=True)
  mag = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
  mel_basis = torch.from_numpy(librosa.filters.mel(sr=24_000, n_fft=n_fft, n_mels=128,
                                                   fmin=0.0, fmax=12_000.0))
  mel = torch.log(torch.clamp(mel_basis @ mag, min=1e-5))
  return ((mel - (-4.089994845986366)) / (2.0242277159094813 + 1e-8)).transpose(1, 2).numpy()
