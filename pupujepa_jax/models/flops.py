"""Analytic FLOPs of the model: what MFU is measured against (one definition).

Counted: the matmuls and attention of the patch embedding, student, predictor and
teacher, 2 FLOPs per multiply-add. Not counted: norms, activations, softmax, rotary,
masks, loss, optimizer and EMA (small next to the matmuls), and any recomputation
under rematerialisation (MFU counts useful work only).

For one block of width d over n tokens with MLP hidden h (per branch):
  projections  2 n (3 d^2 + d^2)            qkv and proj
  MLP          2 n (2 h d + h d) (SwiGLU: fc1 packs gate and value), 2 n (2 h d) (GELU)
  attention    4 n^2 d                      q k^T and p v, all heads together
A training step on B examples with L tokens per window, Lc context and Lt targets:
  forward   = patch embedding (2 L pt pf d) + student(Lc) + predictor(Lc + Lt, with
              proj_in 2 Lc d p when the widths differ, proj_out 2 Lt p d)
  teacher   = encoder over Lt targets (targets_only) or over L tokens (full_grid)
  step      = B (3 forward + teacher)      backward = 2 x forward for trained parts
"""
from __future__ import annotations


def block_flops(tokens: int, width: int, mlp_hidden: int, swiglu: bool) -> float:
  """Forward FLOPs of one transformer block over `tokens` tokens."""
  projections = 2 * tokens * 4 * width * width
  mlp = 2 * tokens * (3 if swiglu else 2) * mlp_hidden * width
  attention = 4 * tokens * tokens * width
  return float(projections + mlp + attention)


def encoder_flops(arch, tokens: int) -> float:
  """Forward FLOPs of the blocks of an encoder of `arch` over `tokens` tokens."""
  hidden = int(arch.width * arch.mlp_ratio)
  return arch.depth * block_flops(tokens, arch.width, hidden, arch.swiglu)


def train_step_flops(arch, size, grid, num_targets: int, batch: int,
                     teacher_mode: str = "targets_only") -> dict:
  """Analytic FLOPs of one train step of `batch` examples (see the module docstring)."""
  tokens = grid[0] * grid[1]
  context = tokens - num_targets
  patch = 2 * tokens * arch.patch_time * arch.patch_freq * arch.width
  student = encoder_flops(arch, context)
  pred_hidden = int(size.width * arch.mlp_ratio)
  predictor = size.depth * block_flops(tokens, size.width, pred_hidden, arch.swiglu)
  predictor += 2 * num_targets * size.width * arch.width  # proj_out
  if size.width != arch.width:
    predictor += 2 * context * arch.width * size.width  # proj_in
  teacher = encoder_flops(arch, num_targets if teacher_mode == "targets_only" else tokens)
  trained = patch + student + predictor
  per_example = 3 * trained + teacher
  return {"per_example": per_example, "step": batch * per_example,
          "forward_trained": trained, "teacher": teacher,
          "attention_share": _attention_share(arch, size, tokens, context, num_targets,
                                              teacher_mode, per_example)}


def _attention_share(arch, size, tokens, context, targets, teacher_mode, per_example):
  teacher_tokens = targets if teacher_mode == "targets_only" else tokens
  attention = (3 * (arch.depth * 4 * context ** 2 * arch.width
                    + size.depth * 4 * tokens ** 2 * size.width)
               + arch.depth * 4 * teacher_tokens ** 2 * arch.width)
  return attention / per_example


def inference_flops(arch, tokens: int) -> float:
  """Forward FLOPs of embedding one window (patch embedding + encoder)."""
  return 2 * tokens * arch.patch_time * arch.patch_freq * arch.width + encoder_flops(
      arch, tokens)
