"""`slm distill TARGET --out DRAFT`: the whole pipeline as one function.

1. prompts from a corpus (`prompts`), 2. the target's own answers (`samples`, a share of the time
budget; kept in DRAFT/samples.safetensors, so a resumed run does not generate again) and the
target's features and labels at every position of them (`cache`, captured while an slm target
answers, else one forward per sample; DRAFT/features.safetensors), 3. the
draft vocabulary (FR-Spec), 4. training the head (`train`, checkpoints in DRAFT/run), 5. its
greedy acceptance per draft position on held-out samples, and the draft directory
(`slm.speculative.head`: draft_head.json + draft_head.safetensors) that `--draft DRAFT` takes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from slm.config import ModelConfig
from slm.distill.cache import Capture, FeatureCache, compute_cache
from slm.distill.objective import acceptance_by_depth, chain_acceptance, make_batch
from slm.distill.prompts import build_prompts
from slm.distill.samples import Samples, answer_all, coverage, draft_vocabulary
from slm.distill.train import TrainSettings, train_head
from slm.errors import SlmError
from slm.generate import stop_ids_for
from slm.load import load_any
from slm.model import Transformer
from slm.sampling import SamplingParams
from slm.speculative.features import FeatureTap, input_embedding
from slm.speculative.head import FeatureHead, HeadConfig, save_head
from slm.tokenizer import Tokenizer

SAMPLES_FILE = "samples.safetensors"
FEATURES_FILE = "features.safetensors"


@dataclass
class DistillConfig:
    minutes: float = 30.0  # everything: generating the samples and training
    generate_share: float = 0.5  # of the budget, at most, for the target's answers (and their features)
    prompts: list[str] = field(default_factory=list)  # sources (directories of .py, text files); default stdlib
    max_prompts: int = 4000
    max_prompt_tokens: int = 384
    max_new_tokens: int = 192
    # Answer tokens/s, SmolLM2, 2 threads, native steps: 108 at 8, 94 at 16, 49 at 32 (eager PyTorch: 46-50,
    # 57-68, 7-11); benchmarks/README.md.
    gen_batch_size: int = 8
    temperature: float = 0.0  # the target's answers: greedy (what the benchmark decodes) unless > 0
    draft_vocab: int = 8192
    features: bool = True  # False: a one-layer standalone draft on the target's embeddings (the ablation)
    tap_layers: tuple[int, ...] | None = None  # default low/middle/high
    held_out: float = 0.05
    train: TrainSettings = field(default_factory=lambda: TrainSettings(seconds=0.0))
    snapshot_minutes: tuple[float, ...] = ()  # also save the head after these training minutes (the curve)
    seed: int = 0
    device: str = "cpu"  # where the target answers and the head trains ("cuda" on a GPU)

    def __post_init__(self) -> None:
        if not self.minutes > 0:
            raise SlmError(f"--minutes must be > 0, got {self.minutes}")
        if not 0 < self.generate_share < 1:
            raise SlmError(f"--generate-share must be in (0, 1), got {self.generate_share}")
        if self.draft_vocab < 1:
            raise SlmError(f"--draft-vocab must be >= 1, got {self.draft_vocab}")


def target_shape(model) -> ModelConfig:
    """The target's shape as a ModelConfig (an slm model's own; a transformers model's from its config)."""
    if isinstance(model, Transformer):
        return model.config
    c = model.config  # only the shape: the head copies it, whatever else the target's layers do
    heads = c.num_attention_heads
    try:
        return ModelConfig(name="transformers-target", vocab_size=model.get_output_embeddings().weight.shape[0],
                           n_layers=c.num_hidden_layers, n_heads=heads,
                           n_kv_heads=getattr(c, "num_key_value_heads", None) or heads, dim=c.hidden_size,
                           ffn_dim=c.intermediate_size, max_seq_len=getattr(c, "max_position_embeddings", 2048),
                           rope_theta=float(getattr(c, "rope_theta", None) or 10000.0),
                           norm_eps=float(getattr(c, "rms_norm_eps", 1e-5)))
    except AttributeError as e:
        raise SlmError(f"the transformers target's config lacks a LLaMA-like shape field ({e})") from None


def make_samples(model, model_dir: Path, tokenizer: Tokenizer, cfg: DistillConfig, seconds: float,
                 capture: Capture | None = None) -> Samples:
    prompts = build_prompts(model_dir, cfg.prompts or None, cfg.max_prompts, cfg.seed)
    ids = [tokenizer.encode(p.text) for p in prompts]
    ids = [t for t in ids if 0 < len(t) <= cfg.max_prompt_tokens]
    if not ids:
        raise SlmError(f"every distillation prompt is longer than {cfg.max_prompt_tokens} tokens")
    sampling = SamplingParams(temperature=cfg.temperature) if cfg.temperature > 0 else SamplingParams()
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(desc="target answers", unit="tok", file=sys.stderr, dynamic_ncols=True, leave=False)
    samples = answer_all(model, ids, cfg.max_new_tokens, sampling, stop_ids_for(model, tokenizer),
                         cfg.gen_batch_size, seconds, g, bar.update, cfg.seed, capture=capture)
    bar.close()
    return samples


