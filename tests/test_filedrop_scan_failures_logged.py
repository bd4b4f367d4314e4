"""A file drop inbox that cannot be read while the process is out of file descriptors is one
WARNING a minute, without a traceback, not an ERROR with a traceback at every poll; once it
can be read again one INFO says so, and the files waiting are taken.

`carehub serve` runs as a real process; its open-file limit is lowered below the descriptors
it holds (prlimit, as `ulimit -n` would set it), so each scan's listing of the inbox fails with
EMFILE, then raised again."""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path

import pytest

from carehub.testing import make_adt
from tests.helpers_http import CarehubProcess, wait_for
from tests.test_filedrop import drop, names, serve_inbox

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="prlimit on another process is Linux's"
)

RECOVERED = re.compile(r"file drop inbox: the inbox \S+ is read again, after (\d+) failed scan")


def test_an_inbox_that_cannot_be_read_is_one_warning_and_one_info(tmp_path: Path) -> None:
    inbox, args = serve_inbox(tmp_path)
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        drop(inbox, "before.hl7", make_adt("BEFORE-1").encode())
        wait_for(lambda: "before.hl7" in names(inbox / "processed"), what="a file taken")

        pid = serve.process.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # No descriptor is free below 3 (stdin, stdout, stderr): every new one is refused.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        try:
            wait_for(
                lambda: "cannot read the inbox" in serve.stderr or "scan failed" in serve.stderr,
                what="a failed scan logged",
            )
            drop(inbox, "during.hl7", make_adt("DURING-1").encode())
            time.sleep(1.0)  # some twenty scans fail meanwhile
            assert "during.hl7" in names(inbox)  # not taken: the inbox cannot be listed
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)

        wait_for(lambda: "during.hl7" in names(inbox / "processed"), what="the waiting file")
        assert serve.terminate() == 0
    log = serve.stderr
    failed = [line for line in log.splitlines() if "cannot read the inbox" in line]
    assert len(failed) == 1, log
    assert "WARNING" in failed[0]
    assert "Too many open files (open-file limit 3, ulimit -n)" in failed[0]
    assert "Traceback" not in log
    assert "scan failed" not in log
    recovered = RECOVERED.search(log)
    assert recovered is not None and int(recovered.group(1)) > 1
