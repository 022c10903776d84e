"""Batched log-likelihood of (context, continuation) requests, tokenized as lm-evaluation-harness's
Hugging Face backend tokenizes them and scored several times faster.

Tokenization (lm_eval `TemplateLM._encode_pair` / `loglikelihood`): trailing whitespace of the
context moves to the continuation; the continuation's tokens are those of tokenize(context +
continuation) past the tokens of tokenize(context), with the tokenizer's default special tokens
(BOS when transformers' tokenizer would add it); an empty context becomes the prefix token
(BOS, else EOS). Inputs longer than the model's context keep their last max_seq_len + 1 tokens.

Speed: all requests of one item (the choices of a question) form one *group* packed into one
row: their longest common token prefix (the context) once, then each request's remaining tokens
as a branch that attends to the prefix and to itself only (a block mask, positions restarting
after the prefix). The context is computed once per question instead of once per choice, and
the vocabulary projection + log-softmax run on the scored positions only. Rows are sorted
longest first (as lm_eval does) and batched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slm.errors import SlmError
from slm.tokenizer import Tokenizer


# --- tokenization ---------------------------------------------------------------------------


@dataclass
class RequestEncoder:
    """Turns (context, continuation) strings into token lists exactly as lm_eval's HF backend does."""

    tokenizer: Tokenizer
    add_bos: bool  # does transformers' `tokenizer.encode(text)` prepend BOS by default?
    prefix_id: int  # the context token for an empty context: BOS, else EOS

    @classmethod
    def for_model_dir(cls, model_dir: str | Path) -> "RequestEncoder":
        tok = Tokenizer.load(model_dir)
        prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        return cls(tok, tokenizer_adds_bos(tok, Path(model_dir)), prefix)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer.encode_batch(texts)
        if not self.add_bos:
            return ids
        # lm_eval skips special tokens for text that already starts with the BOS string.
        bos_text = self.tokenizer.id_to_token(self.prefix_id) or ""
        return [x if bos_text and t.startswith(bos_text) else [self.tokenizer.bos_id] + x for t, x in zip(texts, ids)]

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        out: list[tuple[list[int], list[int]] | None] = [None] * len(pairs)
        split: list[tuple[int, str, str]] = []
        for i, (context, continuation) in enumerate(pairs):
            if context == "":
                cont = self.tokenizer.encode(continuation)  # no special tokens here, as lm_eval
                out[i] = ([self.prefix_id], cont) if not cont or cont[0] != self.prefix_id else (cont[:1], cont[1:])
                continue
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            split.append((i, context, continuation))
        if split:
            whole = self._encode([c + k for _, c, k in split])
            ctx = self._encode([c for _, c, _ in split])
            for (i, _, _), w, c in zip(split, whole, ctx):
                out[i] = (c, w[len(c) :])
        return out  # type: ignore[return-value]


def tokenizer_adds_bos(tok: Tokenizer, model_dir: Path) -> bool:
    """Whether `transformers.AutoTokenizer.from_pretrained(model_dir).encode(text)` starts with BOS.

    transformers 5 follows tokenizer.json's post-processor for byte-level (GPT-2 style)
    tokenizers; its LLaMA tokenizer classes apply `add_bos_token` (default True) instead.
    """
    if tok.bos_id is None:
        return False
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    llama_class = str(config.get("tokenizer_class", "")).startswith("Llama")
    if tok.kind == "spm":
        return bool(config.get("add_bos_token", True))
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(tok.path))
    byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))
    if llama_class and not byte_level:
        return bool(config.get("add_bos_token", True))
    with_special = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return len(with_special) > len(plain) and with_special[0] == tok.bos_id


# --- packing one group of requests into one row -----------------------------------------------


