"""Next-token loss without materialising the logits of the whole batch.

For a small model the output projection dominates: AMD-135M spends 32000 x 768 of its
~85M matmul parameters per token there, and the (B*T, V) fp32 logits of a 4 x 2048 batch
are 1 GB that plain `F.cross_entropy(model(x))` writes, reads for log-softmax, writes
again for the gradient and reads once more. `fused_linear_cross_entropy` instead walks
over row chunks: logits of a chunk, their log-sum-exp and loss, and right there the
gradient (softmax - one-hot) / n, which it turns into the chunk's gradient for the
hidden states and adds to the output weight's gradient. Same FLOPs, a chunk-sized working
set, and the backward pass only scales what the forward already computed (the idea of
Liger-Kernel's fused linear cross-entropy).

`LanguageModel` is the training view of `Transformer`: the same parameters and names,
with `forward(tokens, targets) -> loss`, so the loss runs inside the module's forward.
That matters under FSDP2, where parameters are only unsharded inside the forward of the
module that owns them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slm.model import Transformer

IGNORE_INDEX = -100


def auto_chunk(vocab_size: int) -> int:
    # ~8M logits (32 MB fp32) per chunk: large enough that each matmul is efficient, small
    # enough to stay far below the full (B*T, V) logits.
    return max(64, (1 << 23) // vocab_size)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, n_valid):
        # hidden: (N, D), weight: (V, D), targets: (N,), n_valid: tokens the mean is over.
        # Under autocast the matmuls run in the autocast dtype; softmax and accumulation in fp32.
        autocast = torch.is_autocast_enabled(hidden.device.type)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32, or fp64 in gradient checks
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        valid = targets != IGNORE_INDEX  # (N,)
        safe_t = targets.clamp(min=0).unsqueeze(1)  # (N, 1)
        # d(mean loss)/d(logits) = (softmax - onehot) * row_scale, row_scale = valid / n_valid. The
        # scale is applied to the (n, D) operands of the gradient matmuls, never to the (n, V) block.
        row_scale = (valid.to(acc) / n_valid).unsqueeze(1)  # (N, 1)
        target_logit = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        p_target = torch.empty(targets.shape, dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t, scale = hidden[s : s + chunk], safe_t[s : s + chunk], row_scale[s : s + chunk]
            logits = (h @ weight.t()).to(acc)  # (n, V)
            target_logit[s : s + chunk] = logits.gather(1, t).squeeze(1)
            # Softmax in place on CPU: one vectorised pass per row while the row is in cache (a
            # separate log-sum-exp, subtract and exp cost about 4x as much here).
            p = torch.softmax(logits, dim=-1, out=logits if logits.device.type == "cpu" else None)
            p_target[s : s + chunk] = p.gather(1, t).squeeze(1)
            p.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=p.dtype, device=p.device))  # p - onehot
            if autocast:
                if need_h:
                    grad_h[s : s + chunk] = (p @ weight) * scale
                if need_w:
                    grad_w += p.t() @ (h * scale)  # (V, D), a low-precision matmul added into fp32
            else:
                p = p.to(h.dtype)
                if need_h:
                    torch.mm(p, weight, out=grad_h[s : s + chunk]).mul_(scale)
                if need_w:
                    grad_w.addmm_(p.t(), h * scale)  # (V, D), in place: no temporary per chunk
        row_loss = -torch.log(p_target)  # = log-sum-exp - target logit
        # Where the target's probability underflowed, -log(p) is inexact: recompute those rows' log-sum-exp.
        lost = valid & (p_target < torch.finfo(acc).tiny * 1e6)
        if lost.any():
            rows = lost.nonzero().squeeze(1)
            row_loss[rows] = torch.logsumexp((hidden[rows] @ weight.t()).to(acc), dim=-1) - target_logit[rows]
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return (row_loss * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """mean over non-ignored targets of cross_entropy(hidden @ weight.T, targets), chunked.

    hidden (..., D), weight (V, D), targets (...) with IGNORE_INDEX for positions without a target.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    targets = targets.reshape(-1)  # (N,)
    chunk = chunk or auto_chunk(weight.shape[0])
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1).item()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk, n_valid)
    acc = torch.promote_types(weight.dtype, torch.float32)
    total = hidden.new_zeros((), dtype=acc)
    for s in range(0, hidden.shape[0], chunk):
        logits = (hidden[s : s + chunk] @ weight.t()).to(acc)  # (n, V)
        total += F.cross_entropy(logits, targets[s : s + chunk], ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n_valid


class LanguageModel(Transformer):
    """`Transformer` whose forward is the training loss (same parameters, same state-dict names).

    loss_chunk: rows per chunk of the fused output projection + cross-entropy; 0 computes
    the full logits and `F.cross_entropy` (the plain reference path).
    """

    loss_chunk: int = -1

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.loss_chunk == 0:
            logits = super().forward(tokens)  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        hidden = super().forward(tokens, return_hidden=True)  # (B, T, D)
        chunk = self.loss_chunk if self.loss_chunk > 0 else auto_chunk(self.config.vocab_size)
        return fused_linear_cross_entropy(hidden, self.output.weight, targets, chunk)
