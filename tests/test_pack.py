"""Inference packing (`slm.pack`): an explicit step beside the model. Packed logits equal the
plain ones; a packed model refuses to run on weights changed after packing; generate packs."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize
from slm.config import get_config
from slm.errors import SlmError
from slm.generate import Stop, generate
from slm.model import Transformer
from slm.pack import PackedLinear, is_packed, pack, unpack

pytestmark = pytest.mark.usefixtures("one_thread")

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not available")


def _model(seed: int = 0, **overrides) -> Transformer:
    return randomize(Transformer(get_config("tiny", **overrides)), seed).eval()


def _tokens(n: int = 12) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(0))


@needs_onednn
@torch.no_grad()
def test_packed_logits_match_and_state_dict_is_unchanged():
    model = _model(tie_embeddings=True)
    x = _tokens()
    plain = model(x)
    keys = set(model.state_dict())
    pack(model)
    assert is_packed(model) and isinstance(model.layers[0].attention.wqkv, PackedLinear)
    assert model.output.weight is model.tok_embeddings.weight  # still tied
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-4)
    with torch.enable_grad():  # with autograd on, a packed layer is a plain linear: training never sees the copy
        assert torch.equal(model(x), plain)
    unpack(model)
    assert not is_packed(model) and torch.equal(model(x), plain)


@needs_onednn
@pytest.mark.parametrize("change", ["in_place", "in_place_inference_mode", "new_parameter", "moved"])
def test_packed_model_refuses_stale_weights(change):
    model = pack(_model())
    x = _tokens()
    layer = model.layers[0].feed_forward.w2
    with torch.no_grad():
        if change == "in_place":
            layer.weight.mul_(2.0)
        elif change == "in_place_inference_mode":
            with torch.inference_mode():
                layer.weight.mul_(2.0)
        elif change == "new_parameter":
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        else:
            layer.weight.data = layer.weight.data.clone()
    with torch.no_grad(), pytest.raises(SlmError, match="changed after slm.pack.pack"):
        model(x)
    pack(model)  # packing again adopts the new weights
    with torch.no_grad():
        packed = model(x)
        torch.testing.assert_close(packed, unpack(model)(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("native", ["1", "0"])
def test_setup_cache_does_not_pack_and_generate_decodes_the_current_weights(native, monkeypatch):
    """generate runs slm.native's kernels (over a copy of the weights in their layout), or, with
    SLM_NATIVE=0 (or no compiler), packs; either way it decodes the weights as they are now, even
    after an in-place change."""
    monkeypatch.setenv("SLM_NATIVE", native)
    model = _model()
    model.setup_cache(1, 32)
    assert not is_packed(model)
    model.clear_cache()
    prompt = _tokens(5)[0].tolist()
    ref = generate(model, prompt, 10, stop=Stop()).tokens
    assert is_packed(model) == (native == "0" and torch.backends.mkldnn.is_available())
    with torch.no_grad():  # generate after a weight change decodes the new weights
        model.output.weight.mul_(-1.0)
    assert generate(model, prompt, 10, stop=Stop()).tokens != ref
    unpack(model)
    with torch.no_grad():
        model.output.weight.mul_(-1.0)
    assert generate(model, prompt, 10, stop=Stop()).tokens == ref
