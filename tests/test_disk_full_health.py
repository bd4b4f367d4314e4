"""A full data-dir disk under a running `carehub serve`, as an operator watches it: `/health`
answers 503 saying the hub is not storing and why, `carehub_store_writable` is 0, the log holds
one failure run that ends only once there is room again, the worker's store failures show in
`/health`, and a resend of a message stored before the disk filled is still answered AA.

The data dir is a small tmpfs filled with a file, as a disk fills in production: SQLite then
still takes a write that fits in the pages its WAL file already has, and refuses one that
needs the file to grow. Mounting needs root; without it the tests are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.testing import make_adt, read_frames
from tests.test_durability import stored_counts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DISK_SIZE = "32m"
START_TIMEOUT = 60.0
ACK_TIMEOUT = 30.0
MLLP_LINE = re.compile(r"MLLP listener '\S+' on ([\d.]+):(\d+)")
HTTP_LINE = re.compile(r"HTTP listener '\S+' on ([\d.]+):(\d+)")
#: A 20 KB note: a message that needs new pages, where a status change needs one or two.
NOTE = "NTE|1||" + "x" * 20_000


class Serve:
    """`carehub serve` in its own process on free ports, its output in files."""

    def __init__(self, data_dir: Path, logs: Path, config: Path | None = None) -> None:
        self.out_path = logs / "serve.out"
        self.err_path = logs / "serve.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "carehub.cli", "serve", "--data-dir", str(data_dir)]
        command += ["--mllp-port", "0", "--http-port", "0"]
        if config is not None:
            command += ["--config", str(config)]
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=logs, env=env
            )
        self.mllp, self.http = self._wait_until_ready()

    @property
    def log(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def _wait_until_ready(self) -> tuple[tuple[str, int], str]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            out = self.out_path.read_text(encoding="utf-8", errors="replace")
            if "carehub ready" in out:
                mllp, http = MLLP_LINE.search(out), HTTP_LINE.search(out)
                assert mllp and http, out
                host = "127.0.0.1" if mllp.group(1) == "0.0.0.0" else mllp.group(1)
                return (host, int(mllp.group(2))), f"http://{http.group(1)}:{http.group(2)}"
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode}:\n{self.log}")
            time.sleep(0.05)
        pytest.fail(f"serve not ready after {START_TIMEOUT:g} s:\n{self.log}")

    def send(self, control_id: str, *segments: str) -> str:
        """Send one message on a connection of its own; its ACK code."""
        frame = encode_frame(make_adt(control_id, extra_segments=segments).encode())
        with socket.create_connection(self.mllp, timeout=ACK_TIMEOUT) as sock:
            sock.sendall(frame)
            (answer,) = read_frames(sock, 1, ACK_TIMEOUT)
        code, echoed, text = read_ack(answer.decode())
        assert echoed == control_id
        if code != "AA":
            assert "not stored" in text and "resend" in text, text
        return code

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"{self.http}/health", timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    def store_writable(self) -> float:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        found = re.search(r"^carehub_store_writable (\S+)$", text, re.MULTILINE)
        assert found, text
        return float(found.group(1))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0, self.log

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class SmallDisk:
    """A tmpfs of DISK_SIZE holding the data dir, filled up and freed at will."""

    def __init__(self, mount_point: Path) -> None:
        self.mount_point = mount_point
        self.data_dir = mount_point / "data"
        self.filler = mount_point / "filler"
        self.hubs: list[Serve] = []

    def serve(self, logs: Path, config: Path | None = None) -> Serve:
        hub = Serve(self.data_dir, logs, config)
        self.hubs.append(hub)
        return hub

    def fill(self) -> None:
        """Take every free byte but a few KB, then those too, as a growing file does."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            free = shutil.disk_usage(self.mount_point).free
            with contextlib.suppress(OSError):  # the hub took some meanwhile: written below
                os.posix_fallocate(fd, 0, max(free - 65_536, 4096))
            os.lseek(fd, 0, os.SEEK_END)
            block = b"\0" * 4096
            while True:
                try:
                    os.write(fd, block)
                except OSError as full:
                    assert full.errno == errno.ENOSPC, full
                    break
        finally:
            os.close(fd)
        assert shutil.disk_usage(self.mount_point).free < 4096

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the data dir needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    small = SmallDisk(mount_point)
    try:
        yield small
    finally:
        for hub in small.hubs:
            hub.kill()
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill_until_refused(hub: Serve, disk: SmallDisk, prefix: str) -> list[str]:
    """Fill the disk, then send large messages until one is answered "not stored" (the
    first few may still fit in the WAL file's pages); the codes answered."""
    disk.fill()
    codes: list[str] = []
    while "AE" not in codes:
        assert len(codes) < 300, "the store never refused a message on a full disk"
        codes.append(hub.send(f"{prefix}{len(codes):04d}", NOTE))
    return codes


