"""A run of the same failure, logged as a run: when it starts, while it lasts, when it ends.

A full disk or a lost database fails every commit and every checkpoint until someone acts. A log
line per failure would be thousands a second under a busy feed, written to the disk that has
just filled up, and would bury the one line that says what happened.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

log = logging.getLogger(__name__)


class FailureRun:
    """Logs the first failure of a run (with its traceback), then at most one line every
    ``report_every`` seconds with how many failed meanwhile, and one line when it works again.

    Both failure lines go out at ``level``; ``traceback=False`` leaves the traceback out, for
    failures whose kind and text say it all (a destination that does not answer)."""

    def __init__(
        self,
        what: str,
        meanwhile: str,
        unit: str,
        *,
        report_every: float = 30.0,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.ERROR,
        traceback: bool = True,
    ) -> None:
        self.what = what  # "store write"
        self.meanwhile = meanwhile  # what carehub does until it works again
        self.unit = unit  # what the counts count: "message(s)"
        self.report_every = report_every
        self._log = logger
        self._clock = clock
        self._level = level
        self._traceback = traceback
        self.failing_since: float | None = None
        #: When the run began, by the wall clock, and the latest failure's first line: what
        #: /health says while it lasts.
        self.failing_since_at: datetime | None = None
        self.last_error = ""
        self._last_report = 0.0
        self._since_report = 0
        self._in_run = 0

    def failed(self, err: BaseException, count: int = 1) -> None:
        now = self._clock()
        self._in_run += count
        self.last_error = (str(err) or type(err).__name__).split("\n", 1)[0][:200]
        if self.failing_since is None:
            self.failing_since = self._last_report = now
            self.failing_since_at = datetime.now(UTC)
            self._since_report = 0
            self._log.log(
                self._level,
                "%s failed (%s): %s",
                self.what,
                err,
                self.meanwhile,
                exc_info=err if self._traceback else None,
            )
            return
        self._since_report += count
        if now - self._last_report >= self.report_every:
            self._log.log(
                self._level,
                "%s still failing (%s): %d %s in the last %.0f s",
                self.what,
                err,
                self._since_report,
                self.unit,
                now - self._last_report,
            )
            self._last_report = now
            self._since_report = 0

    def succeeded(self) -> None:
        if self.failing_since is None:
            return
        self._log.warning(
            "%s works again after %.1f s (%d %s failed meanwhile)",
            self.what,
            self._clock() - self.failing_since,
            self._in_run,
            self.unit,
        )
        self.failing_since = None
        self.failing_since_at = None
        self._in_run = 0
