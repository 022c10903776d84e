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
the vocabulary projection + log-softmax run once per distinct scored position only. Rows are
sorted longest first (as lm_eval does) and split into batches with the least padding.

The matrix products are the same kernels as lm_eval's (torch's default, MKL on CPU), so the
log-likelihoods agree to ~1e-5. oneDNN's prepacked weights (`slm.pack`)
would make them ~2x faster, but their rounding moved 130-token PIQA sums by up to 2e-4.
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


_HEAD_CHUNK = 256  # scored positions per vocabulary projection: (256, V) fp32 logits stay ~50 MB


def _score_rows(model, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor):
    """log P(target) and whether target is the argmax, for (flat row index, target) pairs.

    Several pairs can read the same row (the last context token conditions every choice; choices
    that begin alike share their first positions). The vocabulary projection, a sixth of the
    work, runs once per distinct row and its logits serve every pair that reads it."""
    unique, which = torch.unique(rows, return_inverse=True)  # which: (N,) index into unique
    h = hidden.reshape(-1, hidden.shape[-1])[unique]  # (U, D)
    logprob = torch.empty(len(rows))
    greedy = torch.empty(len(rows), dtype=torch.bool)
    for s in range(0, len(unique), _HEAD_CHUNK):  # bounds the (rows, vocab) logits in memory
        logits = model.output(h[s : s + _HEAD_CHUNK]).float()  # (n, V)
        pairs = ((which >= s) & (which < s + _HEAD_CHUNK)).nonzero().squeeze(1)  # (P,): pairs reading these rows
        local, t = which[pairs] - s, targets[pairs]
        # torch's log_softmax kernel, as lm_eval uses: logit - logsumexp computed apart rounds
        # differently and drifted by 9e-4 from it over a 130-token PIQA continuation.
        logprob[pairs] = F.log_softmax(logits, dim=-1)[local, t]
        greedy[pairs] = logits.argmax(dim=-1)[local] == t  # argmax: the first of ties, as lm_eval
    return logprob, greedy


@torch.inference_mode()
def score_groups(model, groups: list[PackedGroup]) -> list[list[tuple[float, bool]]]:
    """One forward over a batch of packed groups: (log-likelihood, is greedy) per request."""
    tokens, positions, mask = _batch_tensors(groups, pad_id=0)
    hidden = model(tokens, positions=positions, mask=mask, return_hidden=True)  # (B, T, D)
    T = tokens.shape[1]
    rows, targets, sizes = [], [], []
    for b, g in enumerate(groups):
        for idx, cont in g.scored:
            rows += [b * T + i for i in idx]
            targets += cont
            sizes.append(len(cont))
    logprob, greedy = _score_rows(model, hidden, torch.tensor(rows, dtype=torch.long),
                                  torch.tensor(targets, dtype=torch.long))
    per_request = [(float(lp.sum()), bool(gr.all())) for lp, gr in zip(logprob.split(sizes), greedy.split(sizes))]
    out, start = [], 0
    for g in groups:
        out.append(per_request[start : start + len(g.scored)])
        start += len(g.scored)
    return out


# Fixed cost of one forward (dispatching ~500 small ops), in padded-token equivalents: at ~100
# GFLOP/s one token of a 135M model costs ~2 ms, a forward's fixed cost ~10-20 ms.
_FORWARD_COST_TOKENS = 8


def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Group indices into batches of at most `batch_size` rows, longest first (as lm_eval: the
    first batch shows the peak memory), with the least total work.

    Every row of a batch is padded to its longest, and padding costs as much as real tokens
    while a forward's fixed cost is a few tokens: with rows sorted by length, the cheapest
    split into consecutive runs (padded tokens + a fixed cost per forward) is found by dynamic
    programming, so a long row does not pad a full batch and similar lengths share a forward.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    ls = [lengths[i] for i in order]
    n = len(ls)
    # best[j]: least cost of rows order[:j]; start[j]: where the last batch of that split begins.
    best, start = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], start[j] = min(
            (best[i] + (j - i) * ls[i] + _FORWARD_COST_TOKENS, i) for i in range(max(0, j - batch_size), j)
        )
    batches, j = [], n
    while j:
        batches.append(order[start[j] : j])
        j = start[j]
    return batches[::-1]


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
