"""The PupuJEPA networks in Flax Linen, laid out as the release builds them.

The release (`model/pupujepa.py` on timm 1.0.28) has four parts, and so do we:
- `PatchEmbed` (`patch_embed`): a strided conv with kernel = stride = patch (4 time x 16
  mel) and a LayerNorm over the tokens; tokens are time-major (`index = t * W + f`). One
  patch embedding feeds both encoders: the student sees the context tokens, the teacher
  the target tokens under stop-gradient, so it learns only through the student branch.
- `Encoder` (`student`, and the EMA `teacher`): pre-norm timm `EvaBlock`s with
  `AttentionRope` (one fused `qkv` Linear with a full q/k/v bias, 2-D RoPE on q and k
  after the bias, `proj`), a SwiGLU MLP (`fc1` packs [gate | value], hidden 4·D per
  branch), then a final LayerNorm. LayerNorm eps is 1e-5 everywhere (torch's default).
- `Predictor`: `proj_in` (identity when the widths agree), one learned mask token per
  target, blocks of the same flavour over [context ; mask tokens] with the predictor's
  own rotary table, a LayerNorm, the target slots, `proj_out` back to the encoder width.

Options the released configs do not use stay selectable for ablations: QK-norm
(`qk_norm`), the EVA attention bias without a key bias (`k_bias=False`), a GELU MLP
(`swiglu=False`), layer-scale, drop-path and 2-D sin-cos absolute positions.

Blocks are stacked with `nn.scan` (a leading `depth` axis on every block parameter), so
one compiled block body serves any depth. Encoders take tokens plus their grid indices,
so the same module encodes a full grid, the visible context or only the targets. With
the `intermediates` collection mutable, every block sows its attention probabilities
(`attention`, [B, heads, N, N]) for pictures, whatever attention kernel runs the model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import ad_checkpoint
import numpy as np

from pupujepa_jax.models import attention as attention_lib
from pupujepa_jax.models import rope

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by every norm of the release
dense_init = nn.initializers.xavier_uniform()
MATMUL = "matmul"  # the name every Linear's output carries for remat policies (`matmul`)
# Rematerialisation of each block in the backward pass (config field `remat`):
# "none" keeps every activation; "dots" keeps the matmul outputs and recomputes the cheap
# elementwise work (norms, activations, rotary, softmax); "full" keeps only block inputs.
# The Linears' dots sit inside `matmul`'s custom_vjp, where the dots policy cannot see
# them, so their outputs are saved by name; so are the attention kernels' residuals
# (`attention.RESIDUALS`: output and log-sum-exp), else their forward would run again.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(MATMUL,
                                                      attention_lib.RESIDUALS)),
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Hyper-parameters shared by every block of one stack (static under jit)."""
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  swiglu: bool = True
  qk_norm: bool = False
  k_bias: bool = True
  layer_scale: float = 0.0
  drop_path: float = 0.0
  pos_embed: str = "rope"
  rope_max_res: float = 224.0
  rope_linear_bands: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"
  layer_loop: str = "auto"

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    """Hidden units of the MLP (per SwiGLU branch)."""
    return int(self.width * self.mlp_ratio)


def layer_norm(name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, name=name)


def matmul(x, kernel):
  """x [..., D] @ kernel [D, F]: every Linear of the model, its output named `MATMUL`.

  Its own backward states both gradients in the layout their operands already have:
  dx = grad · kernelᵀ and dkernel = xᵀ · grad, contracting the token axes of x and grad
  directly. Autodiff's transpose of the same matmul asks for the kernel gradient as
  (grad · x)ᵀ, which XLA:CPU turns into two transposed copies of grad and an Eigen dot
  with a transposed operand: 670 vs 386 ms for one fc1 of the released tiny's predictor
  at batch 8 (forward and backward), the same numbers; the whole step gains 2-4%, as XLA
  ran those dots beside other work (README, Speed). Other backends get the same dots.
  """
  return ad_checkpoint.checkpoint_name(_matmul(x, kernel), MATMUL)


@jax.custom_vjp
def _matmul(x, kernel):
  return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
  return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, grad):
  x, kernel = residuals
  tokens = tuple(range(x.ndim - 1))
  dx = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
  dkernel = jax.lax.dot_general(x, grad, ((tokens, tokens), ((), ())))
  return dx, dkernel


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(x, kernel, dimension_numbers, precision=None):
  """`nn.Dense`'s dot_general (last axis of x with the kernel's first) through `matmul`."""
  assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and precision is None
  return matmul(x, kernel)


def dense(features: int, dtype, name: str) -> nn.Dense:
  """A timm Linear (kernel [in, out] and bias) whose matmul is `matmul`."""
  return nn.Dense(features, kernel_init=dense_init, dtype=dtype,
                  dot_general=_dense_dot_general, name=name)


