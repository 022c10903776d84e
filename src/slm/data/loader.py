"""Training data from a prepared data directory: memory-mapped windows, a seeded global order,
mixture weights, rank sharding and exact resume.

The one global order
--------------------
Every rank computes the same global stream of windows, a pure function of the seed
and the stream position (plus, with mixture weights, how many windows each source
has given so far, which is itself a function of the position):

* slot p of the stream picks a group: with `weights=None` there is a single group
  holding every window (so an epoch is one shuffled pass over the data, in its
  natural source proportions); with weights, each source is a group and slot p
  picks source k with probability weights[k] (a seeded hash of p, so the choice
  does not depend on who reads it);
* the n-th window drawn from a group of size N is `perm_e(n % N)` where e = n // N
  is the group's epoch and perm_e a seeded pseudo-random permutation of [0, N)
  (a Feistel network: O(1) memory whatever N, new every epoch).

The stream is cut into micro-batches of `batch_size` consecutive slots and micro-batch
j belongs to rank j % world_size. One process taking two micro-batches (gradient
accumulation 2) therefore sees exactly the windows that two ranks see in one
micro-batch each, and `state_dict()` holds only the global position (and per-group
draw counts), so a run resumes exactly, also on a different world size with the same
global batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from slm.data.shards import open_shard
from slm.errors import SlmError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "slm-packed"
MANIFEST_VERSION = 1
_STATE_VERSION = 1
_M64 = (1 << 64) - 1


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a finished `slm data prepare` output, checked for format and version."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        if Path(data_dir).is_dir():
            raise SlmError(f"{data_dir}: no {MANIFEST}; `slm data prepare` did not finish here (re-run it)")
        raise SlmError(f"{data_dir}: no such data directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlmError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise SlmError(f"{path}: not an slm data manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise SlmError(f"{path}: manifest version {manifest.get('version')}, this slm reads {MANIFEST_VERSION}")
    return manifest


class PackedDataset:
    """All windows of one split, in manifest order (source by source, shard by shard).

    `ds[i]` is window i: `seq_len + 1` tokens as a read-only numpy view.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        manifest = read_manifest(data_dir)
        self.manifest = manifest
        self.seq_len: int = manifest["seq_len"]
        self.window: int = self.seq_len + 1
        self.sources: list[str] = [s["name"] for s in manifest["sources"]]
        self.default_weights: dict[str, float] = {s["name"]: s["weight"] for s in manifest["sources"]}
        self.source_windows: dict[str, int] = {}
        self._shards: list[np.ndarray] = []  # each (windows, seq_len + 1)
        shard_windows: list[int] = []
        for src in manifest["sources"]:
            if split not in src["splits"]:
                raise SlmError(f"{data_dir}: no split {split!r} (have {sorted(src['splits'])})")
            n = 0
            for sh in src["splits"][split]["shards"]:
                tokens = open_shard(self.data_dir / sh["file"])
                if len(tokens) != sh["tokens"] or len(tokens) % self.window:
                    raise SlmError(
                        f"{self.data_dir / sh['file']}: {len(tokens)} tokens, manifest says {sh['tokens']} "
                        f"in windows of {self.window}"
                    )
                self._shards.append(tokens.reshape(-1, self.window))  # (windows, seq_len + 1)
                shard_windows.append(len(tokens) // self.window)
                n += shard_windows[-1]
            self.source_windows[src["name"]] = n
        self._shard_starts = np.cumsum([0] + shard_windows)
        starts = np.cumsum([0] + list(self.source_windows.values()))
        self.source_offsets: dict[str, int] = dict(zip(self.sources, starts[:-1].tolist()))

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self._shard_starts, i, side="right")) - 1
        return self._shards[s][i - self._shard_starts[s]]

    def windows(self, ids) -> np.ndarray:
        """Windows `ids` stacked as int64, shape (len(ids), seq_len + 1)."""
        out = np.empty((len(ids), self.window), dtype=np.int64)
        for row, i in enumerate(ids):
            out[row] = self[int(i)]
        return out


