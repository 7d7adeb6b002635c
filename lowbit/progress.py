"""Progress of a long step on stderr, one style everywhere: a tqdm bar on a terminal; in a log (not
a terminal) a line when the step starts, one every `every` seconds while it runs and one when it
ends. The periodic lines come from a thread, so a step with no natural unit of work (a
sensitivity metric) still shows it is alive.

    with Progress("evaluating", total=n_windows) as p:
        for batch in ...:
            ...
            p.update(len(batch))
"""
from __future__ import annotations

import sys
import threading
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, desc: str, total: int | None = None, enabled: bool = True, every: float = 5.0,
                 unit: str = "it", file=None, announce: bool = True, first: float | None = None):
        """announce=False: in a log only the periodic lines (a step inside another that reports
        its own start and end, e.g. a block's iterations); first: seconds to the first periodic
        line (default `every`)."""
        self.desc, self.total, self.enabled, self.every, self.unit = desc, total, enabled, every, unit
        self.announce, self.first = announce, every if first is None else first
        self.file = file or sys.stderr
        self.done, self.t0 = 0, time.perf_counter()
        self.bar = None
        self._stop = threading.Event()
        self._thread = None

    def _line(self, msg: str) -> None:
        print(f"{self.desc}: {msg}", file=self.file, flush=True)

    def _status(self) -> str:
        elapsed = time.perf_counter() - self.t0
        count = f"{self.done}/{self.total} {self.unit}, " if self.total else (f"{self.done} {self.unit}, " if self.done else "")
        return f"{count}{elapsed:.0f}s"

    def _beat(self) -> None:
        wait = self.first
        while not self._stop.wait(wait):
            self._line(self._status())
            wait = self.every

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        self.t0 = time.perf_counter()
        if self.file.isatty():
            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, file=self.file, leave=False)
        else:
            if self.announce:
                self._line("started" + (f" ({self.total} {self.unit})" if self.total else ""))
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self.bar.close()
        if exc[0] is None and self.announce and self.bar is None:
            self._line(f"done in {time.perf_counter() - self.t0:.1f}s")
