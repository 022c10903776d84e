"""What the target itself says: its answers to the distillation prompts, and the draft vocabulary.

An slm target answers a batch of prompts at once over its static KV cache: all rows share one
position per step (the cache takes one position vector for the batch), so the batch is
prefilled up to its shortest prompt, and a row whose prompt is longer is fed its own prompt
tokens (teacher-forced) until it reaches its end, then its own choices. Prompts are sorted by
length first, so rows of a batch waste few such steps. A transformers target answers one prompt
at a time through `slm.generate.generate`.

Samples are kept as token ids in one safetensors file (`samples.safetensors`: the sequences
concatenated, their offsets and prompt lengths), so a resumed run does not generate again.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from slm.atomic import replace_file, tmp_name
from slm.distill.cache import Capture
from slm.errors import SlmError
from slm.generate import Stop, generate
from slm.model import Transformer
from slm.native import decoder
from slm.sampling import SamplingParams, next_token


@dataclass
class Samples:
    sequences: list[list[int]]  # prompt + the target's answer
    prompt_lens: list[int]
    seconds: float = 0.0  # what making them cost (prompts and answers): part of a run's time budget

    def answers(self) -> list[list[int]]:
        return [s[p:] for s, p in zip(self.sequences, self.prompt_lens)]

    @property
    def answer_tokens(self) -> int:
        return sum(len(s) - p for s, p in zip(self.sequences, self.prompt_lens))

    def save(self, path: str | os.PathLike) -> None:
        flat = [t for s in self.sequences for t in s]
        offsets = [0]
        for s in self.sequences:
            offsets.append(offsets[-1] + len(s))
        tmp = tmp_name(Path(path))
        save_file({"tokens": torch.tensor(flat, dtype=torch.int64), "offsets": torch.tensor(offsets),
                   "prompt_lens": torch.tensor(self.prompt_lens, dtype=torch.int64)}, str(tmp),
                  metadata={"seconds": repr(self.seconds)})
        replace_file(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Samples:
        try:
            t = load_file(str(path))
            flat, offsets, plens = t["tokens"].tolist(), t["offsets"].tolist(), t["prompt_lens"].tolist()
            with safe_open(str(path), framework="pt") as f:
                seconds = float((f.metadata() or {}).get("seconds", 0.0))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise SlmError(f"{path}: cannot read distillation samples ({e})") from None
        if len(offsets) != len(plens) + 1 or offsets[-1] != len(flat):
            raise SlmError(f"{path}: distillation samples are inconsistent (offsets vs tokens)")
        return cls([flat[a:b] for a, b in zip(offsets, offsets[1:])], plens, seconds)


@torch.inference_mode()
def answer_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: tuple[int, ...], generator: torch.Generator | None = None,
                 capture: Capture | None = None, deadline: float | None = None) -> list[list[int]]:
    """The target's answers (new tokens, a stop id included) to a batch of prompts, decoded together.
    With `capture`, every forward's features and top next tokens are kept too (`slm.distill.cache`).
    At `deadline` (time.perf_counter()) the answers stop where they are (the target's tokens still)."""
    lens = [len(p) for p in prompts]
    total = min(max(lens) + max_new_tokens, model.config.max_seq_len)
    if min(lens) >= total:
        raise SlmError(f"distillation prompts of {min(lens)} tokens leave no room in the context ({total})")
    model.setup_cache(batch_size=len(prompts), max_seq_len=total)
    run = decoder(model)  # decoding's own kernels: a step of the whole batch is one native call
    start = min(lens)
    ids = torch.tensor([p[:start] for p in prompts])  # (B, start)
    device = model.tok_embeddings.weight.device
    if capture is not None:
        capture.begin(len(prompts), total, model.config.dim)
    logits = run(ids.to(device), torch.arange(start, device=device), logits_to_keep=1)[:, -1]  # (B, V)
    if capture is not None:
        capture.record(torch.arange(start), logits)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for pos in range(start, total):
        column = []
        best = logits.argmax(-1).tolist() if sampling.greedy else None  # one call for the batch
        for b, p in enumerate(prompts):
            if pos < lens[b]:
                column.append(p[pos])  # still in its prompt
                continue
            tok = best[b] if best is not None else int(next_token(logits[b].float(), sampling, generator))
            if not done[b]:
                new[b].append(tok)
                done[b] = tok in stop_ids or len(new[b]) >= max_new_tokens
            column.append(tok)
        if all(done) or pos + 1 >= total or (deadline is not None and time.perf_counter() > deadline):
            break
        logits = run(torch.tensor(column, device=device)[:, None], torch.tensor([pos], device=device))[:, -1]
        if capture is not None:
            capture.record(torch.tensor([pos]), logits)
    model.clear_cache()
    if capture is not None:
        capture.end([n + len(a) for n, a in zip(lens, new)])
    return new


def answer_all(model, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams,
               stop_ids: tuple[int, ...], batch_size: int = 16, seconds: float | None = None,
               generator: torch.Generator | None = None, progress: Callable[[int], None] | None = None,
               seed: int = 0, max_spread: int = 32, capture: Capture | None = None) -> Samples:
    """Answer prompts in batches of similar length (taken in a seeded random order, so that a time
    budget does not keep only the shortest) until done or `seconds` have passed. `capture` (slm
    targets) keeps the features and labels of every sample, in the samples' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches: list[list[int]] = []
    for i in order:  # a batch's rows differ by at most `max_spread` prompt tokens (each a forced step)
        if batches and len(batches[-1]) < batch_size and len(prompts[i]) - len(prompts[batches[-1][0]]) <= max_spread:
            batches[-1].append(i)
        else:
            batches.append([i])
    random.Random(seed).shuffle(batches)
    seqs, plens = [], []
    t0 = time.perf_counter()
    for rows in batches:
        if seconds is not None and time.perf_counter() - t0 > seconds and seqs:
            break
        batch = [prompts[j] for j in rows]
        if isinstance(model, Transformer):
            answers = answer_batch(model, batch, max_new_tokens, sampling, stop_ids, generator, capture,
                                   None if seconds is None else t0 + seconds)
        else:
            answers = [generate(model, p, max_new_tokens, sampling, stop=Stop(ids=stop_ids), generator=generator).tokens
                       for p in batch]
        for p, a in zip(batch, answers):
            seqs.append(p + a)
            plens.append(len(p))
        if progress is not None:
            progress(sum(len(a) for a in answers))
    return Samples(seqs, plens)


def draft_vocabulary(samples: Samples, vocab_size: int, n: int) -> torch.Tensor:
    """FR-Spec: the n most frequent tokens of the target's answers (prompt tokens break ties,
    then lower ids), as target ids in ascending order (d2t)."""
    n = min(n, vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for seq, p in zip(samples.sequences, samples.prompt_lens):
        t = torch.tensor(seq, dtype=torch.int64)
        counts.index_add_(0, t[p:], torch.ones(len(seq) - p, dtype=torch.float64))
        counts.index_add_(0, t[:p], torch.full((p,), 1e-6, dtype=torch.float64))
    counts -= torch.arange(vocab_size, dtype=torch.float64) * 1e-12  # ties: the lower id first
    return torch.sort(torch.topk(counts, n).indices).values


def coverage(samples: Samples, d2t: torch.Tensor) -> float:
    """The share of answer tokens the draft vocabulary can propose at all."""
    keep = set(d2t.tolist())
    answers = [t for a in samples.answers() for t in a]
    return sum(t in keep for t in answers) / max(len(answers), 1)
