"""The target's hidden states as a draft's input: a tap on chosen layers, and the draft that reads it.

`FeatureTap` keeps the model file pure: forward hooks on the chosen decoder layers copy their
outputs out, either into a buffer indexed by position (decoding: every target forward, the
prefill and each verify round, writes the positions it scored, so rejected positions are simply
written over later, like the KV cache) or into a list for one batched forward (distillation).

`FeatureDraft` is a distilled head (`slm.speculative.head`) as a `Draft`. The target's verify
forward already computes the features of every position it keeps, so the head never needs a
forward of its own over the target: each round it feeds the positions verified since its last
round (true features), then drafts on its own output hidden states.
"""

from __future__ import annotations

import copy
import time

import torch

from slm.errors import SlmError
from slm.model import Transformer
from slm.native import library
from slm.native.engine import NativeLinear, Unsupported
from slm.quantize import Int8Linear
from slm.sampling import SamplingParams, argmax, logits_to_probs, sample
from slm.speculative.drafts import Draft, Proposal, roll_out, timed_proposal
from slm.speculative.head import FeatureHead
from slm.speculative.lm import is_transformers_model
from slm.speculative.schedule import Offer, Plan


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of an slm Transformer or a transformers LLaMA-like causal LM."""
    if isinstance(model, Transformer):
        return model.layers
    inner = getattr(model, "model", None)
    if is_transformers_model(model) and inner is not None and hasattr(inner, "layers"):
        return inner.layers
    raise SlmError(f"cannot find the decoder layers of a {type(model).__name__}: a distilled draft needs them")


def input_embedding(model) -> torch.Tensor:
    """The target's token embedding matrix (V, d)."""
    if isinstance(model, Transformer):
        return model.tok_embeddings.weight
    return model.get_input_embeddings().weight


def _positions(model, args, kwargs) -> torch.Tensor | None:
    if isinstance(model, Transformer):
        return args[1] if len(args) > 1 else kwargs.get("input_pos")
    pos = kwargs.get("position_ids")
    return None if pos is None else pos[0]


