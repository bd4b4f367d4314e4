"""Crash and shutdown safety of `carehub serve` as a real process: an AA is only sent after the
message is committed, so a SIGKILL right after the last ACK loses nothing, and SIGTERM finishes
in-flight messages and exits 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from carehub.config import HubConfig
from carehub.hl7.ack import read_ack
from carehub.hl7.framing import encode_frame
from carehub.hub import open_store
from carehub.testing import make_adt, read_frames

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LISTENER_LINE = re.compile(r"MLLP listener '(\S+)' on ([\d.]+):(\d+)")
START_TIMEOUT = 60.0
ACK_TIMEOUT = 30.0


def _limit_file_size(limit: int) -> Callable[[], None]:
    """For the child: no file may grow past ``limit`` bytes (RLIMIT_FSIZE, soft limit only, so
    a test can lift it again with prlimit): to the process, the disk is full."""

    def limit_in_child() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return limit_in_child


class HubProcess:
    """`carehub serve` in its own process, on free ports, with its output in files."""

    def __init__(
        self, data_dir: Path, logs: Path, name: str, file_size_limit: int | None = None
    ) -> None:
        self.stdout_path = logs / f"{name}.out"
        self.stderr_path = logs / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREHUB_")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [sys.executable, "-m", "carehub.cli", "serve", "--data-dir", str(data_dir)]
        command += ["--mllp-port", "0", "--http-port", "0"]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=logs,
                env=env,
                preexec_fn=_limit_file_size(file_size_limit) if file_size_limit else None,
            )
        self.address = self._wait_until_ready()

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def _wait_until_ready(self) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            out = self.stdout
            if "carehub ready" in out:
                match = LISTENER_LINE.search(out)
                assert match, f"no MLLP listener line in:\n{out}"
                host = "127.0.0.1" if match.group(2) == "0.0.0.0" else match.group(2)
                return host, int(match.group(3))
            if self.process.poll() is not None:
                pytest.fail(
                    f"carehub serve exited with {self.process.returncode} before it was ready\n"
                    f"stdout:\n{out}\nstderr:\n{self.stderr}"
                )
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"carehub serve not ready after {START_TIMEOUT:g} s\nstderr:\n{self.stderr}")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[list[HubProcess]]:
    """Every hub process a test starts is killed at the end, whatever happened."""
    started: list[HubProcess] = []
    yield started
    for hub in started:
        hub.kill()


def start_hub(hubs: list[HubProcess], data_dir: Path, name: str) -> HubProcess:
    hub = HubProcess(data_dir, data_dir.parent, name)
    hubs.append(hub)
    return hub


def stored_counts(data_dir: Path) -> dict[str, int]:
    store = open_store(HubConfig(), data_dir)
    try:
        return store.control_id_counts()
    finally:
        store.close()


def send_and_confirm(sock: socket.socket, control_id: str) -> None:
    """Send one message and require its AA."""
    sock.sendall(encode_frame(make_adt(control_id).encode()))
    (answer,) = read_frames(sock, 1, ACK_TIMEOUT)
    code, echoed, text = read_ack(answer.decode())
    assert (code, echoed) == ("AA", control_id), text


def test_sigkill_right_after_the_last_ack_loses_nothing(
    tmp_path: Path, hubs: list[HubProcess]
) -> None:
    data_dir = tmp_path / "data"
    hub = start_hub(hubs, data_dir, "first")
    connections = 5
    per_connection = 100
    expected = {f"DUR-{c}-{i:03d}" for c in range(connections) for i in range(per_connection)}

    def client(number: int) -> socket.socket:
        sock = socket.create_connection(hub.address, timeout=ACK_TIMEOUT)
        for i in range(per_connection):
            send_and_confirm(sock, f"DUR-{number}-{i:03d}")
        return sock  # left open: the hub dies under connected clients

    with ThreadPoolExecutor(connections) as pool:
        sockets = list(pool.map(client, range(connections)))
    hub.signal(signal.SIGKILL)  # every one of the 500 messages has had its AA
    assert hub.wait(30) == -signal.SIGKILL
    for sock in sockets:
        sock.close()

    again = start_hub(hubs, data_dir, "second")
    # A sender that missed nothing still resends a few: AA, and not stored a second time.
    resent = sorted(expected)[:10]
    with socket.create_connection(again.address, timeout=ACK_TIMEOUT) as sock:
        for control_id in resent:
            send_and_confirm(sock, control_id)
    again.signal(signal.SIGTERM)
    assert again.wait() == 0, again.stderr
    assert "stopping" in again.stdout

    counts = stored_counts(data_dir)
    assert set(counts) == expected
    assert set(counts.values()) == {1}
    store = open_store(HubConfig(), data_dir)
    try:
        by_control_id = {m.control_id: m.id for m in store.find(limit=None)}
        for control_id in resent:
            events = [c.event for c in store.history(by_control_id[control_id])]
            assert events[0] == "received" and events.count("resent") == 1, events
    finally:
        store.close()


#: Both ways an operator stops the hub: SIGTERM (systemd, docker stop) and Ctrl-C (SIGINT).
STOP_SIGNALS = pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])


@STOP_SIGNALS
def test_stop_while_idle_exits_0(tmp_path: Path, hubs: list[HubProcess], stop: int) -> None:
    """A stop signal to an idle hub with a client connected: exit 0, the "stopping" line, no
    traceback (nor KeyboardInterrupt for Ctrl-C), the ACKed message stored."""
    data_dir = tmp_path / "data"
    hub = start_hub(hubs, data_dir, "idle")
    with socket.create_connection(hub.address, timeout=ACK_TIMEOUT) as sock:
        send_and_confirm(sock, "IDLE-1")
        # This connection stays open and quiet while the hub is told to stop.
        hub.signal(stop)
        assert hub.wait() == 0, hub.stderr
    assert "carehub stopping" in hub.stdout
    assert "Traceback" not in hub.stderr and "KeyboardInterrupt" not in hub.stderr
    assert stored_counts(data_dir) == {"IDLE-1": 1}


@STOP_SIGNALS
def test_stop_mid_stream_stores_every_acked_message(
    tmp_path: Path, hubs: list[HubProcess], stop: int
) -> None:
    """A stop signal while five connections stream (three one at a time, two pipelined): the
    hub answers what it has read, exits 0, every message that got an AA is stored exactly once,
    and no sender ever saw anything but AA for the message it sent."""
    data_dir = tmp_path / "data"
    hub = start_hub(hubs, data_dir, "busy")
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    errors: list[BaseException] = []

    def record(control_id: str) -> None:
        with lock:
            acked.append(control_id)
            if len(acked) >= 150:
                enough.set()

    def one_at_a_time(number: int) -> None:
        """Send, wait for the AA, send the next, until the hub goes away."""
        try:
            with socket.create_connection(hub.address, timeout=ACK_TIMEOUT) as sock:
                for i in range(100_000):
                    control_id = f"SEQ-{number}-{i}"
                    send_and_confirm(sock, control_id)
                    record(control_id)
        except OSError:
            pass  # the hub closed the connection: the stream is over
        except BaseException as err:  # a wrong answer: reported by the test, not the thread
            errors.append(err)

    def pipelined(number: int, window: int = 8) -> None:
        """Keep ``window`` messages in flight; an AA may come for any of them."""
        sent = 0
        try:
            with socket.create_connection(hub.address, timeout=ACK_TIMEOUT) as sock:
                while True:
                    frames = b"".join(
                        encode_frame(make_adt(f"PIPE-{number}-{sent + k}").encode())
                        for k in range(window)
                    )
                    sock.sendall(frames)
                    expected = [f"PIPE-{number}-{sent + k}" for k in range(window)]
                    sent += window
                    answers = read_frames(sock, window, ACK_TIMEOUT)
                    for answer, control_id in zip(answers, expected, strict=True):
                        code, echoed, text = read_ack(answer.decode())
                        assert (code, echoed) == ("AA", control_id), text
                        record(control_id)
        except OSError:
            pass  # the hub closed the connection: the stream is over
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one_at_a_time, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=pipelined, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    assert enough.wait(120), f"only {len(acked)} ACKs in 120 s"
    hub.signal(stop)
    assert hub.wait() == 0, hub.stderr
    for thread in threads:
        thread.join(ACK_TIMEOUT + 10)
        assert not thread.is_alive()

    assert not errors, errors
    assert "carehub stopping" in hub.stdout
    assert "Traceback" not in hub.stderr and "KeyboardInterrupt" not in hub.stderr
    with lock:
        confirmed = list(acked)
    assert len(confirmed) == len(set(confirmed)) >= 150
    counts = stored_counts(data_dir)
    missing = [control_id for control_id in confirmed if control_id not in counts]
    assert not missing, f"{len(missing)} ACKed message(s) not stored, e.g. {missing[:5]}"
    assert set(counts.values()) == {1}
