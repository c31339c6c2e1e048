"""Progress for people and for logs: tqdm bars on a terminal, plain bounded-rate lines elsewhere, nothing with --quiet.

Written to a file or a CI log, a bar's carriage returns and escape sequences
pile up; there each long loop prints at most one plain line per `LOG_INTERVAL_S`
("fit g: 4200/20000 steps, 2m10s elapsed, ETA 8m"), and none for loops
shorter than that.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from refiner.engine import distributed as dist

__all__ = ["bar", "set_quiet", "stage"]

LOG_INTERVAL_S = 30.0
_quiet = False


def set_quiet(quiet: bool) -> None:
    """--quiet: no bars, no lines, no stage messages (errors and results still print)."""
    global _quiet
    _quiet = quiet


class _PlainLines(tqdm):
    """A tqdm that writes a plain line at most every LOG_INTERVAL_S seconds, never at its start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(mininterval=LOG_INTERVAL_S, miniters=1, leave=False)
        self._last_line = 0.0  # elapsed seconds at the last line written
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        # tqdm also refreshes from set_postfix and from its monitor thread: the rate limit has to live here
        d = self.format_dict
        if self.n == 0 or d["elapsed"] - self._last_line < LOG_INTERVAL_S:
            return
        self._last_line = d["elapsed"]
        total = f"/{d['total']}" if d["total"] else ""
        eta = ""
        if d["total"] and self.n:
            eta = f", ETA {self.format_interval(d['elapsed'] * (d['total'] - self.n) / self.n)}"
        self.fp.write(f"{self.desc}: {self.n}{total} {self.unit}s, {self.format_interval(d['elapsed'])} elapsed{eta}\n")
        self.fp.flush()


def _terminal() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal; plain lines in a log; silent with --quiet or on ranks other than 0."""
    if _quiet or not dist.is_main():
        kwargs["disable"] = True
    return (tqdm if _terminal() else _PlainLines)(iterable, **kwargs)


def stage(message: str) -> None:
    """One line saying which stage of a long command starts (stderr; not with --quiet)."""
    if not _quiet and dist.is_main():
        print(f"== {message}", file=sys.stderr, flush=True)
