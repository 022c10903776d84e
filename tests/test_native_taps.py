"""A feature draft's tap on a model the native kernels run: the kernels return the tapped layers'
outputs and the tap stores them exactly where and as its hooks do on the eager forward (prefill
handover, single steps, multi-row verification, batched capture), while any other hook still gets
the eager forward."""

from __future__ import annotations

import pytest
import torch

from slm.errors import SlmError
from slm.model import Transformer
from slm.native import NativeDecoder, decoder, engine, library
from slm.speculative.features import FeatureTap

from test_native import tiny

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(library() is None, reason="the native kernels do not build here")]

LAYERS = (0, 2, 3)


@pytest.fixture
def eager_calls(monkeypatch):
    """How many times Transformer.forward ran (a native call does not run it)."""
    calls = []
    forward = Transformer.forward
    monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    return calls


def pair(length: int = 96, inference_buffer: bool = False, **kw):
    """The same 4-layer model twice, each with a tap collecting into a buffer (made in inference mode,
    as `FeatureDraft.reset` makes it, or not): (eager model, its tap, native decoder, its tap)."""
    model = tiny(n_layers=4, max_seq_len=length, **kw)
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    taps = []
    for m in (ref, model):
        m.setup_cache(1, length)
        tap = FeatureTap(m, LAYERS)
        with torch.inference_mode(inference_buffer):
            tap.start(length, m.config.dim, torch.float32, "cpu")
        taps.append(tap)
    return ref, taps[0], decoder(model), taps[1]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to fp32 rounding: 1e-5 relative to the features' magnitude."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("inference_buffer", [True, False], ids=["inference-buffer", "plain-buffer"])
@pytest.mark.parametrize("prefill", [9, engine.MAX_ROWS + 7, engine.PREFILL_ROWS + 7],
                         ids=["native-prefill", "chunked-prefill", "eager-prefill"])
def test_the_native_forward_fills_the_taps_buffer_as_the_hooks_do(prefill, inference_buffer, eager_calls):
    ref, ref_tap, nat, tap = pair(length=prefill + 24, inference_buffer=inference_buffer)
    assert isinstance(nat, NativeDecoder) and engine._tap(nat.model) is tap
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 96, (1, prefill), generator=g)
    with torch.inference_mode():
        close(nat(prompt, torch.arange(prefill), logits_to_keep=1), ref(prompt, torch.arange(prefill), logits_to_keep=1))
        pos = prefill
        for t in (1, 1, 5, 3, 1, 8, 2):  # decode steps and verification calls (K+1 rows)
            toks = torch.randint(0, 96, (1, t), generator=g)
            close(nat(toks, torch.arange(pos, pos + t)), ref(toks, torch.arange(pos, pos + t)))
            pos += t - 1  # the last row "rejected": the next call writes over its position, as after a verify
        assert pos > prefill + 10
    calls_eager = 1 + 7 + (prefill > engine.PREFILL_ROWS)  # the reference's calls, and the long prefill
    assert len(eager_calls) == calls_eager
    assert tap.buffer[:pos + 1].abs().sum(1).min() > 0, "every position up to the last is written"
    close(tap.buffer, ref_tap.buffer)


def test_a_buffer_in_another_dtype_is_filled_through_a_copy():
    ref, ref_tap, nat, tap = pair()
    for t in (ref_tap, tap):
        t.buffer = None
        t.start(96, 64, torch.float64, "cpu")
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        nat(prompt, torch.arange(12))
        ref(prompt, torch.arange(12))
    assert tap.buffer.dtype == torch.float64 and tap.buffer[11].abs().sum() > 0
    close(tap.buffer, ref_tap.buffer)


def test_batched_capture_takes_the_same_features(eager_calls):
    """No buffer (distillation's capture): each forward's tapped outputs, (B, T, n_taps*d), by take()."""
    ref, ref_tap, nat, tap = pair()
    for m in (ref, nat.model):
        m.setup_cache(3, 96)
    for t in (ref_tap, tap):
        t.buffer = None
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        prompt = torch.randint(0, 96, (3, 6), generator=g)
        nat(prompt, torch.arange(6))
        ref(prompt, torch.arange(6))
        close(tap.take(), ref_tap.take())
        step = torch.randint(0, 96, (3, 1), generator=g)
        nat(step, torch.tensor([6]))
        ref(step, torch.tensor([6]))
        got = tap.take()
        assert got.shape == (3, 1, len(LAYERS) * 64)
        close(got, ref_tap.take())
    assert len(eager_calls) == 2  # the reference's two


def test_rows_of_several_sequences_leave_the_buffer_alone_as_the_hooks_do():
    ref, ref_tap, nat, tap = pair()
    for m in (ref, nat.model):
        m.setup_cache(2, 96)
    with torch.inference_mode():
        toks = torch.randint(0, 96, (2, 4), generator=torch.Generator().manual_seed(3))
        nat(toks, torch.arange(4))
        ref(toks, torch.arange(4))
    assert tap.buffer.abs().sum() == 0 and ref_tap.buffer.abs().sum() == 0


def test_another_hook_or_a_second_tap_gets_the_eager_forward(eager_calls):
    _, _, nat, tap = pair()
    model = nat.model
    seen = []
    handle = model.layers[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.inference_mode():
        nat(torch.tensor([[1, 2]]), torch.arange(2))
    handle.remove()
    assert seen == [torch.Size([1, 2, 64])] and len(eager_calls) == 1
    assert tap.buffer[1].abs().sum() > 0  # its hooks ran on the eager forward

    second = FeatureTap(model, (1,))
    second.start(96, 64, torch.float32, "cpu")
    with torch.inference_mode():
        nat(torch.tensor([[3]]), torch.tensor([2]))
    assert len(eager_calls) == 2 and second.buffer[2].abs().sum() > 0
    second.remove()
    with torch.inference_mode():
        nat(torch.tensor([[4]]), torch.tensor([3]))
    assert len(eager_calls) == 2 and tap.buffer[3].abs().sum() > 0  # one tap again: native
    tap.remove()
    assert engine._tap(model) is None


def test_a_tapped_layer_outside_the_model_is_a_one_line_error():
    model = tiny()
    model.setup_cache(1, 16)
    nat = decoder(model)

    class Stray:  # a tap-like hook owner naming layer 5 of a 2-layer model
        layers = (5,)

        def native_out(self, batch, pos):
            return torch.empty(batch * pos.shape[-1], 64)

    hook = lambda mod, args, out: None  # noqa: E731
    hook.native_tap = Stray()
    handle = model.layers[0].register_forward_hook(hook)
    with torch.inference_mode(), pytest.raises(SlmError, match="tapped layer outside 0..1"):
        nat(torch.tensor([[1]]), torch.tensor([0]))
    handle.remove()


def test_consecutive_positions_are_written_in_place():
    """The kernels write a decode or verify call's features straight into the buffer (nothing to copy
    after); other positions, or a buffer in another dtype, go through a copy."""
    _, _, _, tap = pair(inference_buffer=True)
    shares = lambda t: t.untyped_storage().data_ptr() == tap.buffer.untyped_storage().data_ptr()  # noqa: E731
    with torch.inference_mode():
        assert shares(tap.native_out(1, torch.arange(5, 9))) and shares(tap.native_out(1, torch.tensor([[7]])))
        assert not shares(tap.native_out(1, torch.tensor([5, 7])))
        assert tap.native_out(2, torch.arange(3)) is None and tap.native_out(1, torch.tensor([96])) is None