class PackedLinear(nn.Module):
  """A timm Linear whose output packs `parts` equal slices: kernel [D, parts * width] and
  bias [parts * width]; returns the slices (the fused `qkv` = [q | k | v], GluMlp's `fc1`
  = [gate | value]).

  One matmul per slice, over the kernel's columns, rather than one matmul and a split:
  the backward then never builds the packed [tokens, parts * width] gradient nor the
  transposed copy of it that XLA makes for the kernel's gradient (for fc1 of the released
  tiny's predictor at batch 8, 200 MB each, per layer; ~5% of the predictor's step on a
  CPU). Same parameters, same numbers.

  Parts listed in `no_bias` (the key of EVA's qkv layout, an ablation) do not add their
  third of the bias: it receives no gradient and never moves; the layout is unchanged.
  """
  parts: int
  width: int
  no_bias: tuple[int, ...] = ()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", dense_init, (x.shape[-1], self.parts * self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.parts * self.width,))
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    outputs = []
    for part in range(self.parts):
      cols = slice(part * self.width, (part + 1) * self.width)
      out = matmul(x, kernel[:, cols])
      outputs.append(out if part in self.no_bias else out + bias[cols])
    return tuple(outputs)


class Attention(nn.Module):
  spec: BlockSpec

  @nn.compact
  def __call__(self, x, sin, cos):
    s = self.spec
    b, n, _ = x.shape
    q, k, v = (part.reshape(b, n, s.num_heads, s.head_dim) for part in PackedLinear(
        3, s.width, () if s.k_bias else (1,), s.dtype, name="qkv")(x))
    if s.qk_norm:
      q = layer_norm("q_norm", s.dtype)(q)
      k = layer_norm("k_norm", s.dtype)(k)
    if sin is not None:
      q, k = rope.apply_rope(q, sin, cos), rope.apply_rope(k, sin, cos)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention", attention_lib.attention_weights(q, k))
    out = attention_lib.dot_product_attention(q, k, v, s.attention)
    return dense(s.width, s.dtype, "proj")(out.reshape(b, n, s.width))


@jax.custom_vjp
def swiglu(gate, value):
  """silu(gate) * value (timm GluMlp).

  Its own backward keeps only the two inputs and recomputes the sigmoid, instead of the
  sigmoid and silu activations autodiff would keep: ~85 MB less per predictor layer of
  the released tiny at batch 8, the same numbers.
  """
  return nn.silu(gate) * value


def _swiglu_fwd(gate, value):
  return swiglu(gate, value), (gate, value)


def _swiglu_bwd(residuals, grad):
  gate, value = residuals
  sig = jax.nn.sigmoid(gate)
  return grad * value * sig * (1 + gate * (1 - sig)), grad * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Mlp(nn.Module):
  spec: BlockSpec

  @nn.compact
  def __call__(self, x):
    s = self.spec
    if s.swiglu:
      h = swiglu(*PackedLinear(2, s.mlp_hidden, dtype=s.dtype, name="fc1")(x))
    else:
      h = nn.gelu(dense(s.mlp_hidden, s.dtype, "fc1")(x), approximate=False)
    return dense(s.width, s.dtype, "fc2")(h)


class Block(nn.Module):
  """Pre-norm EVA block; scanned with carry x and a per-layer drop-path rate."""
  spec: BlockSpec
  deterministic: bool = True

  def _residual(self, x, update, gamma_name, rate):
    if self.spec.layer_scale:
      gamma = self.param(gamma_name, nn.initializers.constant(self.spec.layer_scale),
                         (self.spec.width,))
      update = update * gamma.astype(update.dtype)
    if not self.deterministic and self.spec.drop_path:
      keep = 1.0 - rate
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
      update = jnp.where(mask, update / keep, 0.0).astype(update.dtype)
    return x + update

  @nn.compact
  def __call__(self, x, sin, cos, rate):
    s = self.spec
    x = self._residual(x, Attention(s, name="attn")(layer_norm("norm1", s.dtype)(x), sin, cos),
                       "gamma_1", rate)
    x = self._residual(x, Mlp(s, name="mlp")(layer_norm("norm2", s.dtype)(x)), "gamma_2", rate)
    return x, x


LAYER_LOOPS = ("auto", "scan", "unrolled")


def unroll_layers(layer_loop: str) -> bool:
  """Whether the block loop is unrolled: "auto" unrolls on CPUs (measured ~20% faster
  there: XLA CPU runs a rolled loop's body without fusing across iterations) and keeps a
  rolled scan on GPUs/TPUs, where one compiled body keeps compile times short at depth."""
  if layer_loop not in LAYER_LOOPS:
    raise ValueError(f"layer_loop {layer_loop!r} not in {LAYER_LOOPS}")
  if layer_loop == "auto":
    return jax.default_backend() == "cpu"
  return layer_loop == "unrolled"


