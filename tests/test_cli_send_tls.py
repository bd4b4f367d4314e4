"""`carehub send` as a real process: over TLS and mutual TLS against real listeners, its exit code
on an AR answer, and on a peer that takes the connection but never answers.

Every command runs in its own `python -m carehub.cli` process, so what is checked is what an
operator sees: the exit code, the lines printed, and no traceback."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub.testing import HubThread, local_config, make_adt
from tests import test_tls
from tests.test_cli import env_without_carehub, write
from tests.test_tls import Certs

# The TLS fixtures of test_tls.py (trustme certificates, a TLS and a mutual-TLS hub), shared by
# name: assigned rather than imported so the test parameters that use them do not shadow an
# import.
certs = test_tls.certs
tls_hub = test_tls.tls_hub
mtls_hub = test_tls.mtls_hub

CLI_TIMEOUT = 60.0
PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----\n?", re.S
)


def carehub(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m carehub.cli ARGS`` in a real process, without CAREHUB_* from the shell."""
    return subprocess.run(
        [sys.executable, "-m", "carehub.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env_without_carehub(),
        cwd=cwd,
    )


def send_to(address: tuple[str, int], *args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    host, port = address
    return carehub("send", "--host", host, "--port", str(port), *map(str, args), cwd=cwd)


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done.stderr


def split_pem(combined: Path, folder: Path) -> tuple[Path, Path]:
    """The key and the certificate chain of a combined PEM file, as two files (--cert, --key)."""
    text = combined.read_text()
    found = PRIVATE_KEY.search(text)
    assert found, f"no private key in {combined}"
    key, cert = folder / "client.key", folder / "client.crt"
    key.write_text(found.group(0))
    cert.write_text(text[: found.start()] + text[found.end() :])
    assert "PRIVATE KEY" not in cert.read_text() and "CERTIFICATE" not in key.read_text()
    return cert, key


# -- TLS and mutual TLS ----------------------------------------------------------------------
def test_send_over_tls_with_the_ca_prints_aa_and_exits_0(
    tls_hub: HubThread, certs: Certs, tmp_path: Path
) -> None:
    """`send --tls --ca CA` against a real TLS listener: the server is verified against the
    given CA, the message is stored, the ACK line is printed and the exit code is 0."""
    path = write(tmp_path, "a.hl7", make_adt("CLI-TLS-1"))
    done = send_to(tls_hub.mllp_address, "--tls", "--ca", certs.ca, path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{path}: AA (MSH-10 CLI-TLS-1)"]
    no_traceback(done)
    assert tls_hub.store.control_id_counts() == {"CLI-TLS-1": 1}


def test_send_over_tls_refuses_a_server_its_ca_does_not_vouch_for(
    tls_hub: HubThread, tmp_path: Path
) -> None:
    """`send --tls` without --ca trusts only the system CAs, so a hub with a private CA's
    certificate is refused (exit 1, a one-line reason, nothing sent). Protects against the
    client silently skipping server verification."""
    path = write(tmp_path, "a.hl7", make_adt("CLI-TLS-UNTRUSTED"))
    done = send_to(tls_hub.mllp_address, "--tls", "--timeout", "10", path, cwd=tmp_path)
    assert done.returncode == 1, done
    host, port = tls_hub.mllp_address
    assert f"cannot connect to {host}:{port}" in done.stderr
    assert "certificate verify failed" in done.stderr.lower()
    no_traceback(done)
    assert tls_hub.store.count() == 0


@pytest.mark.parametrize("layout", ["cert-and-key-files", "one-combined-pem"])
def test_send_over_mutual_tls_with_a_client_certificate_exits_0(
    mtls_hub: HubThread, certs: Certs, tmp_path: Path, layout: str
) -> None:
    """`send --tls --ca CA --cert CERT --key KEY` (or one PEM holding both, given as --cert)
    against a listener that requires client certificates: AA, stored, exit 0."""
    if layout == "cert-and-key-files":
        cert, key = split_pem(certs.client, tmp_path)
        client = ["--cert", str(cert), "--key", str(key)]
    else:
        client = ["--cert", str(certs.client)]
    path = write(tmp_path, "a.hl7", make_adt("CLI-MTLS-1"))
    done = send_to(mtls_hub.mllp_address, "--tls", "--ca", certs.ca, *client, path, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{path}: AA (MSH-10 CLI-MTLS-1)"]
    no_traceback(done)
    assert mtls_hub.store.control_id_counts() == {"CLI-MTLS-1": 1}


@pytest.mark.parametrize("client", ["none", "foreign"])
def test_send_to_mutual_tls_without_an_accepted_certificate_fails_readably(
    mtls_hub: HubThread, certs: Certs, tmp_path: Path, client: str
) -> None:
    """Against mutual TLS, `send` with no client certificate (or one from a CA the hub does not
    trust) exits 1 with a one-line reason naming the file or the address, never a traceback,
    and nothing is stored. With TLS 1.3 the refusal may come at the handshake or only when the
    first frame is read, so either message is accepted."""
    path = write(tmp_path, "a.hl7", make_adt("CLI-MTLS-REFUSED"))
    extra = ["--cert", str(certs.foreign_client)] if client == "foreign" else []
    done = send_to(
        mtls_hub.mllp_address,
        *["--tls", "--ca", str(certs.ca), "--timeout", "10", *extra, str(path)],
        cwd=tmp_path,
    )
    assert done.returncode == 1, done
    host, port = mtls_hub.mllp_address
    refused_at_read = f"{path}: no answer:" in done.stdout
    refused_at_connect = f"error: cannot connect to {host}:{port}" in done.stderr
    assert refused_at_read or refused_at_connect, done
    assert ": AA (" not in done.stdout
    no_traceback(done)
    assert mtls_hub.store.count() == 0


@pytest.mark.parametrize("option", ["--ca", "--cert"])
def test_send_with_a_missing_tls_file_names_it_without_a_traceback(
    tls_hub: HubThread, tmp_path: Path, option: str
) -> None:
    """A --ca or --cert path that does not exist should be a one-line error naming the file
    (as a missing message file is), not a Python traceback."""
    path = write(tmp_path, "a.hl7", make_adt("CLI-TLS-NOFILE"))
    missing = tmp_path / "missing.pem"
    done = send_to(tls_hub.mllp_address, "--tls", option, missing, path, cwd=tmp_path)
    assert done.returncode != 0
    no_traceback(done)
    assert str(missing) in done.stderr


# -- AR and no answer ------------------------------------------------------------------------
@pytest.fixture
def small_limit_hub(tmp_path: Path) -> Iterator[HubThread]:
    config = local_config()
    config.listeners.mllp[0].max_message_bytes = 2048
    with HubThread(config, tmp_path / "data") as running:
        yield running


def test_send_exits_1_on_an_ar_and_still_sends_the_rest(hub: HubThread, tmp_path: Path) -> None:
    """A file that starts like HL7 but is not a message (so `send` does not refuse it up front)
    is answered AR: `send` prints the AR line with the hub's reason, still sends the next file
    (AA), and exits 1 because one answer was not AA."""
    junk = write(tmp_path, "junk.hl7", "MSH\r")
    good = write(tmp_path, "good.hl7", make_adt("AFTER-AR"))
    done = send_to(hub.mllp_address, "--timeout", "20", junk, good, cwd=tmp_path)
    assert done.returncode == 1, done
    assert done.stdout.splitlines() == [
        f"{junk}: AR (MSH-10 -): the MSH segment is cut short: it must begin with MSH-1 and "
        "MSH-2 (the field separator and encoding characters, as in MSH|^~\\&|)",
        f"{good}: AA (MSH-10 AFTER-AR)",
    ]
    no_traceback(done)
    assert sorted(m.status for m in hub.store.find()) == ["received", "rejected"]


def test_send_exits_1_on_an_ar_for_a_message_over_the_size_limit(
    small_limit_hub: HubThread, tmp_path: Path
) -> None:
    """A message larger than the listener's limit is answered AR naming the limit; `send`
    prints that reason and exits 1."""
    body = make_adt("TOO-BIG", extra_segments=[f"NTE|1||{'X' * 3000}"])
    big = write(tmp_path, "big.hl7", body)
    done = send_to(small_limit_hub.mllp_address, "--timeout", "20", big, cwd=tmp_path)
    assert done.returncode == 1, done
    (line,) = done.stdout.splitlines()
    assert line.startswith(f"{big}: AR (MSH-10 TOO-BIG): ")
    assert "limit of 2048 bytes" in line
    no_traceback(done)


class SilentServer:
    """A TCP server that accepts every connection and reads what is sent, but never writes a
    byte (``close_after_read``: it hangs up once a frame has arrived instead)."""

    def __init__(self, *, close_after_read: bool = False, accept_once: bool = False) -> None:
        self.close_after_read = close_after_read
        self.accept_once = accept_once  # then stop listening: a reconnect is refused
        self.received = bytearray()
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.address: tuple[str, int] = self._sock.getsockname()[:2]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self.accept_once:
                self._sock.close()
            self._held.append(conn)
            thread = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += data
            if self.close_after_read and b"\x1c\r" in data:
                conn.close()
                return

    def __enter__(self) -> SilentServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sock.close()
        for thread in self._threads:
            thread.join(5)
        for conn in self._held:
            conn.close()


def test_send_exits_1_when_the_peer_never_answers(tmp_path: Path) -> None:
    """A peer that accepts the connection and the frame but stays silent: `send` gives up after
    --timeout (not the 30 s default, not never), prints a "no answer" line naming the file,
    and exits 1 without a traceback."""
    path = write(tmp_path, "a.hl7", make_adt("SILENT-1"))
    with SilentServer() as server:
        started = time.monotonic()
        done = send_to(server.address, "--timeout", "1", path, cwd=tmp_path)
        elapsed = time.monotonic() - started
        assert b"MSH|" in server.received and b"SILENT-1" in server.received
    assert done.returncode == 1, done
    host, port = server.address
    assert done.stdout.splitlines() == [
        f"{path}: no answer: no answer from {host}:{port} in 1 s",
    ]
    no_traceback(done)
    assert elapsed < 20, f"send took {elapsed:.1f} s with --timeout 1"


def test_send_exits_1_when_the_peer_hangs_up_without_answering(tmp_path: Path) -> None:
    """A peer that reads the frame and closes the connection without an ACK: "no answer",
    exit 1, no traceback (and the next file is still tried on a new connection)."""
    first = write(tmp_path, "a.hl7", make_adt("HANGUP-1"))
    second = write(tmp_path, "b.hl7", make_adt("HANGUP-2"))
    with SilentServer(close_after_read=True) as server:
        done = send_to(server.address, "--timeout", "5", first, second, cwd=tmp_path)
        assert server.connections == 2  # the second file on a new one, and no third
        assert b"HANGUP-1" in server.received and b"HANGUP-2" in server.received
    assert done.returncode == 1, done
    host, port = server.address
    assert done.stdout.splitlines() == [
        f"{first}: no answer: {host}:{port} closed the connection without answering",
        f"{second}: no answer: {host}:{port} closed the connection without answering",
    ]
    no_traceback(done)


def test_send_names_every_file_it_could_not_send_once_reconnecting_fails(tmp_path: Path) -> None:
    """After a peer hangs up unanswered and then refuses the reconnect, each file still waiting
    is named as not sent and counted: none is silently skipped."""
    files = [write(tmp_path, f"{n}.hl7", make_adt(f"ONCE-{n}")) for n in range(3)]
    with SilentServer(close_after_read=True, accept_once=True) as server:
        done = send_to(server.address, "--timeout", "5", *files, cwd=tmp_path)
        assert server.connections == 1
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{files[0]}: no answer:")
    host, port = server.address
    assert [line.split(": not sent: ")[0] for line in lines[1:]] == [str(f) for f in files[1:]]
    assert all(f"cannot reconnect to {host}:{port}" in line for line in lines[1:])
    no_traceback(done)


def test_send_with_a_tls_file_that_is_not_a_certificate_names_it(
    tls_hub: HubThread, tmp_path: Path
) -> None:
    """A --cert file that is readable but holds no certificate is a one-line error naming the
    files given, not an ssl traceback."""
    path = write(tmp_path, "a.hl7", make_adt("CLI-TLS-BADPEM"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    done = send_to(tls_hub.mllp_address, "--tls", "--cert", garbage, path, cwd=tmp_path)
    assert done.returncode == 2
    no_traceback(done)
    assert f"cannot use the TLS files (--cert {garbage})" in done.stderr


@pytest.mark.parametrize(
    ("options", "said"),
    [(["--key", "k.pem"], "--key is the key of a client certificate"), (["--insecure"], "--tls")],
)
def test_send_refuses_tls_options_that_would_do_nothing(
    tmp_path: Path, options: list[str], said: str
) -> None:
    """An option that cannot take effect without another is a usage error, not ignored."""
    path = write(tmp_path, "a.hl7", make_adt("CLI-TLS-OPTS"))
    done = send_to(("127.0.0.1", 9), *options, path, cwd=tmp_path)
    assert done.returncode == 2
    assert said in done.stderr
    no_traceback(done)
