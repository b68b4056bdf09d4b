"""Progress: rich bars on a terminal, plain throttled log lines elsewhere (CI, pipes, files).

Usage: `rep = Reporter(quiet=False)`, `rep.log("...")`, `with rep.task("CHARTEVENTS", total,
"bytes") as advance: advance(n)`. Every stage of medhmp reports through this one class; it imports
rich only, so the lightest modules (synthetic.py) can use it too. Messages go to stderr; stdout is
left for results.
"""
from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)


class Reporter:
    """Rich progress bars on a terminal, plain throttled log lines elsewhere (CI, pipes, files).

    `with reporter.task("CHARTEVENTS", total=n_bytes, unit="bytes") as advance: advance(k)`.
    `quiet=True` silences everything (tests). Messages go to stderr; stdout is left for results.
    """

    def __init__(self, quiet: bool = False, interval: float = 10.0):
        self.quiet = quiet
        self.interval = interval  # seconds between plain progress lines
        self.console = Console(stderr=True, highlight=False)
        self.live = self.console.is_terminal and not os.environ.get("CI")

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False, soft_wrap=True)

    def task(self, description: str, total: float | None, unit: str = "rows"):
        return _Task(self, description, total, unit)

    def bytes_task(self, description: str, total: float | None):
        return _Task(self, description, total, "bytes")


class _Task:
    def __init__(self, rep: Reporter, description: str, total: float | None, unit: str):
        self.rep, self.description, self.total, self.unit = rep, description, total, unit
        self.done, self.status = 0.0, ""
        self.start = self.last = time.perf_counter()
        self.progress = None

    def __enter__(self):
        if self.rep.quiet:
            return self.advance
        if self.rep.live:
            sizes = ([DownloadColumn(), TransferSpeedColumn()] if self.unit == "bytes"
                     else [MofNCompleteColumn()])
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), *sizes,
                                     TimeElapsedColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.fields[status]}"), console=self.rep.console,
                                     transient=False)
            self.progress.start()
            self.id = self.progress.add_task(self.description, total=self.total, status="")
        return self.advance

    def advance(self, n: float = 1, status: str | None = None) -> None:
        self.done += n
        if status is not None:
            self.status = status
        if self.rep.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.id, advance=n, status=self.status)
            return
        now = time.perf_counter()
        if now - self.last >= self.rep.interval:
            self.last = now
            self.rep.log(f"{self.description}: {self._amount()} {self.status}".rstrip())

    def _amount(self) -> str:
        def fmt(x):
            return f"{x / 2**20:.1f} MiB" if self.unit == "bytes" else f"{int(x):,}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{fmt(self.done)}{f' / {fmt(self.total)}' if self.total else ''}{pct} " \
               f"in {time.perf_counter() - self.start:.1f} s"

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        elif not self.rep.quiet and exc[0] is None:
            self.rep.log(f"{self.description}: done, {self._amount()} {self.status}".rstrip())
        return False