class FeatureTap:
    """Copies the outputs of `layers` of `model` on every forward (hooks; the model is untouched).

    Its hooks are marked (`native_tap`): `slm.native.decoder` then runs the model natively anyway,
    has the kernels return the tapped layers' outputs, and hands them to `native_keep`, which stores
    them exactly as the hooks do."""

    def __init__(self, model, layers: tuple[int, ...]):
        self.model, self.layers = model, tuple(layers)
        self.buffer: torch.Tensor | None = None  # (S, n_taps * d) by position, while decoding
        self.captured: list[torch.Tensor | None] = [None] * len(self.layers)
        self._pos: torch.Tensor | None = None
        self.blocks = decoder_layers(model)
        self.handles = []
        self.attach()

    def attach(self) -> None:
        """Install the hooks (again, after `remove`)."""
        if self.handles:
            return

        def on_model(module, args, kwargs):
            self._pos = _positions(module, args, kwargs)

        hooks = [self._hook(slot) for slot in range(len(self.layers))]
        for hook in (on_model, *hooks):
            hook.native_tap = self  # the native decoder may stand in for these hooks (class docstring)
        self.handles = [self.model.register_forward_pre_hook(on_model, with_kwargs=True)]
        self.handles += [self.blocks[i].register_forward_hook(hook) for i, hook in zip(self.layers, hooks)]

    def _hook(self, slot: int):
        def hook(module, args, out):
            self._keep(slot, out[0] if isinstance(out, tuple) else out, self._pos)
        return hook

    def _wanted(self, batch: int, pos: torch.Tensor | None) -> bool:
        """Whether the buffer keeps anything of a forward of `batch` rows at positions `pos`: decoding
        always passes positions (a KV cache) and one row; a forward without is someone else's."""
        return pos is not None and batch == 1 and int(pos.reshape(-1)[-1]) < self.buffer.shape[0]

    def _keep(self, slot: int, out: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Store layer `slot`'s output out (B, T, d) of a forward at positions pos."""
        if self.buffer is None:
            self.captured[slot] = out
        elif self._wanted(out.shape[0], pos):
            d = out.shape[-1]
            self.buffer[pos, slot * d : (slot + 1) * d] = out[0].to(self.buffer.dtype)

    def native_out(self, batch: int, pos: torch.Tensor) -> torch.Tensor | None:
        """Where a native forward of `batch` rows at positions `pos` (T,) writes the tapped outputs,
        (batch*T, n_taps*d) fp32: the buffer's own rows when they can be (nothing to copy after);
        None when the hooks would keep nothing of this forward."""
        T, width = pos.shape[-1], len(self.layers) * self.model.config.dim
        if self.buffer is not None and not self._wanted(batch, pos):
            return None
        at = pos.reshape(-1).tolist()
        if self.buffer is not None and self.buffer.dtype == torch.float32 and at == list(range(at[0], at[0] + T)):
            return self.buffer[at[0] : at[0] + T]  # (T, n_taps*d): consecutive rows of the contiguous buffer
        return torch.empty(batch * T, width)

    def native_keep(self, out: torch.Tensor, batch: int, pos: torch.Tensor) -> None:
        """After the native forward that filled `out` (from `native_out`): store it as the hooks would."""
        if self.buffer is not None and out.untyped_storage().data_ptr() == self.buffer.untyped_storage().data_ptr():
            return  # written in place (inference tensors keep no `_base` to ask)
        feats = out.view(batch, pos.shape[-1], len(self.layers), -1)  # (B, T, n_taps, d)
        for slot in range(len(self.layers)):
            self._keep(slot, feats[:, :, slot], pos)

    def start(self, length: int, dim: int, dtype, device) -> None:
        """Decoding: collect by position, up to `length` positions."""
        if self.buffer is None or self.buffer.shape[0] < length:
            self.buffer = torch.zeros(length, len(self.layers) * dim, dtype=dtype, device=device)

    def take(self) -> torch.Tensor:
        """After one batched forward (no buffer): the tapped outputs concatenated (B, T, n_taps * d)."""
        out = torch.cat(self.captured, -1)
        self.captured = [None] * len(self.layers)
        return out

    def put(self, feats: torch.Tensor) -> None:
        """Hold feats (B, T, n_taps * d) as one batched forward's outputs, for `take` (a native prefill
        run as several calls hands its parts back joined)."""
        self.captured = list(feats.split(feats.shape[-1] // len(self.layers), dim=-1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def int8_head(head: FeatureHead) -> FeatureHead:
    """A copy of `head` for decoding whose linear layers run int8 in the native kernels (weights int8 per
    output channel, activations int8 in blocks of 32). Why: a drafted token's head step is bound by reading
    its weights (8.9M for SmolLM2's head): 3.3 ms per drafted token in fp32 PyTorch, 1.6 ms this way (1
    thread), at the same held-out acceptance (0.418 / 0.387 / 0.349 / 0.327 fp32, 0.418 / 0.386 / 0.349 /
    0.326 int8, the session-5 draft; `benchmarks/draft_cost.py`). The head itself (training, saving) is
    untouched. Without the kernels, for a head not fp32 on the CPU, or for a layer they do not take: fp32."""
    w = head.norm.weight
    lib = library()
    if lib is None or w.dtype != torch.float32 or w.device.type != "cpu":
        return head
    out = copy.deepcopy(head, memo={id(head.embedding): head.embedding})  # the target's embedding stays shared
    for parent, name in ((out, "fc"), (out, "fuse"), (out, "wqkv"), (out, "wo"), (out.feed_forward, "w13"),
                         (out.feed_forward, "w2"), (out, "output")):
        m = getattr(parent, name)
        if m is not None:
            try:
                setattr(parent, name, NativeLinear(Int8Linear.from_float(m.weight), lib))
            except Unsupported:
                pass
    return out


class FeatureDraft(Draft):
    """A distilled head reading the target's features (or, with no taps, a one-layer standalone
    model on the target's embeddings), drafting over its trimmed vocabulary mapped to target ids."""

    def __init__(self, head: FeatureHead, target_model):
        super().__init__()
        self.head, self.target_model = head.eval(), target_model
        self.target_vocab = head.config.target_vocab
        self.tap = FeatureTap(target_model, head.config.tap_layers) if head.config.features else None
        self.fed = 0  # head positions 0..fed-1 hold what the target verified (true features)

    def reset(self, length: int) -> None:
        self.head.setup_cache(length)
        if self.tap is not None:
            self.tap.attach()  # after a `close`, the draft works again
            w = input_embedding(self.target_model)
            self.tap.start(length, self.head.config.dim, self.head.norm.weight.dtype, w.device)
        self.fed = 0

    def check_target(self, target) -> None:
        if getattr(target, "model", None) is not self.target_model:
            raise SlmError("this distilled draft was loaded for another model than the target it is asked to serve")

    def max_tokens(self, context_len: int) -> int:
        return self.head.config.max_seq_len - context_len

    def offers(self, context: list[int]) -> list[Offer]:
        behind = len(context) - 1 - self.fed  # positions verified since the head's last round
        return [Offer(self, catchup=0 if behind <= 2 else behind)]

    def _pick(self, h: torch.Tensor, sampling: SamplingParams, generator) -> tuple[int, torch.Tensor | None]:
        logits = self.head.logits(h).float()  # (draft_vocab,)
        d2t = self.head.d2t
        if sampling.greedy:
            return int(d2t[int(argmax(logits))]), None
        q = logits_to_probs(logits, sampling)  # (draft_vocab,)
        i = int(sample(q, generator))
        full = torch.zeros(self.target_vocab, dtype=q.dtype, device=q.device).index_copy_(0, d2t, q)  # (V,)
        return int(d2t[i]), full

    @torch.inference_mode()
    def propose(self, context: list[int], plan: Plan, sampling: SamplingParams, generator=None) -> Proposal:
        n, k, head = len(context), plan.k, self.head
        start = min(self.fed, n - 2)  # the target has scored positions 0..n-2; x_{n-1} is pending
        steady = n - 1 - start <= 2
        t0 = time.perf_counter()
        feature = None
        if self.tap is not None:
            feature = head.fuse_target(self.tap.buffer[start : n - 1])  # (T, d)
        h = head.step(context[start + 1 : n], start, feature)[-1]  # (d,): predicts x_n
        self.fed = n - 1
        t1 = time.perf_counter()
        # position n-1+i reads token d_{i+1} and the head's own previous output
        tokens, probs = roll_out(h, k, lambda hh: self._pick(hh, sampling, generator),
                                 lambda hh, tok, i: head.step([tok], n - 1 + i, hh[None] if head.config.features else None)[-1])
        return timed_proposal(tokens, probs, sampling, (t0, t1, time.perf_counter()), steady, n - 1 - start)

    def close(self) -> None:
        """Take the hooks off the target (other decoding on it then pays nothing for this draft)."""
        if self.tap is not None:
            self.tap.remove()


def target_features(model, tap: FeatureTap | None, tokens: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One batched forward of the target over tokens (B, T), no cache -> (tapped features
    (B, T, n_taps*d) or None, logits (B, T, V) fp32)."""
    if isinstance(model, Transformer):
        logits = model(tokens)
    else:
        logits = model(input_ids=tokens, use_cache=False).logits
    return (tap.take() if tap is not None else None), logits.float()