# --- seeded order ---------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixing function (SplitMix64's finaliser), elementwise on uint64."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    """Hash a tuple of non-negative ints into one 64-bit key."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = _splitmix64(h ^ np.array([p & _M64], dtype=np.uint64))
    return h[0]


def _permute(x: np.ndarray, n: int, key: np.uint64) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `x` (uint64 values < n).

    A 4-round Feistel network on the smallest even-bit domain 2**(2h) >= n, with
    cycle walking to stay inside [0, n): O(1) memory for any n.
    """
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << h) - 1)
    shift = np.uint64(h)
    round_keys = [_key(int(key), r) for r in range(4)]

    def feistel(v: np.ndarray) -> np.ndarray:
        left, right = v >> shift, v & mask
        for k in round_keys:
            left, right = right, left ^ (_splitmix64(right ^ k) & mask)
        return (left << shift) | right

    y = feistel(x)
    outside = y >= np.uint64(n)
    while outside.any():  # at most a few rounds: the domain is < 4n
        y[outside] = feistel(y[outside])
        outside = y >= np.uint64(n)
    return y


class _GlobalOrder:
    """The global stream of window ids; see the module docstring.

    Groups are contiguous ranges [offset, offset + size) of the dataset's windows.
    """

    def __init__(self, sizes: list[int], offsets: list[int], probs: list[float], seed: int):
        self.sizes, self.offsets, self.seed = sizes, offsets, seed
        self.probs = probs
        self._cum = np.cumsum(probs)
        self._cum[-1] = 1.0  # guard against rounding: every u < 1 maps to a group
        self.position = 0  # slots consumed by all ranks together
        self.counts = [0] * len(sizes)  # windows drawn so far from each group

    def _groups(self, n: int) -> np.ndarray:
        if len(self.sizes) == 1:
            return np.zeros(n, dtype=np.int64)
        slots = np.arange(self.position, self.position + n, dtype=np.uint64)
        u = (_splitmix64(slots ^ _key(self.seed, 0xC0FFEE)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.searchsorted(self._cum, u, side="right")

    def skip(self, n: int) -> None:
        if n:
            for k, c in enumerate(np.bincount(self._groups(n), minlength=len(self.sizes))):
                self.counts[k] += int(c)
            self.position += n

    def take(self, n: int) -> np.ndarray:
        groups = self._groups(n)
        out = np.empty(n, dtype=np.int64)
        for k in np.unique(groups):
            slots = np.flatnonzero(groups == k)
            draws = self.counts[k] + np.arange(len(slots), dtype=np.int64)
            size = self.sizes[k]
            epochs, local = draws // size, (draws % size).astype(np.uint64)
            for e in np.unique(epochs):  # a batch straddles at most a few epochs
                sel = epochs == e
                ids = _permute(local[sel], size, _key(self.seed, int(k), int(e)))
                out[slots[sel]] = self.offsets[k] + ids.astype(np.int64)
            self.counts[k] += len(slots)
        self.position += n
        return out


def _mixture(ds: PackedDataset, weights: dict[str, float] | None):
    """(sizes, offsets, probs, names) of the order's groups for a dataset and weights.

    Without `weights`, the prepare-time source weights (`KIND:PATH:WEIGHT`) scale each
    source's natural share: probability ∝ weight * windows. All 1 (the default) is the
    natural mixture, served as one group so that an epoch is exactly one pass.
    """
    if weights is None:
        if all(w == 1 for w in ds.default_weights.values()):
            return [len(ds)], [0], [1.0], ["*"]
        weights = {s: w * ds.source_windows[s] for s, w in ds.default_weights.items() if ds.source_windows[s]}
    unknown = sorted(set(weights) - set(ds.sources))
    if unknown:
        raise SlmError(f"mixture weights name unknown sources {unknown}; {ds.data_dir} has {ds.sources}")
    names = [s for s in ds.sources if weights.get(s, 0.0) > 0]
    if any(w < 0 for w in weights.values()) or not names:
        raise SlmError(f"mixture weights must be >= 0 with at least one > 0, got {weights}")
    empty = [s for s in names if ds.source_windows[s] == 0]
    if empty:
        raise SlmError(f"{ds.data_dir}: sources {empty} have weight > 0 but no {ds.split} windows")
    total = sum(weights[s] for s in names)
    return (
        [ds.source_windows[s] for s in names],
        [ds.source_offsets[s] for s in names],
        [weights[s] / total for s in names],
        names,
    )


class DataLoader:
    """An infinite iterator of (inputs, targets) LongTensor batches of shape (batch_size, seq_len).

    `weights` ({source: weight}) sets the mixture: source s fills a slot with probability
    weights[s] / sum(weights); sources left out get 0. Without it, each source's share is
    its size times its prepare-time weight (see `_mixture`).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        weights: dict[str, float] | None = None,
    ):
        if batch_size < 1:
            raise SlmError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise SlmError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dataset = PackedDataset(data_dir, split)
        if len(self.dataset) == 0:
            raise SlmError(f"{data_dir}: split {split!r} has no windows")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        sizes, offsets, probs, self._group_names = _mixture(self.dataset, weights)
        self._order = _GlobalOrder(sizes, offsets, probs, seed)

    @property
    def seq_len(self) -> int:
        return self.dataset.seq_len

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self):
        import torch

        # This rank's micro-batch of the next world_size ones; every rank advances the
        # global position by the same world_size * batch_size slots.
        b = self.batch_size
        self._order.skip(self.rank * b)
        ids = self._order.take(b)
        self._order.skip((self.world_size - self.rank - 1) * b)
        w = torch.from_numpy(self.dataset.windows(ids))  # (B, seq_len + 1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, seq_len) each

    def state_dict(self) -> dict:
        o = self._order
        return {
            "version": _STATE_VERSION,
            "split": self.dataset.split,
            "seed": self.seed,
            "groups": list(self._group_names),
            "group_windows": list(o.sizes),
            "probs": list(o.probs),
            "position": o.position,
            "counts": list(o.counts),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        o = self._order
        if state.get("version") != _STATE_VERSION:
            raise SlmError(f"loader state version {state.get('version')}, expected {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "seed", "groups", "group_windows", "probs"):
            if state[key] != mine[key]:
                raise SlmError(
                    f"loader state does not match this loader: {key} is {state[key]!r} in the state, "
                    f"{mine[key]!r} here (same data, split, seed and weights are needed to resume)"
                )
        if state["position"] % self.batch_size:
            raise SlmError(
                f"loader state is at window {state['position']}, not a multiple of batch_size "
                f"{self.batch_size}: resume with the same global batch"
            )
        o.position = int(state["position"])
        o.counts = [int(c) for c in state["counts"]]


def iterate_eval(
    data_dir: str | os.PathLike,
    split: str = "val",
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator:
    """One finite pass over every window of `split` in manifest order: (inputs, targets) batches.

    Micro-batch j (batch_size consecutive windows; the last may be smaller) goes to
    rank j % world_size, so ranks may get one batch more or less than each other.
    """
    import torch

    if not 0 <= rank < world_size:
        raise SlmError(f"rank {rank} is not in [0, world_size={world_size})")
    ds = PackedDataset(data_dir, split)
    if len(ds) == 0:
        raise SlmError(f"{data_dir}: split {split!r} has no windows (prepare with a larger --val-fraction)")
    for j, start in enumerate(range(0, len(ds), batch_size)):
        if j % world_size == rank:
            w = torch.from_numpy(ds.windows(range(start, min(start + batch_size, len(ds)))))
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()
