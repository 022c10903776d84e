"""The training loader: exact resume, rank sharding, 1-vs-N-rank equivalence, mixtures, integrity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _data_common import make_docs, train_tiny_tokenizer, write_text_files

from slm.data.loader import DataLoader, PackedDataset, _permute, iterate_eval
from slm.data.prepare import PrepareConfig, prepare
from slm.data.sources import parse_source
from slm.errors import SlmError

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    tok = train_tiny_tokenizer(root / "tok")
    write_text_files(root / "a", make_docs(80, seed=1))
    write_text_files(root / "b", make_docs(40, seed=2))
    return root, tok


def prepared(corpus, name: str, b_weight: str = "") -> Path:
    root, tok = corpus
    out = root / name
    prepare(
        PrepareConfig(
            [parse_source(f"text:{root / 'a'}"), parse_source(f"text:{root / 'b'}{b_weight}")],
            str(tok),
            out,
            seq_len=SEQ,
            val_fraction=0.2,
            shard_tokens=40 * (SEQ + 1),  # several shards per source
        )
    )
    return out


@pytest.fixture(scope="module")
def data_dir(corpus):
    return prepared(corpus, "data")


def take(dl, n):
    return [next(dl) for _ in range(n)]


def same(batches_a, batches_b):
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))


def rows(batches):
    """Each window of a list of batches as a tuple of its seq_len + 1 tokens."""
    out = []
    for x, y in batches:
        out.extend(tuple(r) for r in torch.cat([x, y[:, -1:]], dim=1).tolist())
    return out


def test_dataset_shape_and_shift(data_dir):
    ds = PackedDataset(data_dir, "train")
    assert ds.seq_len == SEQ and ds.sources == ["text", "text_2"]
    assert len(ds) == sum(ds.source_windows.values()) > 100
    assert len(ds._shards) > 2  # the fixture spans several shards
    dl = DataLoader(data_dir, batch_size=5, seed=3)
    x, y = next(dl)
    assert x.shape == y.shape == (5, SEQ) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    all_windows = {tuple(ds[i].tolist()) for i in range(len(ds))}
    assert set(rows([(x, y)])) <= all_windows


@pytest.mark.parametrize("weights", [None, {"text": 1.0, "text_2": 3.0}])
def test_resume_yields_the_same_next_100_batches(data_dir, weights):
    ref = DataLoader(data_dir, batch_size=3, seed=7, weights=weights)
    take(ref, 37)  # past at least one epoch boundary of the smaller source
    state = json.loads(json.dumps(ref.state_dict()))  # must survive JSON
    expected = take(ref, 100)
    resumed = DataLoader(data_dir, batch_size=3, seed=7, weights=weights)
    resumed.load_state_dict(state)
    assert same(take(resumed, 100), expected)
    fresh = DataLoader(data_dir, batch_size=3, seed=7, weights=weights)
    assert not same(take(fresh, 100), expected)  # the state really moved the loader


def test_two_ranks_are_disjoint_and_cover_an_epoch(data_dir):
    n = len(PackedDataset(data_dir, "train"))
    b = 4
    steps = math.ceil(n / (2 * b))
    per_rank = []
    for rank in range(2):
        dl = DataLoader(data_dir, batch_size=b, rank=rank, world_size=2, seed=11)
        windows = rows(take(dl, steps))
        # micro-batch j = 2 * step + rank holds global positions j * b ... j * b + b - 1
        positions = [(2 * (i // b) + rank) * b + i % b for i in range(len(windows))]
        per_rank.append({p: w for p, w in zip(positions, windows) if p < n})
    epoch0, epoch1 = set(per_rank[0]), set(per_rank[1])
    assert not epoch0 & epoch1 and epoch0 | epoch1 == set(range(n))
    ds = PackedDataset(data_dir, "train")
    everything = sorted(tuple(ds[i].tolist()) for i in range(n))
    seen = sorted(list(per_rank[0].values()) + list(per_rank[1].values()))
    assert seen == everything  # each window exactly once in the first epoch


@pytest.mark.parametrize("weights", [None, {"text": 1.0, "text_2": 1.0}])
def test_one_process_with_accumulation_equals_two_ranks(data_dir, weights):
    single = DataLoader(data_dir, batch_size=4, seed=5, weights=weights)
    ranks = [DataLoader(data_dir, batch_size=4, rank=r, world_size=2, seed=5, weights=weights) for r in range(2)]
    for _ in range(30):
        assert same(take(single, 2), [next(ranks[0]), next(ranks[1])])
    # ... and a checkpoint of the 1-process run resumes on 2 ranks (same global batch).
    state = single.state_dict()
    expected = take(single, 20)
    resumed = [DataLoader(data_dir, batch_size=4, rank=r, world_size=2, seed=5, weights=weights) for r in range(2)]
    for dl in resumed:
        dl.load_state_dict(state)
    got = []
    for _ in range(10):
        got += [next(resumed[0]), next(resumed[1])]
    assert same(got, expected)


def test_mixture_weights_set_the_source_proportions(data_dir):
    ds = PackedDataset(data_dir, "train")
    second = {tuple(ds[i].tolist()) for i in range(ds.source_offsets["text_2"], len(ds))}
    first = {tuple(ds[i].tolist()) for i in range(ds.source_offsets["text_2"])}
    assert not first & second
    dl = DataLoader(data_dir, batch_size=50, seed=0, weights={"text": 1.0, "text_2": 3.0})
    windows = rows(take(dl, 80))  # 4000 draws: binomial std of the fraction ~0.007
    frac = sum(w in second for w in windows) / len(windows)
    assert abs(frac - 0.75) < 0.03
    only_first = DataLoader(data_dir, batch_size=50, seed=0, weights={"text": 1.0})
    assert all(w in first for w in rows(take(only_first, 4)))


def test_epochs_reshuffle_and_seeds_differ(data_dir):
    n = len(PackedDataset(data_dir, "train"))
    dl = DataLoader(data_dir, batch_size=n, seed=1)
    e0, e1 = rows([next(dl)]), rows([next(dl)])
    assert sorted(e0) == sorted(e1) and e0 != e1
    other = DataLoader(data_dir, batch_size=n, seed=2)
    assert rows([next(other)]) != e0


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = _permute(np.arange(n, dtype=np.uint64), n, np.uint64(12345))
        assert sorted(p.tolist()) == list(range(n))
    assert _permute(np.arange(50, dtype=np.uint64), 50, np.uint64(1)).tolist() != list(range(50))


def test_iterate_eval_covers_val_once_across_ranks(data_dir):
    ds = PackedDataset(data_dir, "val")
    assert len(ds) > 0
    everything = sorted(tuple(ds[i].tolist()) for i in range(len(ds)))
    seen = []
    for rank in range(2):
        seen += rows(list(iterate_eval(data_dir, "val", batch_size=3, rank=rank, world_size=2)))
    assert sorted(seen) == everything


def test_state_from_another_configuration_is_refused(data_dir):
    state = DataLoader(data_dir, batch_size=4, seed=1).state_dict()
    with pytest.raises(SlmError, match="seed"):
        DataLoader(data_dir, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(SlmError, match="groups"):
        DataLoader(data_dir, batch_size=4, seed=1, weights={"text": 1}).load_state_dict(state)
    dl = DataLoader(data_dir, batch_size=4, seed=1)
    next(dl)
    with pytest.raises(SlmError, match="multiple of batch_size"):
        DataLoader(data_dir, batch_size=3, seed=1).load_state_dict(dl.state_dict())


def test_bad_arguments(data_dir):
    with pytest.raises(SlmError, match="unknown sources"):
        DataLoader(data_dir, batch_size=2, weights={"nope": 1.0})
    with pytest.raises(SlmError, match="rank"):
        DataLoader(data_dir, batch_size=2, rank=2, world_size=2)
    with pytest.raises(SlmError, match="no manifest"):
        PackedDataset(data_dir.parent / "a")


def test_truncated_or_foreign_shard_is_detected(data_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["sources"][0]["splits"]["train"]["shards"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(SlmError, match="truncated"):
        PackedDataset(copy)
    shard.write_bytes(b"\0" * len(data))
    with pytest.raises(SlmError, match="not a token shard"):
        PackedDataset(copy)


def test_prepare_time_weights_scale_the_natural_shares(corpus):
    # text_2 prepared with weight 2: without an override, p(text_2) ∝ 2 * its windows.
    data_dir = prepared(corpus, "weighted", ":2")
    ds = PackedDataset(data_dir, "train")
    n1, n2 = ds.source_windows["text"], ds.source_windows["text_2"]
    assert ds.default_weights == {"text": 1.0, "text_2": 2.0}
    second = {tuple(ds[i].tolist()) for i in range(ds.source_offsets["text_2"], len(ds))}
    windows = rows(take(DataLoader(data_dir, batch_size=50, seed=0), 80))
    frac = sum(w in second for w in windows) / len(windows)
    assert abs(frac - 2 * n2 / (n1 + 2 * n2)) < 0.03