def run_blocks(spec: BlockSpec, deterministic: bool, x, sin, cos):
  """`spec.depth` blocks named `blocks` over a stacked parameter axis (call inside a
  compact method); the loop is a scan, rolled or unrolled (`unroll_layers`). The
  parameter layout is the same either way.

  Returns the final tokens and every block's output [depth, B, N, width].
  """
  unrolled = unroll_layers(spec.layer_loop)
  block = Block
  if spec.remat != "none":
    # A rolled scan already keeps XLA from merging the recomputation back into the
    # forward pass (CSE); unrolled blocks need remat's own guard against it.
    block = nn.remat(block, prevent_cse=unrolled, policy=REMAT_POLICIES[spec.remat])
  scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0), length=spec.depth,
                    unroll=spec.depth if unrolled else 1)
  rates = np.linspace(0.0, spec.drop_path, spec.depth, dtype=np.float32)
  return scanned(spec, deterministic, name="blocks")(x, sin, cos, jnp.asarray(rates))


def positions(spec: BlockSpec, grid, index):
  """(sin, cos) [B, N, head_dim] for rotary stacks, or (None, None) for sin-cos ones."""
  if spec.pos_embed != "rope":
    return None, None
  table = rope.rope_table(tuple(grid), spec.head_dim, spec.rope_max_res,
                          spec.rope_linear_bands)
  return rope.gather_rope(table, index)


def add_absolute_positions(spec: BlockSpec, grid, x, index):
  """The sin-cos ablation adds absolute 2-D positions to the tokens; RoPE adds nothing."""
  if spec.pos_embed != "sincos":
    return x
  return x + jnp.asarray(rope.sincos_table(tuple(grid), spec.width), x.dtype)[index]


def patch_kernel_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform over the flattened patch (fan_in = patch pixels, fan_out = width)."""
  flat = dense_init(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
  return flat.reshape(shape)


class PatchEmbed(nn.Module):
  """Spectrogram [B, T, F] -> LayerNormed patch tokens [B, (T/pt) * (F/pf), width]."""
  width: int
  patch: tuple[int, int] = (4, 16)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, spectrogram):
    grid = (spectrogram.shape[-2] // self.patch[0], spectrogram.shape[-1] // self.patch[1])
    x = nn.Conv(self.width, self.patch, strides=self.patch, padding="VALID",
                kernel_init=patch_kernel_init, dtype=self.dtype, name="proj")(
                    spectrogram[..., None].astype(self.dtype))
    x = x.reshape(x.shape[0], grid[0] * grid[1], self.width)  # time-major tokens
    return layer_norm("norm", self.dtype)(x)


def full_index(grid, batch: int):
  """[B, H*W] indices of the whole grid."""
  return jnp.broadcast_to(jnp.arange(grid[0] * grid[1], dtype=jnp.int32),
                          (batch, grid[0] * grid[1]))


class Encoder(nn.Module):
  """Blocks + final LayerNorm over patch tokens at grid positions (student or teacher).

  `__call__(tokens [B, N, D], index [B, N] or None)` returns the final normed tokens, or
  with `return_layers` also the stack `[L + 1, B, N, D]` of the block input (the patch
  tokens, plus sin-cos positions in that ablation) and each block's output.
  """
  spec: BlockSpec
  grid: tuple[int, int]
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens, index=None, return_layers: bool = False):
    s = self.spec
    if index is None:
      index = full_index(self.grid, tokens.shape[0])
    x = add_absolute_positions(s, self.grid, tokens.astype(s.dtype), index)
    sin, cos = positions(s, self.grid, index)
    out, layers = run_blocks(s, self.deterministic, x, sin, cos)
    out = layer_norm("norm", s.dtype)(out)
    if return_layers:
      return out, jnp.concatenate([x[None], layers], axis=0)
    return out


class Predictor(nn.Module):
  """Narrow ViT predicting target-token features from context tokens and mask tokens."""
  spec: BlockSpec
  out_width: int
  grid: tuple[int, int]
  deterministic: bool = True

  @nn.compact
  def __call__(self, context, context_index, target_index):
    s = self.spec
    x = context.astype(s.dtype)
    if s.width != self.out_width:  # the release's proj_in is nn.Identity otherwise
      x = dense(s.width, s.dtype, "proj_in")(x)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, s.width))
    b, n_targets = target_index.shape
    masks = jnp.broadcast_to(mask_token.astype(x.dtype), (b, n_targets, s.width))
    x = jnp.concatenate([x, masks], axis=1)
    index = jnp.concatenate([context_index, target_index], axis=1)
    x = add_absolute_positions(s, self.grid, x, index)
    sin, cos = positions(s, self.grid, index)
    x, _ = run_blocks(s, self.deterministic, x, sin, cos)
    x = layer_norm("norm", s.dtype)(x[:, -n_targets:])  # per token: slicing first is exact
    return dense(self.out_width, s.dtype, "proj_out")(x)
