"""A draft head that reads the frozen target's hidden states (EAGLE-3 style), with a trimmed vocabulary.

The head is one LLaMA decoder layer. At position t it reads the target's hidden states after a
few of its layers (low, middle, high: `tap_layers`), fused by `fc` (n_taps*d -> d), together
with the embedding of the next token x_{t+1} (the target's own embedding, frozen and shared,
never saved with the head), and predicts x_{t+2}. Its output layer covers only the
`draft_vocab` most frequent tokens of the target's outputs (FR-Spec); `d2t` maps them back to
target ids. The target still verifies over its full vocabulary, so output stays exact.

When drafting past the target's last verified position, the head has no target features: it
feeds its own output hidden state of the previous position instead (and the training unrolls
exactly that, "training-time test", see `FeatureHead.unroll`). A head with no taps
(`tap_layers=()`) is a one-layer standalone model on the target's embeddings: the ablation that
says how much the features are worth at equal cost.

A distilled draft directory holds `draft_head.json` (HeadConfig; its presence is what marks the
directory), `draft_head.safetensors` (head weights and d2t) and nothing of the target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from slm.atomic import replace_file, tmp_name, write_json
from slm.config import ModelConfig
from slm.errors import SlmError
from slm.model import FeedForward, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

HEAD_CONFIG = "draft_head.json"
HEAD_WEIGHTS = "draft_head.safetensors"
FORMAT = 2  # 2: tap_scale


@dataclass(frozen=True)
class HeadConfig:
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    max_seq_len: int
    target_vocab: int
    target_layers: int  # the target's depth (a check that the head serves the model it was made for)
    tap_layers: tuple[int, ...]  # target layers whose outputs are fused; () = no features
    draft_vocab: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tap_layers", tuple(int(i) for i in self.tap_layers))
        if any(not 0 <= i < self.target_layers for i in self.tap_layers):
            raise SlmError(f"draft head: tap layers {self.tap_layers} outside the target's {self.target_layers} layers")
        if not 0 < self.draft_vocab <= self.target_vocab:
            raise SlmError(f"draft head: draft_vocab {self.draft_vocab} must be in 1..{self.target_vocab}")

    @property
    def features(self) -> bool:
        return bool(self.tap_layers)

    def model_config(self) -> ModelConfig:
        """The shape of the head's one layer, as the target's decoder blocks take it."""
        return ModelConfig(name="draft-head", vocab_size=self.draft_vocab, n_layers=1, n_heads=self.n_heads,
                           n_kv_heads=self.n_kv_heads, dim=self.dim, ffn_dim=self.ffn_dim,
                           max_seq_len=self.max_seq_len, rope_theta=self.rope_theta, norm_eps=self.norm_eps)

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab: int, tap_layers: tuple[int, ...] | None = None) -> HeadConfig:
        """Default taps: low, middle, high (EAGLE-3: layers 2, L/2, L-3 of an L-layer target)."""
        L = target.n_layers
        if tap_layers is None:
            tap_layers = tuple(sorted({min(1, L - 1), L // 2, max(L - 3, 0)}))
        return cls(target.dim, target.n_heads, target.n_kv_heads, target.ffn_dim, target.norm_eps, target.rope_theta,
                   target.max_seq_len, target.vocab_size, L, tuple(tap_layers), draft_vocab)


def is_head_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def _attend(q, k, v, mask):
    """q (B, H, T, hd); k, v (B, Hkv, S, hd); mask (T, S) or (B, 1, T, S) bool -> (B, H, T, hd)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class FeatureHead(nn.Module):
    def __init__(self, config: HeadConfig, embedding: torch.Tensor):
        super().__init__()
        self.config = config
        d, mc = config.dim, config.model_config()
        self.n_heads, self.n_kv_heads, self.head_dim = mc.n_heads, mc.n_kv_heads, mc.head_dim
        self.fc = nn.Linear(len(config.tap_layers) * d, d, bias=False) if config.features else None
        if config.features:  # 1 / each tapped dimension's RMS over the training data (`set_tap_scale`)
            self.register_buffer("tap_scale", torch.ones(len(config.tap_layers) * d), persistent=True)
        self.emb_norm = RMSNorm(d, config.norm_eps)
        self.feat_norm = RMSNorm(d, config.norm_eps) if config.features else None
        self.fuse = nn.Linear(2 * d if config.features else d, d, bias=False)
        self.attention_norm = RMSNorm(d, config.norm_eps)
        self.wqkv = nn.Linear(d, (mc.n_heads + 2 * mc.n_kv_heads) * mc.head_dim, bias=False)
        self.wo = nn.Linear(mc.n_heads * mc.head_dim, d, bias=False)
        self.ffn_norm = RMSNorm(d, config.norm_eps)
        self.feed_forward = FeedForward(mc)
        self.norm = RMSNorm(d, config.norm_eps)
        self.output = nn.Linear(d, config.draft_vocab, bias=False)
        self.register_buffer("d2t", torch.arange(config.draft_vocab), persistent=True)  # draft index -> target id
        self.register_buffer("inv_freq", rope_inv_freq(mc), persistent=False)
        self.embedding = embedding.detach()  # the target's (V, d), shared, frozen: not a parameter
        self.k_cache = self.v_cache = None

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        std = math.sqrt(2.0 / (5.0 * self.config.dim))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std, generator=generator)

    # --- one layer over given inputs -----------------------------------------------------

    def _input(self, tokens: torch.Tensor, feature: torch.Tensor | None) -> torch.Tensor:
        """tokens (B, T) next-token ids; feature (B, T, d) or None -> layer input (B, T, d)."""
        e = self.emb_norm(F.embedding(tokens, self.embedding).to(self.emb_norm.weight.dtype))
        return self.fuse(torch.cat([e, self.feat_norm(feature)], -1) if self.fc is not None else e)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        qkv = self.wqkv(self.attention_norm(x)).view(B, T, H + 2 * Hkv, self.head_dim)  # (B, T, H+2Hkv, hd)
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd)
        return q, k, qkv[:, :, H + Hkv :].transpose(1, 2)

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual stream after attention output y (B, H, T, hd) -> the layer's output h (B, T, d)."""
        B, _, T, _ = y.shape
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        return x + self.feed_forward(self.ffn_norm(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h))  # (..., draft_vocab)

    def fuse_target(self, taps: torch.Tensor) -> torch.Tensor | None:
        """The target's concatenated tap outputs (B, T, n_taps*d) -> the head's feature (B, T, d)."""
        return self.fc(taps * self.tap_scale) if self.fc is not None else None

    @torch.no_grad()
    def set_tap_scale(self, taps: torch.Tensor) -> None:
        """Scale each tapped dimension to unit RMS over these features (N, n_taps*d). The target's
        middle and late layers carry a few massive dimensions (SmolLM2: one at RMS ~1750 where the
        median is 5-15), which would otherwise make fc's output nearly one constant direction."""
        if taps.shape[0] == 0:
            return
        rms = taps.float().pow(2).mean(0).sqrt()
        self.tap_scale.copy_(1.0 / rms.clamp_min(1e-3))

    # --- training: the unrolled draft ------------------------------------------------------

    def unroll(self, taps: torch.Tensor | None, next_tokens: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Training-time test. taps (B, T, n_taps*d) the target's features at positions 0..T-1 (None
        without features); next_tokens (B, T) x_{t+1}. Returns the output hidden states (B, T, d) of
        depths 0..depth-1: depth 0 reads the target's feature at t; depth j reads the head's own depth
        j-1 output at t-1, as when drafting the j-th token past the last verified position. Its query
        at t then sees what it would see in decoding: depth-0 keys at positions <= t-j and the depth-i
        key at position t-j+i (i = 1..j). Rows t < j have no such draft and are to be ignored."""
        B, T = next_tokens.shape
        pos = torch.arange(T, device=next_tokens.device)
        feature = self.fuse_target(taps) if taps is not None else None
        if self.fc is None:
            depth = 1  # without features every depth reads the same tokens: the same layer output
        x = self._input(next_tokens, feature)
        q, k0, v0 = self._qkv(x, pos)
        outs = [self._finish(x, _attend(q, k0, v0, pos[None, :] <= pos[:, None]))]
        keys, values = [], []
        for j in range(1, depth):
            prev = F.pad(outs[-1][:, :-1], (0, 0, 1, 0))  # (B, T, d): depth j-1's output at t-1
            x = self._input(next_tokens, prev)
            q, k, v = self._qkv(x, pos)
            keys.append(k)
            values.append(v)
            rep = self.n_heads // self.n_kv_heads
            scale = 1.0 / math.sqrt(self.head_dim)
            s0 = torch.einsum("bhtd,bhsd->bhts", q, k0.repeat_interleave(rep, 1)) * scale  # (B, H, T, T)
            s0 = s0.masked_fill(~(pos[None, :] <= pos[:, None] - j), float("-inf"))
            diag, vals = [], []
            for i in range(1, j + 1):
                shift = j - i  # the depth-i key of this query's draft sits `shift` positions back
                ki = F.pad(keys[i - 1], (0, 0, shift, 0))[:, :, :T].repeat_interleave(rep, 1)  # (B, H, T, hd)
                vi = F.pad(values[i - 1], (0, 0, shift, 0))[:, :, :T].repeat_interleave(rep, 1)
                si = (q * ki).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
                diag.append(si.masked_fill((pos < shift)[None, None, :, None], float("-inf")))
                vals.append(vi)
            w = torch.softmax(torch.cat([s0] + diag, -1), -1)  # (B, H, T, T + j)
            y = w[..., :T] @ v0.repeat_interleave(rep, 1)
            for i, vi in enumerate(vals):
                y = y + w[..., T + i : T + i + 1] * vi
            outs.append(self._finish(x, y))
        return outs

    # --- decoding: its own KV cache, written by position -----------------------------------

    def setup_cache(self, length: int) -> None:
        if self.k_cache is None or self.k_cache.shape[1] < length:
            w = self.attention_norm.weight  # (not a linear's: those may be `slm.native.NativeLinear`s)
            shape = (1, self.n_kv_heads, length, self.head_dim)
            self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
            self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def step(self, next_tokens: list[int], start: int, feature: torch.Tensor | None) -> torch.Tensor:
        """Feed positions start.. (x_{t+1} = next_tokens, feature (T, d) or None) -> output hidden (T, d)."""
        T = len(next_tokens)
        ids = torch.tensor([next_tokens], device=self.embedding.device)  # (1, T)
        pos = torch.arange(start, start + T, device=ids.device)  # (T,)
        x = self._input(ids, None if feature is None else feature[None])
        q, k, v = self._qkv(x, pos)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        end = start + T
        mask = torch.arange(end, device=ids.device)[None, :] <= pos[:, None]  # (T, end)
        y = _attend(q, self.k_cache[:, :, :end], self.v_cache[:, :, :end], mask)
        return self._finish(x, y)[0]


# --- files -----------------------------------------------------------------------------------


def save_head(head: FeatureHead, out: str | os.PathLike, extra: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tmp = tmp_name(out / HEAD_WEIGHTS)
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    replace_file(tmp, out / HEAD_WEIGHTS)
    cfg = dataclasses.asdict(head.config) | {"format": FORMAT, "kind": "feature-head"}
    write_json(out / HEAD_CONFIG, cfg | ({"distill": extra} if extra else {}))  # written last: marks the dir
    return out


def read_head_config(path: str | os.PathLike) -> HeadConfig:
    f = Path(path) / HEAD_CONFIG
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlmError(f"{f}: cannot read the draft head's config ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SlmError(f"{f}: not a draft head config of format {FORMAT}")
    names = {fl.name for fl in dataclasses.fields(HeadConfig)}
    missing = names - raw.keys()
    if missing:
        raise SlmError(f"{f}: missing fields {sorted(missing)}")
    try:
        return HeadConfig(**{k: raw[k] for k in names})
    except (TypeError, ValueError) as e:
        raise SlmError(f"{f}: bad draft head config ({e})") from None


def load_head(path: str | os.PathLike, embedding: torch.Tensor) -> FeatureHead:
    """A distilled draft directory -> FeatureHead on the target's embedding (V, d)."""
    config = read_head_config(path)
    if tuple(embedding.shape) != (config.target_vocab, config.dim):
        raise SlmError(f"draft {path}: made for a target with embedding ({config.target_vocab}, {config.dim}), "
                       f"this target's is {tuple(embedding.shape)}")
    head = FeatureHead(config, embedding)
    f = Path(path) / HEAD_WEIGHTS
    try:
        state = load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise SlmError(f"{f}: cannot read the draft head's weights ({e})") from None
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        bad = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise SlmError(f"{f}: tensors do not match the config ({bad})")
    d2t = state["d2t"]
    if d2t.numel() and not (0 <= int(d2t.min()) and int(d2t.max()) < config.target_vocab):
        raise SlmError(f"{f}: d2t maps outside the target's vocabulary")
    head.load_state_dict(state)
    return head.to(embedding.device).eval()