def split(samples: Samples, held_out: float) -> tuple[list[int], list[int]]:
    """-> (training, held-out) sample indices."""
    n = len(samples.sequences)
    k = max(1, round(n * held_out)) if n > 1 else 0
    idx = list(range(n))
    test = set(idx[:: max(n // k, 1)][:k]) if k else set()
    return [i for i in idx if i not in test], sorted(test)


def pick(samples: Samples, indices: list[int]) -> Samples:
    return Samples([samples.sequences[i] for i in indices], [samples.prompt_lens[i] for i in indices])


def samples_and_features(model, model_dir: Path, tokenizer: Tokenizer, cfg: DistillConfig, out: Path,
                         tap_layers: tuple[int, ...]) -> tuple[Samples, FeatureCache]:
    """The samples and their features: made (or computed) once, then read from `out`."""
    samples_path, features_path = out / SAMPLES_FILE, out / FEATURES_FILE
    samples = cache = None
    if samples_path.is_file():  # a resumed run: the samples and what they cost are the first run's
        samples = Samples.load(samples_path)
        if features_path.is_file():
            cache = FeatureCache.load(features_path)
            cache = cache if cache.matches(samples.sequences, tap_layers) else None
    else:
        t_gen = time.perf_counter()
        capture = None
        if isinstance(model, Transformer):  # batched decoding computes the features anyway: keep them
            capture = Capture(FeatureTap(model, tap_layers) if tap_layers else None)
        samples = make_samples(model, model_dir, tokenizer, cfg, cfg.minutes * 60 * cfg.generate_share, capture)
        if capture is not None:
            if capture.tap is not None:
                capture.tap.remove()
            cache = capture.cache
            cache.save(features_path)
        samples.seconds = time.perf_counter() - t_gen
        samples.save(samples_path)
    if cache is None:  # a transformers target, or samples without (these) features: one forward each
        t_feat = time.perf_counter()
        tap = FeatureTap(model, tap_layers) if tap_layers else None
        cache = compute_cache(model, tap, samples.sequences, device=cfg.device)
        if tap is not None:
            tap.remove()
        cache.save(features_path)
        samples.seconds += time.perf_counter() - t_feat  # part of the budget, like generating
        samples.save(samples_path)
    return samples, cache


def held_out_batches(samples: Samples, cache: FeatureCache, seq_len: int, pad: int, size: int = 4) -> list:
    return [make_batch(samples.sequences[i : i + size], samples.prompt_lens[i : i + size],
                       cache.select(list(range(i, min(i + size, len(samples.sequences))))), seq_len, pad)
            for i in range(0, len(samples.sequences), size)]


def distill(target: str | os.PathLike, out: str | os.PathLike, config: DistillConfig | None = None,
            on_snapshot: Callable[[float, Path], None] | None = None) -> Path:
    """Distill a draft head for `target` (a model argument, `slm.load.load_any`) into `out`.
    Re-running with the same settings resumes. Returns the draft directory."""
    cfg = config or DistillConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    model, model_dir = load_any(target)
    model.to(cfg.device).eval().requires_grad_(False)
    tokenizer = Tokenizer.load(model_dir)
    shape = target_shape(model)

    # The head's taps (its vocabulary is not known before the samples are).
    tap_layers = HeadConfig.for_target(shape, 1, () if not cfg.features else cfg.tap_layers).tap_layers
    samples, cache = samples_and_features(model, model_dir, tokenizer, cfg, out, tap_layers)
    train_idx, test_idx = split(samples, cfg.held_out)
    if not train_idx:
        raise SlmError("too few distillation samples to train on: raise --minutes")
    train_samples, test_samples = pick(samples, train_idx), pick(samples, test_idx)
    test_cache = cache.select(test_idx)

    d2t = draft_vocabulary(train_samples, shape.vocab_size, cfg.draft_vocab)
    head_cfg = HeadConfig.for_target(shape, len(d2t), tap_layers)
    head = FeatureHead(head_cfg, input_embedding(model))
    head.init_weights(torch.Generator().manual_seed(cfg.seed))
    head.d2t = d2t
    if head_cfg.features:  # from up to 64 training samples: a statistic, not a fit
        head.set_tap_scale(torch.cat([cache.taps[i][:-1] for i in train_idx[:64]]))
    head.to(cfg.device)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    # The budget covers the samples (whenever they were made) and training; loading is not counted.
    settings = dataclasses.replace(cfg.train, seconds=max(cfg.minutes * 60 - samples.seconds, 1.0), seed=cfg.seed)
    made_from = {"head": dataclasses.asdict(head_cfg) | {"tap_layers": list(head_cfg.tap_layers)},
                 "samples": len(samples.sequences), "answer_tokens": samples.answer_tokens,
                 "settings": dataclasses.asdict(dataclasses.replace(settings, seconds=0.0))}
    pending = sorted(cfg.snapshot_minutes)

    def snapshot(trained: float, h: FeatureHead) -> None:
        while pending and trained >= pending[0] * 60:
            d = save_head(h, out / "snapshots" / f"{pending[0]:g}min", {"trained_seconds": round(trained, 1)})
            if on_snapshot is not None:
                on_snapshot(pending[0], d)
            pending.pop(0)

    result = train_head(head, train_samples, cache.select(train_idx), settings, out / "run", made_from, pad, snapshot)
    per_depth = acceptance_by_depth(head, held_out_batches(test_samples, test_cache, settings.seq_len, pad),
                                    max(settings.depth, 4)) if test_idx else []  # beyond the unroll too
    report = {
        "target": str(target), "samples": len(samples.sequences), "answer_tokens": samples.answer_tokens,
        "draft_vocab": len(d2t), "vocab_coverage": round(coverage(test_samples, d2t), 4),
        "steps": result["steps"], "trained_seconds": result["trained_seconds"],
        "train_tokens_per_s": round(result["train_tokens"] / max(result["trained_seconds"], 1e-9), 1),
        "generate_seconds": round(samples.seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "acceptance_by_depth": [round(a, 4) for a in per_depth],
        "chain_acceptance": round(chain_acceptance(per_depth), 4) if per_depth else None,
        "held_out_samples": len(test_samples.sequences),
    }
    save_head(head, out, report)
    return out
