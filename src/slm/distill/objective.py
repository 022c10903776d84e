"""What the head learns and how it is scored: the target's distribution, restricted to the draft
vocabulary, at every depth of the training-time-test unroll.

Positions: the target's logits at t predict x_{t+1}; the head at t reads the target's features at
t and x_{t+1}, and predicts x_{t+2}, so its label is the target's distribution at t+1. The loss is
the cross-entropy of the head's q against the target's p restricted to the draft vocabulary (not
renormalised: that is mass_in * (KL(p_in/mass_in || q) + const), so positions where the target
mostly says something the draft cannot say weigh less). Only positions whose predicted token is
part of the target's answer count (the prompt is not what the draft will be asked to guess).
The target's features and distribution (its top `cache.LABEL_TOP` tokens) come from the
`FeatureCache`, computed once: training runs only the head.

The score of depth j is how often the head's argmax equals the target's there: on samples the
target decoded greedily that is exactly the greedy acceptance of the (j+1)-th drafted token of a
round given the j before it were accepted (the head then reads the same tokens as in decoding,
and `FeatureHead.unroll` attends exactly as decoding does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slm.distill.cache import FeatureCache
from slm.speculative.head import FeatureHead


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) padded sequences
    answer: torch.Tensor  # (B, T) bool: the token at this position is part of the target's answer
    taps: torch.Tensor  # (B, T, n_taps*d) the target's features (width 0 without taps)
    label_ids: torch.Tensor  # (B, T, k) the target's top tokens for position t+1
    label_p: torch.Tensor  # (B, T, k) their probabilities

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.tokens, self.answer, self.taps, self.label_ids, self.label_p)))


def make_batch(sequences: list[list[int]], prompt_lens: list[int], cache: FeatureCache, seq_len: int,
               pad_id: int = 0) -> Batch:
    """Sequences (with their cached features and labels) cut to their last `seq_len` tokens (the
    answer kept), right-padded. The features were computed over the whole sequence, as decoding sees it."""
    B, T = len(sequences), min(max(len(s) for s in sequences), seq_len)
    width, k = cache.taps[0].shape[-1], cache.ids[0].shape[-1]
    tokens = torch.full((B, T), pad_id, dtype=torch.int64)
    answer = torch.zeros(B, T, dtype=torch.bool)
    taps = torch.zeros(B, T, width, dtype=cache.taps[0].dtype)
    ids = torch.zeros(B, T, k, dtype=torch.int64)
    probs = torch.zeros(B, T, k, dtype=torch.float32)
    for b, (s, p) in enumerate(zip(sequences, prompt_lens)):
        cut = max(len(s) - T, 0)
        n = len(s) - cut
        tokens[b, :n] = torch.tensor(s[cut:])
        answer[b, max(p - cut, 0) : n] = True
        taps[b, :n] = cache.taps[b][cut:]
        ids[b, :n] = cache.ids[b][cut:]
        probs[b, :n] = cache.probs[b][cut:]
    return Batch(tokens, answer, taps, ids, probs)


def depth_weights(depth: int, decay: float = 0.8) -> list[float]:
    return [decay**j for j in range(depth)]


def head_loss(head: FeatureHead, batch: Batch, depth: int) -> tuple[torch.Tensor, dict]:
    """-> (loss, stats: per-depth agreement counts, positions, mass the draft vocabulary misses).
    On a GPU, bf16 autocast (the head's weights and the loss stay fp32)."""
    device = head.d2t.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return _head_loss(head, batch.to(device), depth)


def _head_loss(head: FeatureHead, batch: Batch, depth: int) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        t2d = torch.full((head.config.target_vocab,), -1, dtype=torch.int64, device=head.d2t.device)
        t2d[head.d2t] = torch.arange(len(head.d2t), device=t2d.device)  # target id -> draft index
        ids = batch.label_ids[:, 1:-1]  # (B, T-2, k): the label of head position t is the target's at t+1
        draft_ids = t2d[ids]
        p_in = batch.label_p[:, 1:-1] * (draft_ids >= 0)  # restricted to the draft vocabulary, not renormalised
        draft_ids = draft_ids.clamp_min(0)
        target_best = ids[..., 0]  # (B, T-2) target ids
        mask = batch.answer[:, 2:]  # (B, T-2): head position t predicts x_{t+2}
    inputs = batch.taps[:, :-1].float() if head.config.features else None  # head positions 0..T-2
    outs = head.unroll(inputs, batch.tokens[:, 1:], depth)  # each (B, T-1, d)
    total = torch.zeros((), device=batch.tokens.device)
    stats = {"agree": [], "counted": [], "mass_out": 0.0}
    weights = depth_weights(len(outs))
    for j, (h, w) in enumerate(zip(outs, weights)):
        valid = mask.clone()
        valid[:, : max(j, 0)] = False  # a depth-j draft needs j earlier positions
        # The output layer only where the label counts (the answer's positions: about half of a
        # sample is its prompt), which is most of the head's cost.
        logq = torch.log_softmax(head.logits(h[:, :-1][valid]).float(), -1)  # (n, N)
        ce = -(p_in[valid] * logq.gather(-1, draft_ids[valid])).sum(-1)  # (n,)
        total = total + w * ce.sum() / max(ce.numel(), 1)
        with torch.no_grad():
            guess = head.d2t[logq.argmax(-1)]  # (n,) target ids
            stats["agree"].append(int((guess == target_best[valid]).sum()))
            stats["counted"].append(int(valid.sum()))
    with torch.no_grad():
        m = mask.sum().clamp_min(1)
        stats["mass_out"] = float(((1 - p_in.sum(-1)) * mask).sum() / m)
    return total / sum(weights), stats


@torch.no_grad()
def acceptance_by_depth(head: FeatureHead, batches: list[Batch], depth: int) -> list[float]:
    """Greedy acceptance of the 1st, 2nd, ... drafted token (each given the ones before it were
    accepted), measured on held-out samples."""
    agree, counted = [0] * depth, [0] * depth
    for batch in batches:
        _, stats = head_loss(head, batch, depth)
        for j, (a, c) in enumerate(zip(stats["agree"], stats["counted"])):
            agree[j] += a
            counted[j] += c
    measured = [a / c if c else 0.0 for a, c in zip(agree, counted)][: len(stats["agree"])]
    # A head without features reads the same true tokens at every depth: its conditional
    # acceptance does not depend on the depth.
    return measured + measured[-1:] * (depth - len(measured))


def chain_acceptance(per_depth: list[float]) -> float:
    """Per-token acceptance a of the geometric model that yields the same expected accepted
    tokens over these depths (for `slm.speculative.schedule.predicted_speedup`)."""
    expected, run = 0.0, 1.0
    for a in per_depth:
        run *= a
        expected += run
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        e = sum(mid ** (i + 1) for i in range(len(per_depth)))
        lo, hi = (mid, hi) if e < expected else (lo, mid)
    return lo
