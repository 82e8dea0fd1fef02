"""Progress of long operations (sensitivity, search verification, GPTQ calibration).

Every long operation takes `progress=`:
- True (default): a tqdm bar on stderr when stderr is a terminal, else one INFO log line per unit
  (logger `mxfx.progress`), so batch jobs and CI logs stay readable;
- False or None: nothing;
- a callable: called as `progress(done, total, elapsed_s, label)` after each unit of work.

    report = mxfx.sensitivity(model, batches, mode="gradient", progress=False)
    report = mxfx.sensitivity(model, batches, progress=lambda done, total, s, label: print(done, total, label))

A callable may raise (e.g. `KeyboardInterrupt`) to stop a run; with `resume=` the units already
finished are on disk, and a resumed run repeats at most the unit that was interrupted.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float, str], None]
Progress = bool | ProgressCallback | None


class Reporter:
    """One operation's progress: `update(label)` after each finished unit, `close()` at the end.

        with Reporter(progress, total=len(items), what="sensitivity") as report:
            for item in items:
                ...
                report.update(str(item))
    """

    def __init__(self, progress: Progress, total: int, what: str, done: int = 0) -> None:
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress must be True, False or a callable, got {type(progress).__name__}")
        self.callback = progress if callable(progress) and not isinstance(progress, bool) else None
        self.total, self.what, self.done = total, what, done
        self.start = time.perf_counter()
        self.bar: Any = None
        self.log = progress is True and self.callback is None
        if self.log and sys.stderr is not None and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, desc=what, unit="step", leave=False)
                self.log = False
            except ImportError:  # tqdm is a dependency; a broken install still gets log lines
                pass

    def update(self, label: str) -> None:
        """Count one finished unit of work, named `label`."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.set_postfix_str(label[:40], refresh=False)
            self.bar.update(1)
        elif self.log:
            log.info("%s %d/%d (%s), %.1f s elapsed", self.what, self.done, self.total, label, elapsed)
        if self.callback is not None:
            self.callback(self.done, self.total, elapsed, label)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
