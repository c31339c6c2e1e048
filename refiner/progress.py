"""Progress for people and for logs: tqdm bars on a terminal or in Jupyter, plain bounded-rate lines elsewhere.

Stage lines and notes are records of the `refiner` logger (INFO), which the
command line prints on stderr and a library user sees once logging is set up;
`set_progress(False)` turns the bars off.

Written to a file or a CI log, a bar's carriage returns and escape sequences
pile up; there each long loop prints at most one plain line per `LOG_INTERVAL_S`
("fit g: 4200/20000 steps, 2m10s elapsed, ETA 8m"), and none for loops
shorter than that. Each long stage has one bar over all its work (images,
steps, fine-tuning epochs); a bar given `advice` says, once its first
`ESTIMATE_AFTER_S` seconds measure that it will take over `LONG_S`, how long
and what shortens it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm  # a widget in Jupyter, a text bar elsewhere
else:
    from tqdm.std import tqdm  # tqdm.auto would warn "IProgress not found" in every kernel without ipywidgets

__all__ = ["LOGGER", "CommandLineHandler", "bar", "note", "paused", "set_progress", "set_quiet", "stage"]

LOGGER = logging.getLogger("refiner")
LOGGER.addHandler(logging.NullHandler())  # a library logs; the application decides what is shown

LOG_INTERVAL_S = float(os.environ.get("REFINER_LOG_INTERVAL_S", 30.0))  # seconds between plain progress lines in a log
LONG_S = 600.0  # a stage measured to take longer than this gets its estimate and advice printed
ESTIMATE_AFTER_S = 10.0  # seconds of a stage measured before its length is estimated
_quiet = False


def set_quiet(quiet: bool) -> None:
    """--quiet: no progress bars or lines (the command line also hides the logger's INFO records)."""
    global _quiet
    _quiet = quiet


def set_progress(enabled: bool) -> None:
    """Show (True, the default) or hide refiner's progress bars, in a terminal, a log or a notebook.

    Examples:
        >>> import refiner
        >>> refiner.set_progress(False)  # no bars from here on
        >>> refiner.set_progress(True)
    """
    set_quiet(not enabled)


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or the only process (RANK is set by torchrun before the group is joined)."""
    return os.environ.get("RANK", "0") == "0"


class _Estimated(tqdm):
    """A tqdm that, given `advice`, prints once how long its whole loop will take when that is over LONG_S.

    The estimate is the rate of the first ESTIMATE_AFTER_S seconds (or more) of
    work, counted from `initial` and without time spent in `paused`, times the
    total; `advice` says what shortens it ("--g-steps N, --device cuda").
    """

    def __init__(self, *args: Any, advice: str | None = None, **kwargs: Any) -> None:
        self.advice = advice
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if self.advice and not self.disable and self.total and self.n > self.initial:
            elapsed = self._time() - self.start_t
            if elapsed >= ESTIMATE_AFTER_S:
                done = self.n - self.initial
                whole = elapsed * (self.total - self.initial) / done
                advice, self.advice = self.advice, None
                if whole > LONG_S:
                    self.note(
                        f"{self.desc}: {self.total} {plural(self.unit)} will take about {self.format_interval(whole)} at the rate of "
                        f"the first {done} ({self.format_interval(elapsed)}); {advice}"
                    )
        return shown

    def note(self, message: str) -> None:
        self.write(message, file=self.fp)


class _PlainLines(_Estimated):
    """A tqdm that writes a plain line at most every LOG_INTERVAL_S seconds, never at its start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(mininterval=LOG_INTERVAL_S, miniters=1, leave=False)
        self._last_line = 0.0  # elapsed seconds at the last line written
        super().__init__(*args, **kwargs)

    def note(self, message: str) -> None:
        self.fp.write(message + "\n")
        self.fp.flush()

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        # tqdm also refreshes from set_postfix and from its monitor thread: the rate limit has to live here
        d = self.format_dict
        if self.n == self.initial or d["elapsed"] - self._last_line < LOG_INTERVAL_S:
            return
        self._last_line = d["elapsed"]
        total = f"/{d['total']}" if d["total"] else ""
        eta = ""
        if d["total"]:
            eta = f", ETA {self.format_interval(d['elapsed'] * (d['total'] - self.n) / (self.n - self.initial))}"
        self.fp.write(f"{self.desc}: {self.n}{total} {plural(self.unit)}, {self.format_interval(d['elapsed'])} elapsed{eta}\n")
        self.fp.flush()


def plural(unit: str) -> str:
    """"batch" -> "batches", "epoch" -> "epochs" (the units refiner's bars count)."""
    return {"batch": "batches", "image": "images"}.get(unit, unit + "s")


def _terminal() -> bool:
    """A terminal, or a Jupyter kernel (where tqdm.auto draws a widget): anywhere a bar redraws in place."""
    return (sys.stderr.isatty() and os.environ.get("TERM") != "dumb") or tqdm.__module__ == "tqdm.notebook"


def bar(iterable: Iterable[Any] | None = None, *, advice: str | None = None, **kwargs: Any) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal; plain lines in a log; silent with --quiet or on ranks other than 0.

    `advice`: what shortens the loop, printed with its measured length when that is over LONG_S.
    """
    if _quiet or not _is_main():
        kwargs["disable"] = True
    return (_Estimated if _terminal() else _PlainLines)(iterable, advice=advice, **kwargs)


@contextlib.contextmanager
def paused(shown: tqdm) -> Iterator[None]:
    """Leave the time spent inside out of `shown`'s elapsed time, rate and ETA (e.g. compiling)."""
    t0 = time.time()  # tqdm's clock
    try:
        yield
    finally:
        if not shown.disable:
            dt = time.time() - t0
            shown.start_t += dt
            shown.last_print_t += dt


def stage(message: str) -> None:
    """Which stage of a long run starts: an INFO record of the `refiner` logger (rank 0 only)."""
    if _is_main():
        LOGGER.info(message, extra={"stage": True})


def note(message: str) -> None:
    """What a stage is doing: an INFO record of the `refiner` logger (rank 0 only)."""
    if _is_main():
        LOGGER.info(message)


class CommandLineHandler(logging.Handler):
    """How the command line shows the logger: stage records as "== message", others plain, on stderr above any bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            line = f"== {message}" if getattr(record, "stage", False) else message
            if _terminal():
                tqdm.write(line, file=sys.stderr)  # above the bars, which it clears and redraws
            else:
                sys.stderr.write(line + "\n")  # a log: plain lines (tqdm.write would clear the plain bars with carriage returns)
            sys.stderr.flush()
        except Exception:  # a handler never raises into the code that logged
            self.handleError(record)
