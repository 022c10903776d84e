"""What `slm data prepare` says about skipped documents and files.

By default one line per source at the end (counts by reason; every name is in manifest.json);
with `show=True` (`--show-skipped`) each bad one is also named on stderr as it is met, the
first `MAX_PRINTED` per source. `--strict` makes the first bad one fatal instead.
"""

from __future__ import annotations

import sys
from collections import Counter

from slm.data.sources import Skip
from slm.errors import SlmError

MAX_PRINTED = 100  # per source on stderr, with show=True


def reason_kind(reason: str) -> str:
    """The reason without its details ('not UTF-8 (byte 3)' -> 'not UTF-8'), for counting."""
    return reason.split(" (", 1)[0]


def counts_by_reason(skips: list[Skip]) -> dict[str, int]:
    return dict(sorted(Counter(reason_kind(sk.reason) for sk in skips).items()))


def check_strict(strict: bool, skips: list[Skip]) -> None:
    if strict:
        for sk in skips:
            if sk.bad:
                raise SlmError(f"{sk.where}: {sk.reason} (--strict)")


def report(new: list[Skip], earlier: list[Skip], show: bool, bar=None) -> None:
    """With `show`, name bad documents on stderr as they come, the first MAX_PRINTED per source."""
    if not show:
        return
    printed = sum(sk.bad for sk in earlier)
    for sk in new:
        if sk.bad and printed < MAX_PRINTED:
            printed += 1
            msg = f"slm: skipped {sk.where}: {sk.reason}"
            if bar is not None:
                bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr)


def summarise(source: str, skips: list[Skip], show: bool) -> None:
    """One line on stderr for a source's skips: how many, by reason."""
    if not skips:
        return
    by_reason = ", ".join(f"{reason} {n}" for reason, n in counts_by_reason(skips).items())
    more = "" if show and sum(sk.bad for sk in skips) <= MAX_PRINTED else "; names in manifest.json"
    hint = "" if show else " (--show-skipped names them)"
    print(f"slm: {source}: skipped {len(skips)}: {by_reason}{more}{hint}", file=sys.stderr)
