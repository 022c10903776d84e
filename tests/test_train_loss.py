"""The fused chunked output + cross-entropy loss, against PyTorch's and transformers' losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slm.config import get_config
from slm.train.loss import IGNORE_INDEX, LanguageModel, fused_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_loss_and_gradients_equal_full_logits_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (2, 50), generator=g)
    t[0, ::3] = IGNORE_INDEX
    ours = fused_linear_cross_entropy(h, w, t, chunk)
    (3.0 * ours).backward()  # a non-unit upstream gradient
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), ignore_index=IGNORE_INDEX)
    (3.0 * ref).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh, h.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the evaluation path computes no gradients but the same loss
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, t, chunk), ref, rtol=1e-12, atol=0)


def _hf_grads(hf_model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in hf_model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_language_model_loss_and_grads_match_transformers(tied):
    transformers = pytest.importorskip("transformers")
    from slm.weights import slm_to_hf

    config = get_config("tiny", tie_embeddings=tied)
    model = LanguageModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.loss_chunk = 37  # several chunks, one ragged
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config.to_hf().items() if k not in ("architectures",)})
    hf = transformers.LlamaForCausalLM(hf_cfg).float()
    sd = slm_to_hf({k: v.detach().clone() for k, v in model.state_dict().items()}, config)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (tied or not missing)

    tokens = torch.randint(0, config.vocab_size, (3, 41), generator=torch.Generator().manual_seed(1))
    ours = model(tokens[:, :-1], tokens[:, 1:])
    # transformers shifts the labels itself and ignores the last position: the same 3 x 40 predictions.
    theirs = hf(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    ours.backward()
    theirs.backward()
    our_grads = slm_to_hf({n: p.grad for n, p in model.named_parameters()}, config)
    for name, grad in _hf_grads(hf).items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_path_equals_fused_path():
    model = LanguageModel(get_config("tiny"))
    model.init_weights(torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    model.loss_chunk = 0
    plain = model(tokens[:, :-1], tokens[:, 1:])
    model.loss_chunk = 5
    torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:]), plain, rtol=1e-6, atol=0)
    assert list(model.state_dict()) == list(type(model).__mro__[1](get_config("tiny")).state_dict())
