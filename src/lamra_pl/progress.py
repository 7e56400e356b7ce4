"""Progress of long work, live on a terminal and line by line in a log: the one way lamra-pl reports it.

`progress(...)` counts the items of a long loop (`index`, `retrieve`, `rerank`, `rerank-data`, `distill-data`, `mine`,
`convert-mbeir`, `convert-nli`, the Python API's encoding) and shows their count and rate:

- on a terminal, a tqdm bar redrawn in place;
- anywhere else (a log file, a pipe, `make demo > demo.log`), `LogLines`: a plain line at each tenth of a known
  total (or every `every` items) and at least every `LOG_EVERY_S` seconds while items arrive, then a last line when
  it closes; never a carriage-return frame, so a log shows how the work went, not only where it ended.

    index: 300/981 candidates (31%), 52.3 candidates/s, 00:05 elapsed, 00:13 left

`lamra_pl.Progress` (`lamra_pl.callbacks`) does the same for `fit`'s training steps.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

T = TypeVar("T")

LOG_EVERY_S = 60.0  # in a log, a line at least this often while items arrive (a tenth of a long job can be hours)
MIN_GAP_S = 1.0  # and at most one a second (a job of a second is one line, its last)


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (a bar can be redrawn on it)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "items",
    disable: bool = False,
    file: IO[str] | None = None,
    every: int | None = None,
    initial: int = 0,
) -> tqdm | LogLines:
    """A progress report over `total` items (None: unknown) of `unit` (a plural noun), written to `file` (default
    stderr): a tqdm bar there when it is a terminal, `LogLines` otherwise. Use it as tqdm: `update(n)`,
    `set_postfix(...)`, `close()`, a context manager, or iterate it when given an `iterable`. `every`: in a log,
    a line every that many items instead of every tenth of the total."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        from tqdm import tqdm  # here: importing it takes a tenth of a second, which `lamra-pl --help` need not pay

        # A leading space: tqdm writes the unit right after the rate ("52.3 candidates/s").
        return tqdm(iterable, total=total, desc=desc, unit=f" {unit}", disable=disable, file=file, initial=initial)
    return LogLines(
        iterable, total=total, desc=desc, unit=unit, disable=disable, file=file, every=every, initial=initial
    )


def counted(iterable: Iterable[T], bar: tqdm | LogLines) -> Iterator[T]:
    """The items of `iterable`, each counted by `bar` once it is taken (one bar over several loops)."""
    for item in iterable:
        yield item
        bar.update(1)


class LogLines:
    """A progress report for a log: plain lines with the count, the share of the total, the rate (over this run's
    items: `initial` ones are not counted in it), the time elapsed and the time left. A line is written when the
    count passes a multiple of `every` (default: a tenth of the total; none when the total is unknown) at least
    `min_gap` seconds after the last line, or `seconds` after it whatever the count, and when the report closes (the
    count so far; nothing if no item came since the last)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "items",
        disable: bool = False,
        file: IO[str] | None = None,
        every: int | None = None,
        initial: int = 0,
        seconds: float = LOG_EVERY_S,
        min_gap: float = MIN_GAP_S,
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable, self.file, self.seconds, self.min_gap = disable, file, seconds, min_gap
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)  # type: ignore[arg-type]
        self.every = every if every else (max(1, math.ceil(self.total / 10)) if self.total else None)
        self.n = self.start = self.last_n = initial
        self.started = self.last_t = time.monotonic()
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LogLines was given no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self.disable or self.closed:
            return
        before, self.n = self.n, self.n + n
        now = time.monotonic()
        passed = self.every is not None and self.n // self.every > before // self.every
        finished = self.total is not None and self.n >= self.total  # the closing line says it
        since = now - self.last_t
        if (passed and not finished and since >= self.min_gap) or since >= self.seconds:
            self._line(now)

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown after the rate (`loss 0.355`), as tqdm's `set_postfix`."""
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {_number(v)}" for k, v in values.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Write a line now (tqdm's name for it)."""
        if not (self.disable or self.closed):
            self._line(time.monotonic())

    def close(self) -> None:
        if self.disable or self.closed:
            return
        self.closed = True
        if self.n != self.last_n or self.last_t == self.started:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last_n, self.last_t = self.n, now
        elapsed = now - self.started
        done = self.n - self.start
        rate = done / elapsed if elapsed > 0 else None
        if self.total:
            parts = [f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"]
        else:
            parts = [f"{self.n} {self.unit}"]
        parts.append(f"{_number(rate)} {self.unit}/s" if rate is not None else f"? {self.unit}/s")
        parts.append(f"{_interval(elapsed)} elapsed")
        if self.total and rate and self.n < self.total:
            parts.append(f"{_interval((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        text = ", ".join(parts)
        print(f"{self.desc}: {text}" if self.desc else text, file=self.file or sys.stderr, flush=True)


def _number(value: Any) -> str:
    """A rate or a metric, readable: 3 significant digits below 100, whole numbers (with separators) above."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _interval(seconds: float) -> str:
    """[H:]MM:SS, as tqdm writes times."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
