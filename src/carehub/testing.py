"""Test helpers for carehub and for projects that configure or extend it.

``HubThread`` runs a real hub (real sockets, real store) on a background event loop so plain
synchronous tests can talk to it; ``mllp_exchange`` sends frames over a real socket;
``make_adt`` builds synthetic messages.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from carehub.config import HubConfig, MLLPListenerConfig
from carehub.hl7.framing import Frame, FrameDecoder, encode_frame
from carehub.hub import Hub

if TYPE_CHECKING:
    from carehub.routing.router import RoutingResult


def local_config(*, worker: bool = False, **overrides: Any) -> HubConfig:
    """A config bound to 127.0.0.1 on free ports, with no routes, for tests. The in-process
    worker is off unless asked for, so intake tests see messages stay 'received'."""
    config = HubConfig(routes=[])
    config.listeners.mllp = [MLLPListenerConfig(name="test", host="127.0.0.1", port=0)]
    config.listeners.http.host = "127.0.0.1"
    config.listeners.http.port = 0
    config.worker.enabled = worker
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


class HubThread:
    """A running Hub on its own event loop thread; use as a context manager."""

    def __init__(self, config: HubConfig, data_dir: Path) -> None:
        self.hub = Hub(config, data_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> HubThread:
        self._thread.start()
        self.call(self.hub.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the hub's loop and wait for its result."""
        return self.submit(coroutine).result(timeout)

    def submit(self, coroutine: Any) -> Future[Any]:
        """Start a coroutine on the hub's loop without waiting (e.g. a stop to watch)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.hub.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    @property
    def store(self) -> Any:
        return self.hub.store

    @property
    def mllp_address(self) -> tuple[str, int]:
        address = self.hub.mllp_listeners[0].address
        assert address is not None
        return address

    @property
    def http_url(self) -> str:
        assert self.hub.http_listener and self.hub.http_listener.address
        host, port = self.hub.http_listener.address
        return f"http://{host}:{port}"


def read_frames(sock: socket.socket, count: int, timeout: float = 10.0) -> list[bytes]:
    """Read exactly ``count`` MLLP frames from a socket."""
    sock.settimeout(timeout)
    decoder = FrameDecoder(64 * 1024 * 1024)
    frames: list[bytes] = []
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed after {len(frames)} of {count} frames")
        frames += [e.payload for e in decoder.feed(data) if isinstance(e, Frame)]
    return frames


def mllp_exchange(
    address: tuple[str, int], payloads: Iterable[bytes], timeout: float = 10.0
) -> list[bytes]:
    """Send each payload framed on one connection, waiting for each answer in turn."""
    answers: list[bytes] = []
    with socket.create_connection(address, timeout=timeout) as sock:
        for payload in payloads:
            sock.sendall(encode_frame(payload))
            answers += read_frames(sock, 1, timeout)
    return answers


def make_adt(
    control_id: str = "MSG00001",
    event: str = "A01",
    *,
    patient_id: str = "P0001",
    authority: str = "HOSP",
    name: str = "TESTPATIENT^ALEX",
    sending_application: str = "ADT_SENDER",
    sending_facility: str = "TEST_HOSPITAL",
    version: str = "2.5",
    charset: str = "",
    patient_class: str = "I",
    visit_number: str = "V0001",
    terminator: str = "\r",
    extra_segments: Iterable[str] = (),
) -> str:
    """A small synthetic ADT message (text; encode it with the charset you want to test)."""
    msh = [
        "MSH",
        "^~\\&",
        sending_application,
        sending_facility,
        "CAREHUB",
        "CAREHUB",
        "20261125083000",
        "",
        f"ADT^{event}^ADT_A01",
        control_id,
        "P",
        version,
    ]
    if charset:
        msh += ["", "", "", "", "", charset]
    segments = [
        "|".join(msh),
        f"EVN|{event}|20261125083000",
        f"PID|1||{patient_id}^^^{authority}^MR||{name}||19700101|F",
        f"PV1|1|{patient_class}|WARD^101^A||||1234567890^DOCTOR^TEST|||MED||||||||"
        f"|{visit_number}^^^{authority}^VN",
        *extra_segments,
    ]
    return terminator.join(segments) + terminator


# -- pytest plugin: route tests in a project's own test suite ---------------------------------
# Installed as the `pytest11` entry point `carehub`, so any project with carehub installed gets
# the `carehub_routes` fixture:
#
#     def test_discharge_goes_to_the_care_platform(carehub_routes):
#         result = carehub_routes("tests/messages/discharge.hl7")
#         assert result.matched[0].route == "admissions-discharges"
#         assert result.deliveries[0].destination == "admissions-discharges/care-platform"
#
# The config comes from `--carehub-config`, the `carehub_config` ini option, or
# config/carehub.yaml in the rootdir.


def run_routes(
    message: str | bytes | Path,
    config: HubConfig | Path,
    data_dir: Path | None = None,
) -> RoutingResult:
    """Dry-run one message (text, bytes or a file path) through the routes of a config:
    which routes matched and why, each step's output, what each forward would send."""
    from carehub.config import load_config
    from carehub.hub import build_routing
    from carehub.routing.dryrun import dry_run

    hub_config = load_config(config) if isinstance(config, Path) else config
    if isinstance(message, Path):
        raw = message.read_bytes()
    elif isinstance(message, str):
        raw = message.encode("utf-8")
    else:
        raw = message
    host, table = build_routing(hub_config, data_dir or Path(tempfile.mkdtemp(prefix="carehub-")))
    return dry_run(table, host, raw)


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("carehub")
    group.addoption("--carehub-config", default=None, help="carehub config for carehub_routes")
    parser.addini("carehub_config", "carehub config file for the carehub_routes fixture")


@pytest.fixture
def carehub_routes(request: Any, tmp_path: Path) -> Callable[[str | bytes | Path], RoutingResult]:
    """A function that dry-runs a message through the project's carehub routes."""
    option = request.config.getoption("--carehub-config") or request.config.getini("carehub_config")
    config_path = (
        Path(option) if option else Path(request.config.rootpath) / "config" / "carehub.yaml"
    )
    if not config_path.is_absolute():
        config_path = Path(request.config.rootpath) / config_path

    def run(message: str | bytes | Path) -> RoutingResult:
        if isinstance(message, str) and not message.lstrip().startswith(("MSH", "\ufeffMSH")):
            message = Path(message)
            if not message.is_absolute():
                message = Path(request.config.rootpath) / message
        return run_routes(message, config_path, tmp_path / "carehub-data")

    return run