@dataclass
class PackedGroup:
    """A group's requests in one row: the shared prefix (branch 0), then request r's own tokens (branch r+1)."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]
    scored: list[tuple[list[int], list[int]]]  # per request: (row indices whose logits score it, target tokens)


def pack_group(pairs: list[tuple[list[int], list[int]]], max_len: int) -> PackedGroup:
    # The model input of a request is (context + continuation)[-(max_len + 1):][:-1] (lm_eval's
    # left truncation); the logits at its last len(continuation) positions score the continuation.
    for _, cont in pairs:
        if len(cont) > max_len:
            raise SlmError(f"a continuation of {len(cont)} tokens does not fit the model's context of {max_len}")
    inputs = [(c + k)[-(max_len + 1) :][:-1] for c, k in pairs]
    shared = len(inputs[0])
    for inp in inputs[1:]:
        n = min(shared, len(inp))
        shared = next((i for i in range(n) if inp[i] != inputs[0][i]), n)
    tokens, positions, branch = list(inputs[0][:shared]), list(range(shared)), [0] * shared
    scored = []
    for r, (inp, (_, cont)) in enumerate(zip(inputs, pairs)):
        start = len(tokens)  # where this request's own tokens begin in the row
        own = inp[shared:]
        tokens += own
        positions += range(shared, len(inp))
        branch += [r + 1] * len(own)
        rows = [p if p < shared else start + p - shared for p in range(len(inp) - len(cont), len(inp))]
        scored.append((rows, cont))
    return PackedGroup(tokens, positions, branch, scored)


def _batch_tensors(groups: list[PackedGroup], pad_id: int):
    """Right-padded (B, T) tokens/positions and the (B, 1, T, T) block-causal mask (None if plain causal)."""
    T = max(len(g.tokens) for g in groups)
    tokens = torch.full((len(groups), T), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), T), dtype=torch.long)
    branch = torch.full((len(groups), T), -1, dtype=torch.long)  # padding: after every real token, unseen by them
    for b, g in enumerate(groups):
        n = len(g.tokens)
        tokens[b, :n] = torch.tensor(g.tokens)
        positions[b, :n] = torch.tensor(g.positions)
        positions[b, n:] = torch.arange(n, T)
        branch[b, :n] = torch.tensor(g.branch)
    if not any(max(g.branch, default=0) > 1 for g in groups):  # one request per row: plain causal attention
        return tokens, None, None
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = (branch[:, :, None] == branch[:, None, :]) | (branch[:, None, :] == 0)  # (B, Tq, Tk)
    return tokens, positions, (causal & same).unsqueeze(1)  # (B, 1, T, T)


_HEAD_CHUNK = 1024  # scored positions per vocabulary projection


@torch.inference_mode()
def score_groups(model, groups: list[PackedGroup]) -> list[list[tuple[float, bool]]]:
    """One forward over a batch of packed groups: (log-likelihood, is greedy) per request."""
    tokens, positions, mask = _batch_tensors(groups, pad_id=0)
    hidden = model(tokens, positions=positions, mask=mask, return_hidden=True)  # (B, T, D)
    T = tokens.shape[1]
    rows, targets, owners = [], [], []
    for b, g in enumerate(groups):
        for idx, cont in g.scored:
            rows += [b * T + i for i in idx]
            targets += cont
            owners.append((b, len(cont)))
    h = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(rows)]  # (N, D): the scored positions only
    targets_t = torch.tensor(targets)
    logprobs, greedy = [], []
    for s in range(0, len(rows), _HEAD_CHUNK):  # bounds the (rows, vocab) logits in memory
        logits = model.output(h[s : s + _HEAD_CHUNK]).float()  # (n, V)
        t = targets_t[s : s + _HEAD_CHUNK]
        logprobs.append(F.log_softmax(logits, dim=-1).gather(1, t[:, None]).squeeze(1))
        greedy.append(logits.argmax(dim=-1) == t)
    logprobs, greedy = torch.cat(logprobs), torch.cat(greedy)  # (N,)
    out: list[list[tuple[float, bool]]] = [[] for _ in groups]
    start = 0
    for b, n in owners:
        out[b].append((float(logprobs[start : start + n].sum()), bool(greedy[start : start + n].all())))
        start += n
    return out


def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches, longest first (as lm_eval: the first batch shows the peak memory).

    A batch holds up to `batch_size` rows and at most batch_size x (median length) padded tokens,
    so the few very long rows come a few at a time instead of padding a full batch to their length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    budget = batch_size * max(1, sorted(lengths)[len(lengths) // 2]) if lengths else 0
    batches: list[list[int]] = []
    for i in order:
        # Sorted longest first, so the batch's first row sets its padded length.
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def loglikelihoods(
    model,
    encoded: list[list[tuple[list[int], list[int]]]],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[tuple[float, bool]]]:
    """encoded: per group (e.g. per question), its requests as (context ids, continuation ids).

    Returns per group, per request: (sum of log-probabilities of the continuation, whether
    greedy decoding would produce exactly the continuation)."""
    from tqdm import tqdm

    max_len = model.config.max_seq_len
    packed = [pack_group(g, max_len) for g in encoded]
    results: list[list[tuple[float, bool]]] = [[] for _ in packed]
    with tqdm(total=len(packed), desc="log-likelihoods", unit="item", disable=not progress) as bar:
        for batch in make_batches([len(g.tokens) for g in packed], batch_size):
            for i, res in zip(batch, score_groups(model, [packed[i] for i in batch])):
                results[i] = res
            bar.update(len(batch))
    return results
