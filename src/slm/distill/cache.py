"""What the head learns from, computed once: the target's features and its next-token
distribution at every position of every sample.

The frozen target's forward costs as much per training token as the head's own forward and
backward, and it gives the same answer every epoch, so it is not run in the training loop. For an
slm target the features and labels are captured while the target writes its answers (the batched
decoding computes exactly these hidden states and logits, so they cost nothing extra); for other
targets, or samples from an older run, one batched forward over each sample computes them.

Per position t of a sample: the outputs of the tapped layers (bf16, n_taps*d values: about
3.5 KB a token for SmolLM2) and the target's `LABEL_TOP` most likely next tokens x_{t+1} with
their probabilities (fp16). The head's loss needs the target's distribution over the draft
vocabulary; the top 32 hold nearly all of a small model's mass, and the tail is what the
un-renormalised loss weighs least anyway. Kept beside the samples in DRAFT/features.safetensors
(atomic), so a resumed run neither generates nor runs the target again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slm.atomic import replace_file, tmp_name
from slm.errors import SlmError
from slm.speculative.features import FeatureTap, target_features

LABEL_TOP = 32
FEATURE_DTYPE = torch.bfloat16  # the target's hidden states can be large: bf16 keeps fp32's range


def target_labels(logits: torch.Tensor, k: int = LABEL_TOP) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V) -> the k most likely tokens (..., k) int32 and their probabilities (..., k) fp16."""
    p, ids = torch.softmax(logits.float(), -1).topk(min(k, logits.shape[-1]), -1)
    return ids.to(torch.int32), p.to(torch.float16)


@dataclass
class FeatureCache:
    """Per sample (aligned with `Samples.sequences`), per position: taps (L, n_taps*d) (width 0 without
    taps), the top target tokens for the next position (L, k) and their probabilities (L, k). Positions
    never scored (the last one) hold zeros: the head never reads them."""

    tap_layers: tuple[int, ...]
    taps: list[torch.Tensor]
    ids: list[torch.Tensor]
    probs: list[torch.Tensor]

    def select(self, indices: list[int]) -> FeatureCache:
        return FeatureCache(self.tap_layers, [self.taps[i] for i in indices], [self.ids[i] for i in indices],
                            [self.probs[i] for i in indices])

    def save(self, path: str | os.PathLike) -> None:
        offsets = [0]
        for t in self.ids:
            offsets.append(offsets[-1] + t.shape[0])
        tensors = {"taps": torch.cat(self.taps).contiguous(), "ids": torch.cat(self.ids).contiguous(),
                   "probs": torch.cat(self.probs).contiguous(), "offsets": torch.tensor(offsets)}
        tmp = tmp_name(Path(path))
        save_file(tensors, str(tmp), metadata={"tap_layers": ",".join(map(str, self.tap_layers))})
        replace_file(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureCache:
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {})["tap_layers"]
                taps, ids, probs, offsets = (f.get_tensor(n) for n in ("taps", "ids", "probs", "offsets"))
            layers = tuple(int(i) for i in raw.split(",") if i)
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise SlmError(f"{path}: cannot read the distillation features ({e})") from None
        offsets = offsets.tolist()
        if offsets[-1] != ids.shape[0] or taps.shape[0] != ids.shape[0] or probs.shape != ids.shape:
            raise SlmError(f"{path}: distillation features are inconsistent (offsets vs tensors)")
        cut = lambda t: [t[a:b] for a, b in zip(offsets, offsets[1:])]  # noqa: E731
        return cls(layers, cut(taps), cut(ids), cut(probs))

    def matches(self, sequences: list[list[int]], tap_layers: tuple[int, ...]) -> bool:
        """Made for these samples, with these taps (a head without taps needs only the labels)?"""
        return (len(sequences) == len(self.ids) and all(len(s) == t.shape[0] for s, t in zip(sequences, self.ids))
                and (not tap_layers or tuple(tap_layers) == self.tap_layers))


class Capture:
    """Collects a FeatureCache while an slm target writes its answers (`samples.answer_batch`):
    each forward's tapped outputs and top next tokens, by row and position."""

    def __init__(self, tap: FeatureTap | None):
        self.tap = tap
        self.cache = FeatureCache(tap.layers if tap is not None else (), [], [], [])
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def begin(self, batch: int, length: int, dim: int) -> None:
        width = len(self.cache.tap_layers) * dim
        self._rows = [(torch.zeros(length, width, dtype=FEATURE_DTYPE),
                       torch.zeros(length, LABEL_TOP, dtype=torch.int32),
                       torch.zeros(length, LABEL_TOP, dtype=torch.float16)) for _ in range(batch)]

    def record(self, pos: torch.Tensor, logits: torch.Tensor | None) -> None:
        """After a forward over positions pos (T,): its taps, and logits (B, V) of its last position."""
        if self.tap is not None:
            feats = self.tap.take().to("cpu", FEATURE_DTYPE)  # (B, T, n_taps*d)
            for b, row in enumerate(self._rows):
                row[0][pos] = feats[b]
        if logits is not None:
            ids, p = target_labels(logits)  # (B, k) each
            last = int(pos[-1])
            for b, row in enumerate(self._rows):
                row[1][last], row[2][last] = ids[b].cpu(), p[b].cpu()

    def end(self, lengths: list[int]) -> None:
        """Keep each row's first lengths[b] positions (its prompt and answer)."""
        for (f, i, p), n in zip(self._rows, lengths):
            self.cache.taps.append(f[:n].clone())
            self.cache.ids.append(i[:n].clone())
            self.cache.probs.append(p[:n].clone())
        self._rows = []


@torch.inference_mode()
def compute_cache(model, tap: FeatureTap | None, sequences: list[list[int]], batch_size: int = 4,
                  device: str | torch.device = "cpu") -> FeatureCache:
    """One batched forward of the target per group of samples (any target: slm or transformers)."""
    cache = FeatureCache(tap.layers if tap is not None else (), [], [], [])
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # little padding per group
    done: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for g in range(0, len(order), batch_size):
        rows = order[g : g + batch_size]
        T = max(len(sequences[i]) for i in rows)
        tokens = torch.zeros(len(rows), T, dtype=torch.int64)
        for b, i in enumerate(rows):
            tokens[b, : len(sequences[i])] = torch.tensor(sequences[i])
        taps, logits = target_features(model, tap, tokens.to(device))  # (B, T, n*d) | None, (B, T, V)
        ids, p = target_labels(logits)
        for b, i in enumerate(rows):
            n = len(sequences[i])
            f = taps[b, :n].to("cpu", FEATURE_DTYPE) if taps is not None else torch.zeros(n, 0, dtype=FEATURE_DTYPE)
            done[i] = (f, ids[b, :n].cpu(), p[b, :n].cpu())
    for i in range(len(sequences)):
        cache.taps.append(done[i][0])
        cache.ids.append(done[i][1])
        cache.probs.append(done[i][2])
    return cache
