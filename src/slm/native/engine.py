"""`decoder(model)`: the fastest way this machine has to run a `Transformer`'s cached forward.

`NativeDecoder` is a drop-in for `model(tokens, input_pos, logits_to_keep=...)` on the KV-cache
path: small calls (decode steps, speculative verification, batched server steps: up to MAX_ROWS
query rows) run in slm's native kernels (kernels.cpp) over the model's own KV cache and over copies
of its weights (fp32, or the int8/int4 layers of `slm.quantize`) laid out in the order the kernels
stream them; a short prompt's prefill (up to PREFILL_ROWS rows) runs there too, in calls of MAX_ROWS;
a longer one runs the model itself, whose large matmuls PyTorch does better. Both write the same
cache, so they mix freely. The model file stays pure: this is an executor beside it, like
`slm.pack`, and `tests/test_native.py` holds it to the model's logits.

A feature draft's tap (`slm.speculative.features.FeatureTap`) reads the outputs of some decoder
blocks through forward hooks. Its hooks carry a `native_tap` attribute (the tap), which tells the
decoder it may run natively anyway: the kernels return the residual stream after the tapped layers
and the tap stores it as its hooks would (`native_out`, `native_keep`). Any other forward hook, or
more than one tap, needs the eager forward and gets it.

A model it cannot run (another dtype or device, unknown forward hooks, shapes the kernels do not
take) runs eagerly, packed (`slm.pack`), exactly as before.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from collections.abc import Callable

import torch
from torch import nn

from slm.errors import SlmError
from slm.model import Transformer
from slm.native.build import library
from slm.pack import pack
from slm.quantize import Int4Linear, Int8Linear
from slm.threads import native_threads

MAX_ROWS = 32  # query rows in one native call
# A prefill of up to this many rows runs natively, in calls of at most MAX_ROWS rows; a longer one runs
# the model itself. Measured (SmolLM2, 2 threads, benchmarks/README.md): native 1.40x / 1.21x PyTorch's
# GEMMs at 45 / 64 rows, 0.81x at 128 (MKL's larger tiles win as rows grow).
PREFILL_ROWS = 96
_c_int, _c_void = ctypes.c_int32, ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("kind", _c_int), ("n", _c_int), ("k", _c_int), ("pad", _c_int),
                ("w", _c_void), ("s", _c_void), ("sm", _c_void)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _c_void), ("ffn_norm", _c_void), ("wqkv", _Lin), ("wo", _Lin), ("w13", _Lin), ("w2", _Lin)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", _c_int), ("dim", _c_int), ("n_heads", _c_int), ("n_kv", _c_int), ("head_dim", _c_int),
                ("ffn", _c_int), ("vocab", _c_int), ("cache_len", _c_int), ("cache_rows", _c_int), ("pad", _c_int),
                ("eps", ctypes.c_float), ("pad2", ctypes.c_float), ("inv_freq", _c_void), ("embed", _c_void),
                ("norm", _c_void), ("out", _Lin), ("layers", _c_void), ("kc", _c_void), ("vc", _c_void),
                ("cache_row_stride", ctypes.c_int64)]


class Unsupported(Exception):
    """The model has something the native kernels do not run (the reason is the message)."""


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise Unsupported(f"{what} is {t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    return t


GROUP = 4  # output features interleaved in the kernels' weights (kernels.cpp, `Lin`)


def _interleave(w: torch.Tensor, block: int) -> torch.Tensor:
    """w (n, m) -> the kernels' layout of it: the rows in groups of GROUP (the last padded with zero
    rows), each group as block 0 of its rows in turn, then block 1 of each, ..., then the rows' tails
    (m % block elements each). A tile of GROUP output features then streams one run of memory, which
    this CPU's prefetchers follow better than GROUP rows read side by side (kernels.cpp, `Lin`)."""
    n, m = w.shape
    groups, whole, full = -(-n // GROUP), n // GROUP, m // block * block
    out = w.new_zeros(groups, GROUP * m)  # written in place below: each element is copied once
    blocks = out[:, : GROUP * full].view(groups, full // block, GROUP, block)  # (G, m/block, GROUP, block)
    tails = out[:, GROUP * full :].view(groups, GROUP, m - full)  # (G, GROUP, m % block)
    for g0, g1, r in ((0, whole, GROUP), (whole, groups, n - whole * GROUP)):  # whole groups, then a last partial one
        if g1 > g0:
            src = w[g0 * GROUP : n if g1 == groups else g1 * GROUP].view(g1 - g0, r, m)  # (G', r, m)
            blocks[g0:g1, :, :r] = src[:, :, :full].unflatten(2, (full // block, block)).transpose(1, 2)
            tails[g0:g1, :r] = src[:, :, full:]
    return out


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """A per-feature tensor (n, ...) with zero rows for the padding features of the last group."""
    padded = -(-t.shape[0] // GROUP) * GROUP
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])]).contiguous()


def _linear(m: nn.Module, keep: list, what: str) -> _Lin:
    """The kernels' description of one linear layer, over interleaved copies of its weights (fp32: a
    second copy of the model's weights, which PyTorch's path still reads); they are appended to `keep`."""
    if isinstance(m, nn.Linear) and m.bias is None:
        w = _interleave(_f32(m.weight.detach(), what), 8)
        keep.append(w)
        return _Lin(0, m.out_features, m.in_features, 0, w.data_ptr(), None, None)
    if isinstance(m, Int8Linear) and m.in_features % 32 == 0:
        w, scales = _interleave(m.qweight, 32), _pad_rows(m.scales.float())  # (out,) bf16 -> fp32
        keep += [w, scales]
        return _Lin(1, m.out_features, m.in_features, 0, w.data_ptr(), scales.data_ptr(), None)
    if isinstance(m, Int4Linear):
        codes, scale_min = _interleave(m.codes, 32), _pad_rows(m.scale_min)  # 32 bytes: a pair of 32-blocks
        keep += [codes, scale_min]
        return _Lin(2, m.out_features, m.in_features, 0, codes.data_ptr(), None, scale_min.data_ptr())
    raise Unsupported(f"{what} is a {type(m).__name__}")


class NativeLinear(nn.Module):
    """A linear layer (nn.Linear, Int8Linear, Int4Linear) run by the kernels' `slm_linear`: x (..., k) ->
    (..., n) fp32. Inference only (no autograd): for layers outside the Transformers `NativeDecoder` runs,
    such as a feature draft's head. Threads: a pinned count (`--threads N`), else one: a layer this small
    gains little from a second thread, which on a busy core would hold the first at the region's end."""

    def __init__(self, m: nn.Module, lib: ctypes.CDLL):
        super().__init__()
        self.inner, self.lib, self.keep = m, lib, []  # inner: its tensors stay alive, its state visible
        self.lin = _linear(m, self.keep, type(m).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.lin.k:
            raise SlmError(f"native linear: input of shape {tuple(x.shape)}, expected (..., {self.lin.k})")
        rows = _f32(x.detach().float().reshape(-1, self.lin.k).contiguous(), "the input")  # (R, k)
        y = torch.empty(rows.shape[0], self.lin.n, dtype=torch.float32)
        threads, adaptive = native_threads()
        if rows.shape[0] and self.lib.slm_linear(ctypes.byref(self.lin), rows.shape[0], rows.data_ptr(), y.data_ptr(),
                                                 1 if adaptive else threads) != 0:
            raise SlmError(f"native linear: {type(self.inner).__name__} of {self.lin.k} inputs: the kernels need a "
                           "multiple of 32")
        return y.view(*x.shape[:-1], self.lin.n)


def run_linear(lib: ctypes.CDLL, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One linear layer (nn.Linear, Int8Linear, Int4Linear) through the native kernels: x (R, k) -> (R, n)."""
    if x.dim() != 2:
        raise SlmError(f"native linear: input of shape {tuple(x.shape)}, expected (rows, features)")
    return NativeLinear(m, lib)(x)


_EAGER = object()


def _tap(model: Transformer):
    """The tap whose hooks are all the model's (None: no hooks), or _EAGER when some hook must see the
    eager forward: one that is not a tap's (`native_tap`), a global one, or those of two taps."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return _EAGER
    taps = set()
    for m in (model, *model.layers._modules.values()):
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for hook in hooks.values():
                taps.add(getattr(hook, "native_tap", _EAGER))
    if len(taps) > 1 or _EAGER in taps:
        return _EAGER
    return taps.pop() if taps else None


class ThreadChooser:
    """How many threads the next native call runs on: the count with the lowest measured cost per
    single-row call (a decode step), among max, max/2, ..., 1; each other count is re-measured now
    and then (after EXPLORE calls, backing off up to 8x while it keeps losing by far).

    Why: the kernels' threads meet at a barrier about ten times per layer. When another process takes
    a core, the thread that lost it holds the others at every barrier: measured on 2 cores with two
    background processes, 2 threads ran a SmolLM2 step in 164-570 ms against 43 ms on 1 thread, while
    on an idle machine 2 threads are ~1.7x faster than 1. So the count follows measurement, and a
    machine that gets busy (or quiet) mid-run is noticed within a few dozen steps. Used unless the
    count was pinned (`--threads N`: `slm.threads.native_threads`)."""

    EXPLORE = 48
    ALPHA = 0.3  # weight of a new measurement in the running cost of the count in use

    def __init__(self):
        self.cost: dict[int, float] = {}
        self.seen: dict[int, int] = {}  # count -> the call at which it was last measured
        self.wait: dict[int, int] = {}  # count -> calls between its re-measurements
        self.calls = 0

    @staticmethod
    def candidates(max_threads: int) -> list[int]:
        out, t = [], max(1, max_threads)
        while t >= 1 and t not in out:
            out.append(t)
            t //= 2
        return out

    def pick(self, max_threads: int) -> int:
        self.calls += 1
        cands = self.candidates(max_threads)
        unmeasured = [t for t in cands if t not in self.cost]
        if unmeasured:
            return unmeasured[0]
        best = min(cands, key=self.cost.__getitem__)
        due = [t for t in cands if t != best and self.calls - self.seen[t] >= self.wait.get(t, self.EXPLORE)]
        return due[0] if due else best

    def record(self, threads: int, seconds: float) -> None:
        """A running average while a count is in use; a count measured again after a while (a probe)
        starts afresh, since what it cost back then says little about the machine now."""
        old = self.cost.get(threads)
        probe = old is None or self.calls - self.seen.get(threads, -1) > 1
        self.cost[threads] = seconds if probe else (1 - self.ALPHA) * old + self.ALPHA * seconds
        self.seen[threads] = self.calls
        if probe:
            best = min(self.cost.values())
            lost_by_far = seconds > 1.5 * best
            self.wait[threads] = min(8 * self.EXPLORE, 2 * self.wait.get(threads, self.EXPLORE)) if lost_by_far \
                else self.EXPLORE


class NativeDecoder:
    """`model`'s cached forward in the native kernels (see the module docstring)."""

    def __init__(self, model: Transformer, lib: ctypes.CDLL):
        c = model.config
        if c.n_heads % c.n_kv_heads or c.head_dim % 2:
            raise Unsupported("head layout")
        self._model = weakref.ref(model)  # held by the caller; a strong reference here would keep `_decoders` alive
        self.lib, self.keep = lib, []
        emb = _f32(model.tok_embeddings.weight.detach(), "the token embedding")
        inv_freq = _f32(model.inv_freq.float().contiguous(), "inv_freq")
        norm = _f32(model.norm.weight.detach(), "the final norm")
        self.keep += [emb, inv_freq, norm]
        layers = (_Layer * c.n_layers)()
        for i, block in enumerate(model.layers):
            an = _f32(block.attention_norm.weight.detach(), f"layer {i} attention_norm")
            fn = _f32(block.ffn_norm.weight.detach(), f"layer {i} ffn_norm")
            self.keep += [an, fn]
            layers[i] = _Layer(an.data_ptr(), fn.data_ptr(),
                               *(_linear(m, self.keep, f"layer {i} {name}") for name, m in (
                                   ("wqkv", block.attention.wqkv), ("wo", block.attention.wo),
                                   ("w13", block.feed_forward.w13), ("w2", block.feed_forward.w2))))
        self.layers = layers
        self.kc = (ctypes.c_void_p * c.n_layers)()
        self.vc = (ctypes.c_void_p * c.n_layers)()
        self.desc = _Model(c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size, 0, 0, 0,
                           c.norm_eps, 0.0, inv_freq.data_ptr(), emb.data_ptr(), norm.data_ptr(),
                           _linear(model.output, self.keep, "the output layer"), ctypes.addressof(layers),
                           ctypes.addressof(self.kc), ctypes.addressof(self.vc), 0)
        self.attentions = [block.attention for block in model.layers]
        self.caches: list = []
        self.stamp = _stamp(model)
        self.threads = ThreadChooser()

    @property
    def model(self) -> Transformer:
        return self._model()

    def _bind_caches(self) -> None:
        """Point the kernels at the model's current KV caches (the server swaps row views in and out)."""
        caches = [att._modules["kv_cache"] for att in self.attentions]  # (nn.Module.__getattr__ is slow)
        if len(caches) == len(self.caches) and all(a is b for a, b in zip(caches, self.caches)):
            return
        if any(cache is None for cache in caches):
            raise RuntimeError("input_pos given but no KV cache: call setup_cache() first")
        k0 = caches[0].k
        rows, _, length, _ = k0.shape  # (B, Hkv, S, hd)
        for i, cache in enumerate(caches):
            for t in (cache.k, cache.v):
                if t.dtype != torch.float32 or t.shape != k0.shape or t.stride() != k0.stride() or not t[0].is_contiguous():
                    raise Unsupported("the KV cache layout")
            self.kc[i], self.vc[i] = cache.k.data_ptr(), cache.v.data_ptr()
        self.desc.cache_rows, self.desc.cache_len, self.desc.cache_row_stride = rows, length, k0.stride(0)
        self.caches = caches

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, *, logits_to_keep: int = 0) -> torch.Tensor:
        """As `Transformer.forward(tokens, input_pos, logits_to_keep=...)` with a cache: (B, T) -> (B, T', V)."""
        B, T = tokens.shape
        model = self.model
        keep = min(logits_to_keep, T) if logits_to_keep else T
        tap = _EAGER if B * T > PREFILL_ROWS or B > MAX_ROWS or torch.is_grad_enabled() else _tap(model)
        if tap is _EAGER:
            return model(tokens, input_pos, logits_to_keep=logits_to_keep)
        if B * T <= MAX_ROWS:
            return self._forward(tokens, input_pos, keep, tap)
        # A prompt's prefill: consecutive calls of at most MAX_ROWS rows, as equal as can be, each
        # keeping the logits of those of the last `keep` positions it holds.
        chunks = -(-T // (MAX_ROWS // B))  # each call holds at most MAX_ROWS // B positions of every row
        size = -(-T // chunks)
        out, caught = [], []
        for a in range(0, T, size):
            b = min(a + size, T)
            out.append(self._forward(tokens[:, a:b], input_pos[..., a:b], max(0, b - max(a, T - keep)), tap))
            if tap is not None and tap.buffer is None:  # a tap that keeps one forward's outputs: each call's
                caught.append(tap.take())               # part, handed back below as the whole forward's
        if caught:
            tap.put(torch.cat(caught, dim=1))
        return torch.cat(out, dim=1)

    def _forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, keep: int, tap) -> torch.Tensor:
        """One native call (B*T <= MAX_ROWS rows) -> the logits of each row's last `keep` positions
        (B, keep, V); keep may be 0."""
        B, T = tokens.shape
        self._bind_caches()
        taps = tap.native_out(B, input_pos) if tap is not None else None  # (B*T, n_taps*dim) fp32, or None
        pos = input_pos.tolist()
        pos = pos * B if input_pos.dim() == 1 else [p for row in pos for p in row]  # row r = (b, t)
        logits = self._call(tokens.reshape(-1).tolist(), [b for b in range(B) for _ in range(T)], pos,
                            [b * T + t for b in range(B) for t in range(T - keep, T)],
                            tap.layers if taps is not None else (), taps)
        if taps is not None:
            tap.native_keep(taps, B, input_pos)
        return logits.view(B, keep, self.desc.vocab)

    def segments(self, segs: list[tuple[int, list[int], int]], keep: list[int]) -> list[torch.Tensor]:
        """A ragged step over several cache rows: segment i is the tokens segs[i][1] of cache row segs[i][0]
        at positions segs[i][2].. (a new request's prompt, a running one's pending token and drafts), and
        its last keep[i] positions' logits come back, (keep[i], V) each. Rows of the cache not named are
        not computed. Runs in calls of at most MAX_ROWS rows, as equal as can be; a segment cut across
        calls goes in order, so later positions see the earlier ones' keys and values. Only for a model
        without forward hooks (`runs_segments`); each row's logits are those of any other call shape
        (batch invariance, kernels.cpp)."""
        if len(keep) != len(segs):
            raise SlmError(f"native forward: {len(segs)} segments but {len(keep)} logit counts")
        self._bind_caches()  # (the cache's length, checked below)
        for (seq, toks, start), k in zip(segs, keep):
            if not toks or not 0 <= start <= start + len(toks) <= self.desc.cache_len or not 0 <= k <= len(toks):
                raise SlmError(f"native forward: segment of {len(toks)} tokens at position {start} of cache row {seq} "
                               f"keeping {k} logits, cache length {self.desc.cache_len}")
        flat = [(seq, tok, start + i, i >= len(toks) - k)
                for (seq, toks, start), k in zip(segs, keep) for i, tok in enumerate(toks)]
        calls = -(-len(flat) // MAX_ROWS)
        size = -(-len(flat) // max(1, calls))
        out = []
        for a in range(0, len(flat), size):
            part = flat[a : a + size]
            out.append(self._call([f[1] for f in part], [f[0] for f in part], [f[2] for f in part],
                                  [i for i, f in enumerate(part) if f[3]], (), None))
        logits = torch.cat(out) if out else torch.empty(0, self.desc.vocab)
        return list(logits.split(keep))

    @property
    def runs_segments(self) -> bool:
        """Whether `segments` may run now: no forward hook would miss the call (it feeds no tap)."""
        return _tap(self.model) is None

    @property
    def runs_natively(self) -> bool:
        """Whether calls of up to PREFILL_ROWS rows run in the kernels now (no hook needs the eager forward)."""
        return _tap(self.model) is not _EAGER

    def _call(self, tokens: list[int], seqs: list[int], pos: list[int], logit_rows: list[int], tap_layers, taps
              ) -> torch.Tensor:
        """slm_forward over flat rows (token, cache row, position) -> logits (len(logit_rows), V)."""
        n = len(tokens)
        logits = torch.empty(len(logit_rows), self.desc.vocab, dtype=torch.float32)
        arr = ctypes.c_int64 * n
        most, adaptive = native_threads()
        threads = self.threads.pick(most) if adaptive else most
        t0 = time.perf_counter()
        rc = self.lib.slm_forward(
            ctypes.byref(self.desc), n, arr(*tokens), arr(*seqs), arr(*pos), len(logit_rows),
            (ctypes.c_int64 * len(logit_rows))(*logit_rows), logits.data_ptr(),
            len(tap_layers), (_c_int * len(tap_layers))(*tap_layers), None if taps is None else taps.data_ptr(), threads)
        if n == 1:
            self.threads.record(threads, time.perf_counter() - t0)
        if rc != 0:
            what = {-1: "a token id outside the vocabulary", -2: "a batch row beyond the KV cache",
                    -3: f"a position beyond the KV cache length {self.desc.cache_len}",
                    -5: f"a tapped layer outside 0..{self.desc.n_layers - 1}"}.get(rc, f"bad arguments ({rc})")
            raise SlmError(f"native forward: {what}")
        return logits


def _version(t: torch.Tensor) -> int:
    try:
        return t._version  # bumped by every in-place change (an optimizer step, `mul_`)
    except RuntimeError:  # an inference tensor: it keeps no version, and cannot be changed outside inference mode
        return -1


def _stamp(model: Transformer) -> tuple:
    """Which tensors, in which versions, a decoder was built over: its weights are copies, so a replaced
    parameter or layer, or a weight changed in place, makes a new one."""
    tensors = [*model.parameters(), *(b for name, b in model.named_buffers() if ".kv_cache." not in name)]
    return tuple((id(t), t.data_ptr(), _version(t)) for t in tensors)


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder(model: Transformer) -> Callable[..., torch.Tensor]:
    """A callable like `model(tokens, input_pos, logits_to_keep=...)` for cached decoding: the native
    kernels when they run here and take this model, else the model itself with its linears packed."""
    lib = library()
    if lib is not None:
        cached = _decoders.get(model)
        if cached is not None and cached.stamp == _stamp(model):
            return cached
        try:
            _decoders[model] = NativeDecoder(model, lib)
            return _decoders[model]
        except Unsupported:
            _decoders.pop(model, None)
    return pack(model)


def decode_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of a sequence (T,) as decoding computes them: through `decoder(model)` over a
    fresh KV cache, in calls of at most MAX_ROWS tokens (each one a decode or verify step's shape).
    What perplexity under `slm generate --quantize` must be measured with."""
    model.setup_cache(1, len(tokens))
    run = decoder(model)
    with torch.inference_mode():
        return torch.cat([run(tokens[None, i : i + MAX_ROWS], torch.arange(i, min(i + MAX_ROWS, len(tokens))))[0]
                          for i in range(0, len(tokens), MAX_ROWS)])