def wait_for(check: Any, what: str, seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds:g} s")
        time.sleep(0.2)


def hub_config(tmp_path: Path, durability: str) -> Path:
    """No routes; ``durability`` picks the writer: inline (process) or on a thread (power)."""
    config = tmp_path / "carehub.yaml"
    config.write_text(f"routes: []\nstore: {{durability: {durability}}}\n", encoding="utf-8")
    return config


@pytest.mark.parametrize("durability", ["process", "power"])
def test_full_disk_health_is_503_store_writable_0_and_one_failure_run(
    tmp_path: Path, disk: SmallDisk, durability: str
) -> None:
    hub = disk.serve(tmp_path, hub_config(tmp_path, durability))
    assert f"durability={durability}" in hub.out_path.read_text(encoding="utf-8")
    assert hub.send("ROOM0000", NOTE) == "AA"
    assert hub.health()[0] == 200

    fill_until_refused(hub, disk, "FULL")
    # Each /health and scrape tries a write while intake's fail: a write that fits in the
    # WAL file's pages must not take the hub for one that takes messages again.
    for round_ in range(3):
        status, report = hub.health()
        assert status == 503, report
        assert report["status"] == "store unavailable", report
        store = report["store"]
        assert store.startswith("not storing since "), store
        assert "database or disk is full" in store and "needed" in store, store
        assert hub.store_writable() == 0
        assert [hub.send(f"MORE{round_}{i}", NOTE) for i in range(3)] == ["AE"] * 3

    log = hub.log
    assert len(re.findall(r"store write failed \(", log)) == 1, log
    assert "store write works again" not in log, log

    disk.free()
    status, report = wait_for(
        lambda: (lambda found: found if found[0] == 200 else None)(hub.health()),
        "/health back to 200 once the disk has room",
    )
    assert report["store"] == "ok", report
    assert hub.store_writable() == 1
    assert hub.send("BACK0000", NOTE) == "AA"
    log = hub.log
    assert len(re.findall(r"store write failed \(", log)) == 1, log
    assert len(re.findall(r"store write works again after", log)) == 1, log
    hub.stop()


def test_worker_store_failures_show_in_health(tmp_path: Path, disk: SmallDisk) -> None:
    """A delivery that keeps failing has its every attempt written to the store: once the
    disk is full those writes fail, routing and delivery stand still, and /health says so."""
    outbox = tmp_path / "out"
    (tmp_path / "routes.yaml").write_text(
        "routes:\n"
        "  - name: archive\n"
        "    when: {type: ADT}\n"
        "    steps:\n"
        "      - forward:\n"
        "          channel: file\n"
        "          name: archive\n"
        f"          directory: {outbox}\n"
        "          retry: {max_attempts: forever, initial_delay: 0.2, multiplier: 1,"
        " max_delay: 0.2}\n",
        encoding="utf-8",
    )
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    hub = disk.serve(tmp_path, config)
    # The archive's folder becomes a file: every attempt fails, and is recorded.
    shutil.rmtree(outbox)
    outbox.write_bytes(b"")
    assert hub.send("WORK0000") == "AA"
    status, report = hub.health()
    assert (status, report.get("worker")) == (200, "ok"), report

    fill_until_refused(hub, disk, "FULL")
    status, report = wait_for(
        lambda: (lambda found: found if found[1].get("worker", "ok") != "ok" else None)(
            hub.health()
        ),
        "/health saying the worker cannot use the store",
    )
    assert status == 503, report
    worker = report["worker"]
    assert worker.startswith("cannot use the store since "), worker
    assert "database or disk is full" in worker and "routing and delivery wait" in worker

    disk.free()
    wait_for(lambda: hub.health()[1]["worker"] == "ok", "the worker's store use back")
    hub.stop()


@pytest.mark.parametrize("durability", ["process", "power"])
def test_resend_of_a_message_stored_before_the_disk_filled_is_answered_aa(
    tmp_path: Path, disk: SmallDisk, durability: str
) -> None:
    """Only the resend's history row could not be written: the message is stored, so the
    sender is told so, and does not send it again and again through the outage."""
    hub = disk.serve(tmp_path, hub_config(tmp_path, durability))
    assert f"durability={durability}" in hub.out_path.read_text(encoding="utf-8")
    assert hub.send("KEPT0000", NOTE) == "AA"
    fill_until_refused(hub, disk, "FULL")
    # Each resend wants a row of history: the first few may fit, the rest cannot.
    assert [hub.send("KEPT0000", NOTE) for _ in range(12)] == ["AA"] * 12
    assert hub.send("NEW00000", NOTE) == "AE"  # a new message is still refused
    disk.free()
    assert hub.send("KEPT0000", NOTE) == "AA"
    hub.stop()
    counts = stored_counts(disk.data_dir)
    assert counts.get("KEPT0000") == 1, counts
    assert "NEW00000" not in counts
