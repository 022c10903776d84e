"""The LLaMA-2 decoder: RMSNorm, rotary embeddings, SwiGLU, grouped-query attention.

Reads top to bottom. The model is pure: no files, no distribution, no sampling.

Two ways to run it:
- `model(tokens)`: full causal forward over (B, T) tokens (training, scoring).
- with a static KV cache (`model.setup_cache(...)`), `model(tokens, input_pos)`: the
  keys/values of `tokens` are written into the cache at positions `input_pos`, and each
  query attends to every cached position <= its own. Because the cache is written by
  position, a caller can "roll back" simply by writing new tokens over old positions
  (speculative decoding relies on this): nothing past the highest position in
  `input_pos` is ever read.

Weight layout follows gpt-fast: q/k/v are one fused projection (`wqkv`) and the SwiGLU
gate/up are one fused projection (`w13`), so a decode step issues 4 matmuls per layer
instead of 7. `slm.weights` maps these to and from Hugging Face tensor names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slm.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op: a decode step's time is mostly per-op overhead
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32 (as Hugging Face's LlamaRMSNorm does), then scale in the input dtype.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies, computed exactly as transformers' default RoPE does (bit-for-bit parity)."""
    hd = config.head_dim
    exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
    return 1.0 / (config.rope_theta**exponent)  # (hd/2,)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions.float()[..., None] * inv_freq  # (T, hd/2), or (B, T, hd/2) for per-row positions
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): the "rotate_half" (non-interleaved) layout of HF LLaMA
    emb = emb.unsqueeze(-2)  # (T, 1, hd) or (B, T, 1, hd): broadcast over the heads of (B, T, H, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, hd); cos/sin: (T, 1, hd) or (B, T, 1, hd).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Static cache written by position: `k[:, :, pos] = new_k`. Never shifted, never truncated."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, S, hd)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        # k, v: (B, Hkv, T, hd) written at positions input_pos (T,), or (B, T): each row at its own positions
        if input_pos.dim() == 2:
            index = input_pos[:, None, :, None].expand_as(k)  # (B, Hkv, T, hd)
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        else:
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
        # Only positions < kv_len can be visible to these queries; reading less is faster.
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows start..stop-1 of this one, sharing its memory (writes land here)."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.register_buffer("k", self.k[start:stop], persistent=False)
        view.register_buffer("v", self.v[start:stop], persistent=False)
        return view


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wqkv = nn.Linear(config.dim, q_size + 2 * kv_size, bias=False)
        self.wo = nn.Linear(q_size, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, kv_len=0, mask=None):
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, self.head_dim)  # (B, T, H + 2 Hkv, hd)
        # q and k rotate in one call: half the RoPE ops (a decode step's time is mostly per-op overhead).
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)  # (B, T, H + Hkv, hd)
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, Hkv, T, hd)
        v = qkv[:, :, H + Hkv :].transpose(1, 2)  # (B, Hkv, T, hd)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, kv_len)  # (B, Hkv, kv_len, hd)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=input_pos is None and mask is None,  # no cache, no mask: plain causal attention
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W1) * (x W3)), with W1 (gate) and W3 (up) fused as w13."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=False)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, input_pos=None, kv_len=0, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, input_pos, kv_len, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.cache_len = 0  # 0: no KV cache set up

    # --- initialisation -------------------------------------------------------------

    def init_buffers(self, device=None) -> None:
        """(Re)compute non-persistent buffers, e.g. after building on the meta device."""
        device = device or self.tok_embeddings.weight.device
        self.inv_freq = rope_inv_freq(self.config, device=device)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """AMD-135M's initialisation (GPT-NeoX "small init"): every linear and the embeddings
        ~ N(0, sqrt(2 / (5 d))); the projections that write into the residual stream (attention
        output, MLP down) use GPT-NeoX's "wang init" std 2 / (n_layers * sqrt(d)), so the
        residual's variance does not grow with depth."""
        d, L = self.config.dim, self.config.n_layers
        small = math.sqrt(2.0 / (5.0 * d))
        wang = 2.0 / (L * math.sqrt(d))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.normal_(0.0, wang, generator=generator)
            else:
                p.normal_(0.0, small, generator=generator)

    # --- KV cache -------------------------------------------------------------------

    def setup_cache(self, batch_size: int = 1, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        max_seq_len = max_seq_len or self.config.max_seq_len
        w = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch_size, max_seq_len, self.config.n_kv_heads, self.config.head_dim,
                dtype or w.dtype, device or w.device,
            )
        self.cache_len = max_seq_len

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_len = 0

    # --- forward --------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V).

        input_pos: (T,) positions of `tokens` in the KV cache (increasing); or (B, T), each row at its own
            positions (continuous batching: rows of one cache at different lengths); None runs without the cache.
        logits_to_keep: if > 0, compute logits for the last that many positions only (prefill needs 1).
        return_hidden: return the final normalised hidden states (B, T, D) instead of logits
            (for losses that never materialise the full logits).
        positions, mask: packed sequences without the cache (slm.eval shares one context among
            several continuations): positions (B, T) of each token and a boolean mask (B, 1, T, T),
            True where a query may attend to a key, replacing plain causal attention.
        """
        B, T = tokens.shape
        x = self.tok_embeddings(tokens)  # (B, T, D)
        kv_len = 0
        if input_pos is None:
            if positions is None:
                positions = torch.arange(T, device=tokens.device)
        else:
            if positions is not None or mask is not None:
                raise ValueError("positions/mask are for the no-cache path; with a cache, input_pos sets both")
            if not self.cache_len:
                raise RuntimeError("input_pos given but no KV cache: call setup_cache() first")
            positions = input_pos
            kv_len = int(input_pos.max() if input_pos.dim() == 2 else input_pos[-1]) + 1
            if kv_len > self.cache_len:
                raise RuntimeError(f"position {kv_len - 1} is beyond the KV cache length {self.cache_len}")
            if input_pos.dim() == 2:  # rows at different positions: each query sees its own row's positions <= its own
                mask = (torch.arange(kv_len, device=tokens.device) <= input_pos[..., None]).unsqueeze(1)  # (B, 1, T, kv_len)
            elif T > 1:  # query t sees cached positions <= input_pos[t]; a single query sees all kv_len
                mask = torch.arange(kv_len, device=tokens.device)[None, :] <= input_pos[:, None]  # (T, kv_len)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, kv_len, mask)
        x = self.norm(x)
        if return_hidden:
            return x
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.output(x)  # (B, T', V)
