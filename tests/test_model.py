"""The decoder against transformers' LlamaForCausalLM on identical random weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize

from slm.config import get_config
from slm.model import Transformer
from slm.load import load_model
from slm.weights import save_model

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "mha-untied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gqa-untied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "mqa-tied": dict(n_heads=4, n_kv_heads=1, tie_embeddings=True),
    "gqa-tied-theta": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-6),
}


def hf_from_dir(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(params=list(VARIANTS), scope="module")
def pair(request, tmp_path_factory):
    """(slm model, transformers model) with the same weights, through a model directory slm wrote."""
    model = randomize(Transformer(get_config("tiny", **VARIANTS[request.param])), seed=1).eval()
    path = save_model(model, tmp_path_factory.mktemp(request.param) / "m")
    return model, hf_from_dir(path)


def tokens(batch=2, length=37, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers(pair):
    ours, hf = pair
    x = tokens()
    diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff


@torch.no_grad()
def test_kv_cached_decoding_matches_full_forward(pair):
    ours, _ = pair
    x = tokens(batch=1, length=30, seed=3)
    full = ours(x)
    ours.setup_cache(batch_size=1, max_seq_len=64)
    try:
        parts = [ours(x[:, :12], torch.arange(12))]  # prefill
        for t in range(12, 30):  # single-token decode
            parts.append(ours(x[:, t : t + 1], torch.tensor([t])))
        diff = (torch.cat(parts, dim=1) - full).abs().max().item()
        assert diff <= 1e-4, diff
    finally:
        ours.clear_cache()


@torch.no_grad()
def test_cache_positions_can_be_overwritten(pair):
    """Speculative decoding writes wrong drafts, then overwrites them: only the latest writes count."""
    ours, _ = pair
    x = tokens(batch=1, length=24, seed=4)
    full = ours(x)
    ours.setup_cache(batch_size=1, max_seq_len=32)
    try:
        ours(x[:, :10], torch.arange(10))
        ours(torch.full((1, 8), 7), torch.arange(10, 18))  # rejected "drafts" at 10..17
        verify = ours(x[:, 10:24], torch.arange(10, 24))  # multi-token chunk over the stale positions
        diff = (verify - full[:, 10:24]).abs().max().item()
        assert diff <= 1e-4, diff
    finally:
        ours.clear_cache()


@torch.no_grad()
def test_logits_to_keep_and_hidden(pair):
    ours, _ = pair
    x = tokens(seed=5)
    full = ours(x)
    # Not bit-equal: the GEMM blocks differently for 3 rows than for 37.
    torch.testing.assert_close(ours(x, logits_to_keep=3), full[:, -3:], rtol=0, atol=1e-5)
    hidden = ours(x, return_hidden=True)
    assert hidden.shape == (2, 37, ours.config.dim)
    torch.testing.assert_close(ours.output(hidden), full, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["gqa-untied", "mqa-tied"])
def test_loads_directory_written_by_transformers(variant, tmp_path):
    cfg = get_config("tiny", **VARIANTS[variant])
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    for p in hf.parameters():  # transformers' init leaves norms at 1; make every tensor count
        p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = tokens(seed=6)
    diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff
    assert ours.config.tie_embeddings == cfg.tie_embeddings
    if cfg.tie_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


def test_amd_135m_parameter_count():
    cfg = get_config("amd-llama-135m")
    assert cfg.num_params() == 134_105_856
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == 134_105_856


def test_tied_parameter_count_counts_embedding_once():
    cfg = get_config("smollm2-135m")
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params() == 134_515_008


@torch.no_grad()
def test_init_weights_statistics():
    cfg = get_config("amd-llama-135m").replace(n_layers=2, vocab_size=4096)
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    d = cfg.dim
    small, wang = (2 / (5 * d)) ** 0.5, 2 / (cfg.n_layers * d**0.5)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(small, rel=0.02)
    assert model.layers[0].attention.wqkv.weight.std().item() == pytest.approx(small, rel=0.02)
    assert model.layers[1].feed_forward.w2.weight.std().item() == pytest.approx(wang, rel=0.02)
    assert model.layers[1].attention.wo.weight.std().item() == pytest.approx(wang, rel=0.02)
    assert torch.all(model.norm.weight == 1)
    # Seeded: the same generator seed gives the same weights.
    other = Transformer(cfg)
    other.init_weights(torch.Generator().manual_seed(0))
    assert torch.equal(model.output.weight, other.output.weight)


def test_position_beyond_cache_is_refused():
    model = Transformer(get_config("tiny"))
    model.setup_cache(1, 8)
    with pytest.raises(RuntimeError, match="beyond the KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([8]))
