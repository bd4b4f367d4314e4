"""The built-in channels against real destinations: a folder, a real carehub MLLP listener (plain
and TLS), small asyncio MLLP peers that answer AR / the wrong MSA-2 / nothing, and a real
uvicorn HTTP server that records what it receives. No mocks."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pluggy
import pytest
import trustme
import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import carehub.hookspecs
from carehub.builtins import channels as channels_module
from carehub.builtins.channels import (
    FileChannel,
    MLLPChannel,
    WebhookChannel,
    is_local_filesystem,
    sign,
)
from carehub.care.fhir_notifications import FhirNotificationChannel
from carehub.components import Channel, DeliveryError, Outgoing
from carehub.config import TLSConfig
from carehub.hl7.ack import AckCode, build_ack
from carehub.hl7.framing import Frame, FrameDecoder, encode_frame
from carehub.hl7.view import MessageView
from carehub.referrals.fhir import FhirReferralChannel
from carehub.store.store import MessageStore, sqlite_url
from carehub.testing import HubThread, local_config, make_adt
from tests.helpers_channels import build, context, outcome, run_with, work_for
from tests.helpers_smtp import free_port

TIMEOUT = 30.0


# -- helpers ----------------------------------------------------------------------------------
@dataclass
class DataclassEvent:
    """A dataclass stand-in for a care event (the real model may be pydantic or a dataclass)."""

    kind: str
    at: datetime
    tags: set[str] = field(default_factory=set)


class PydanticEvent(BaseModel):
    kind: str
    at: datetime


# -- registration -----------------------------------------------------------------------------
def test_registers_the_forwarding_channels() -> None:
    pm = pluggy.PluginManager("carehub")
    pm.add_hookspecs(carehub.hookspecs)
    pm.register(channels_module)
    registered: list[type[Channel]] = []
    pm.hook.carehub_register_channels(register=registered.append)
    assert {c.name: c for c in registered} == {
        "file": FileChannel,
        "mllp": MLLPChannel,
        "webhook": WebhookChannel,
        "fhir-referral": FhirReferralChannel,
        "fhir-notification": FhirNotificationChannel,
    }


# -- file -------------------------------------------------------------------------------------
def test_file_one_file_per_delivery_and_same_key_overwrites(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out")
    text = make_adt("FILE1")
    first = channel.render(work_for(text), "delivery-1")
    again = channel.render(work_for(text), "delivery-1")
    other = channel.render(work_for(text), "delivery-2")
    assert first == again  # rendering is deterministic: a retry writes the same bytes

    receipts = run_with(
        channel,
        lambda: asyncio.gather(channel.send(first), channel.send(again), channel.send(other)),
    )

    assert receipts == ["wrote delivery-1.hl7", "wrote delivery-1.hl7", "wrote delivery-2.hl7"]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["delivery-1.hl7", "delivery-2.hl7"]  # no temp files left behind
    assert (tmp_path / "out" / "delivery-1.hl7").read_bytes() == text.encode()


@pytest.mark.parametrize(
    ("durability", "option", "fsyncs", "writer"),
    [
        ("power", None, 2, "auto"),
        ("process", None, 0, "auto"),
        ("process", True, 2, "auto"),
        ("power", False, 0, "auto"),
        ("process", True, 2, "loop"),  # forced onto the loop, fsync still holds
    ],
)
def test_file_fsyncs_the_file_and_folder_when_the_store_is_power_durable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability: str,
    option: bool | None,
    fsyncs: int,
    writer: str,
) -> None:
    """fsync is what makes the write survive a power cut; it cannot be observed from the file
    itself, so the test counts the calls."""
    store = MessageStore(sqlite_url(tmp_path / "data"), durability=durability)  # type: ignore[arg-type]
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    try:
        ctx = dataclasses.replace(context(tmp_path), store=store)
        options = FileChannel.Options(directory=tmp_path / "out", fsync=option, writer=writer)
        channel = FileChannel(options, ctx)
        outgoing = channel.render(work_for(make_adt("SYNC1")), "delivery-1")
        assert run_with(channel, lambda: channel.send(outgoing)) == "wrote delivery-1.hl7"
    finally:
        store.close()
    assert len(calls) == fsyncs
    assert (tmp_path / "out" / "delivery-1.hl7").read_bytes() == make_adt("SYNC1").encode()


@pytest.mark.parametrize(("writer", "on_loop"), [("auto", True), ("thread", False)])
def test_file_writes_sent_together_share_a_batch_and_fail_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str, on_loop: bool
) -> None:
    """Sends started in one loop iteration are written by one call, on the loop for a local
    folder without fsync (``auto``; tmp_path is on a local disk), else on a helper thread; a
    file that cannot be written fails its own delivery only."""
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out", writer=writer)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "delivery-3.hl7").mkdir()  # a folder where the file should go
    batches: list[tuple[int, bool]] = []
    real_write_files = channels_module._write_files
    loop_thread = threading.get_ident()

    def counting(directory: Path, files: list[tuple[str, bytes]], fsync: bool) -> Any:
        batches.append((len(files), threading.get_ident() == loop_thread))
        return real_write_files(directory, files, fsync)

    outgoing = [
        channel.render(work_for(make_adt(f"BATCH{n}")), f"delivery-{n}") for n in range(1, 6)
    ]

    async def send_all() -> list[str | DeliveryError]:
        return await asyncio.gather(*(outcome(channel, o) for o in outgoing))

    monkeypatch.setattr(channels_module, "_write_files", counting)
    results = run_with(channel, send_all)
    assert batches == [(5, on_loop)]
    assert [r for n, r in enumerate(results, 1) if n != 3] == [
        f"wrote delivery-{n}.hl7" for n in (1, 2, 4, 5)
    ]
    assert isinstance(results[2], DeliveryError)
    assert "delivery-3.hl7" in str(results[2])
    for n in (1, 2, 4, 5):
        assert (tmp_path / "out" / f"delivery-{n}.hl7").read_bytes() == make_adt(
            f"BATCH{n}"
        ).encode()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_only_local_filesystems_count_as_local(tmp_path: Path) -> None:
    assert is_local_filesystem(tmp_path)  # the test's own folder, on this machine's disk
    assert not is_local_filesystem(Path("/proc/self"))  # procfs: not a place for files


def test_file_v2_body_has_cr_segment_ends(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out")
    text = make_adt("LF1", terminator="\n")
    outgoing = channel.render(work_for(text), "k")
    run_with(channel, lambda: channel.send(outgoing))
    written = (tmp_path / "out" / "k.hl7").read_bytes()
    assert b"\n" not in written
    assert written == make_adt("LF1").encode()


def test_file_v2_body_is_encoded_as_msh18_declares(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out")
    text = make_adt("LATIN1", name="MÜLLER^JOSÉ", charset="8859/1")
    outgoing = channel.render(work_for(text), "k")
    assert "MÜLLER".encode("iso-8859-1") in outgoing.payload
    assert outgoing.payload.decode("iso-8859-1") == text


def test_file_event_body_is_json(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out", body="event")
    at = datetime(2026, 11, 25, 8, 30, tzinfo=UTC)
    with_event = channel.render(
        work_for(make_adt("EV1"), event=PydanticEvent(kind="admission", at=at)), "with-event"
    )
    without = channel.render(work_for(make_adt("EV2"), route="adt", message_id=9), "no-event")
    run_with(channel, lambda: asyncio.gather(channel.send(with_event), channel.send(without)))

    assert json.loads((tmp_path / "out" / "with-event.json").read_text()) == {
        "kind": "admission",
        "at": "2026-11-25T08:30:00Z",
    }
    assert json.loads((tmp_path / "out" / "no-event.json").read_text()) == {
        "message_id": 9,
        "route": "adt",
        "control_id": "EV2",
        "v2": make_adt("EV2"),
    }
    assert with_event.content_type == "application/json"


def test_file_event_body_from_a_dataclass_event(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out", body="event")
    event = DataclassEvent("transfer", datetime(2026, 1, 2, tzinfo=UTC), {"icu"})
    outgoing = channel.render(work_for(make_adt("EV3"), event=event), "k")
    assert json.loads(outgoing.payload) == {
        "kind": "transfer",
        "at": "2026-01-02T00:00:00+00:00",
        "tags": ["icu"],
    }


def test_webhook_and_file_carry_the_real_care_event(tmp_path: Path) -> None:
    events = pytest.importorskip("carehub.events")
    event = events.CareEvent(kind="admission", message_type="ADT", trigger_event="A01")
    work = work_for(make_adt("EV4"), event=event)
    as_file = build(FileChannel, tmp_path, directory=tmp_path, body="event").render(work, "k")
    hook = build(WebhookChannel, tmp_path, url="https://example.test/hook").render(work, "k")
    expected = event.model_dump(mode="json")
    assert json.loads(as_file.payload) == expected
    assert json.loads(hook.payload)["event"] == expected


@pytest.mark.parametrize("body", ["event", "v2"])
@pytest.mark.parametrize("with_event", [True, False])
def test_webhook_body_is_the_documented_json_byte_for_byte(
    tmp_path: Path, body: str, with_event: bool
) -> None:
    """The event's JSON is encoded once and spliced in; the bytes must be those of encoding
    the whole document (compact, UTF-8, keys in the documented order)."""
    events = pytest.importorskip("carehub.events")
    event = events.CareEvent(kind="admission", message_type="ADT", trigger_event="A01")
    text = make_adt("SPLICE1", name="ZOË^ÅSA")
    work = work_for(text, event=event if with_event else None)
    hook = build(WebhookChannel, tmp_path, url="https://example.test/hook", body=body)
    document = {
        "message_id": 7,
        "route": "to-dest",
        "idempotency_key": "k",
        "message_type": "ADT",
        "trigger_event": "A01",
        "control_id": "SPLICE1",
        "event": event.model_dump(mode="json") if with_event else None,
    }
    if body == "v2":
        document["v2"] = text.replace("\n", "\r")
    expected = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    assert hook.render(work, "k").payload == expected


def test_file_relative_directory_is_resolved_against_the_config_folder(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory="outbox/adt")
    outgoing = channel.render(work_for(make_adt("REL1")), "rel")
    assert run_with(channel, lambda: channel.send(outgoing)) == "wrote rel.hl7"
    assert (tmp_path / "config" / "outbox" / "adt" / "rel.hl7").is_file()


def test_file_name_template_fields_are_made_safe(tmp_path: Path) -> None:
    channel = build(
        FileChannel,
        tmp_path,
        directory=tmp_path / "out",
        filename="{route}-{message_id:05d}-{control_id}{ext}",
    )
    text = make_adt("../../etc/x")  # a hostile MSH-10 must not steer the write
    outgoing = channel.render(work_for(text, route="adt in", message_id=42), "k")
    assert outgoing.metadata["filename"] == "adt_in-00042-.._.._etc_x.hl7"
    run_with(channel, lambda: channel.send(outgoing))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adt_in-00042-.._.._etc_x.hl7"]


@pytest.mark.parametrize("template", ["{patient}.hl7", "sub/{idempotency_key}", "{0}", "{ext"])
def test_file_bad_name_templates_are_config_errors(tmp_path: Path, template: str) -> None:
    with pytest.raises(ValidationError):
        FileChannel.Options(directory=tmp_path, filename=template)
    with pytest.raises(ValidationError):
        FileChannel.Options(directory=tmp_path, colour="blue")  # extra="forbid"


def test_file_write_failure_is_retryable(tmp_path: Path) -> None:
    channel = build(FileChannel, tmp_path, directory=tmp_path / "out")
    outgoing = channel.render(work_for(make_adt("GONE")), "k")

    async def body() -> str | DeliveryError:
        (tmp_path / "out").rmdir()  # the folder vanished after start-up
        return await outcome(channel, outgoing)

    error = run_with(channel, body)
    assert isinstance(error, DeliveryError) and error.retryable


# -- MLLP -------------------------------------------------------------------------------------
def mllp(address: tuple[str, int], tmp_path: Path, **options: Any) -> MLLPChannel:
    host, port = address
    return build(MLLPChannel, tmp_path, host=host, port=port, **{"timeout": 10, **options})


def test_mllp_forward_to_carehub_is_stored_byte_identical(tmp_path: Path) -> None:
    text = make_adt("FWD1", name="ÅSTRÖM^BJÖRK")
    with HubThread(local_config(), tmp_path / "dest") as dest:
        channel = mllp(dest.mllp_address, tmp_path)
        outgoing = channel.render(work_for(text), "delivery-key")
        assert outgoing.metadata["control_id"] == "FWD1"
        assert outgoing.idempotency_key == "delivery-key"
        assert run_with(channel, lambda: channel.send(outgoing)) == "AA"
        (received,) = dest.store.find()
    assert received.raw == text.encode("utf-8")
    assert received.control_id == "FWD1"


def test_mllp_forward_twice_is_stored_once(tmp_path: Path) -> None:
    with HubThread(local_config(), tmp_path / "dest") as dest:
        channel = mllp(dest.mllp_address, tmp_path)
        outgoing = channel.render(work_for(make_adt("TWICE")), "k")
        receipts = run_with(
            channel, lambda: asyncio.gather(channel.send(outgoing), channel.send(outgoing))
        )
        assert receipts == ["AA", "AA"]
        assert dest.store.control_id_counts() == {"TWICE": 1}


def test_mllp_many_sends_share_one_connection(tmp_path: Path) -> None:
    with HubThread(local_config(), tmp_path / "dest") as dest:
        channel = mllp(dest.mllp_address, tmp_path)
        batch = [channel.render(work_for(make_adt(f"M{i}")), f"k{i}") for i in range(20)]
        receipts = run_with(channel, lambda: asyncio.gather(*(channel.send(o) for o in batch)))
        assert receipts == ["AA"] * 20
        assert dest.store.count() == 20
        assert dest.hub.mllp_listeners[0].connections_total == 1


def test_mllp_ae_from_carehub_is_retryable(tmp_path: Path) -> None:
    text = make_adt("")  # no MSH-10: carehub stores it as refused and answers AE
    with HubThread(local_config(), tmp_path / "dest") as dest:
        channel = mllp(dest.mllp_address, tmp_path)
        outgoing = channel.render(work_for(text), "k")
        error = run_with(channel, lambda: outcome(channel, outgoing))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "AE" in str(error) and "MSH-10" in str(error)


async def serve_mllp(
    answer: Callable[[bytes], bytes | None],
    *,
    close_after_answer: bool = False,
    delay: float = 0,
) -> asyncio.Server:
    """A tiny MLLP peer: ``answer`` turns each frame into the reply payload (None: stay mute)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(1024 * 1024)
        try:
            while data := await reader.read(65536):
                for event in decoder.feed(data):
                    if isinstance(event, Frame):
                        reply = answer(event.payload)
                        await asyncio.sleep(delay)
                        if reply is not None:
                            writer.write(encode_frame(reply))
                            await writer.drain()
                        if close_after_answer:
                            writer.close()
                            return
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def ack_for(code: AckCode, reason: str = "") -> Callable[[bytes], bytes]:
    return lambda payload: build_ack(code, MessageView(payload.decode()), reason=reason).encode()


def against_peer(
    tmp_path: Path,
    answer: Callable[[bytes], bytes | None],
    outgoing_count: int = 1,
    *,
    close_after_answer: bool = False,
    timeout: float = 10,
) -> list[str | DeliveryError]:
    """Send ``outgoing_count`` messages one after the other to a tiny peer; return outcomes."""

    async def main() -> list[str | DeliveryError]:
        server = await serve_mllp(answer, close_after_answer=close_after_answer)
        host, port = server.sockets[0].getsockname()[:2]
        channel = mllp((host, port), tmp_path, timeout=timeout)
        await channel.start()
        try:
            results = []
            for i in range(outgoing_count):
                outgoing = channel.render(work_for(make_adt(f"PEER{i}")), f"k{i}")
                results.append(await outcome(channel, outgoing))
                await asyncio.sleep(0.05)
            return results
        finally:
            await channel.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_mllp_ar_is_not_retryable(tmp_path: Path) -> None:
    (error,) = against_peer(tmp_path, ack_for(AckCode.REJECT, "unknown facility"))
    assert isinstance(error, DeliveryError) and not error.retryable
    assert "AR" in str(error) and "unknown facility" in str(error)
    # The ERR text is the peer's own words (engines quote what they refuse): never logged.
    assert error.said == "unknown facility" and "unknown facility" not in error.message


def test_mllp_ack_for_another_message_is_retryable(tmp_path: Path) -> None:
    other = MessageView(make_adt("SOMEONE-ELSE"))
    (error,) = against_peer(tmp_path, lambda _: build_ack(AckCode.ACCEPT, other).encode())
    assert isinstance(error, DeliveryError) and error.retryable
    assert "SOMEONE-ELSE" in str(error)


def test_mllp_answer_that_is_not_an_ack_is_retryable(tmp_path: Path) -> None:
    (error,) = against_peer(tmp_path, lambda _: b"hello")
    assert isinstance(error, DeliveryError) and error.retryable


def test_mllp_no_answer_is_retryable(tmp_path: Path) -> None:
    started = time.monotonic()
    (error,) = against_peer(tmp_path, lambda _: None, timeout=0.3)
    assert isinstance(error, DeliveryError) and error.retryable
    assert "no answer" in str(error)
    assert time.monotonic() - started < 5


def test_mllp_reconnects_when_the_peer_closed_the_idle_connection(tmp_path: Path) -> None:
    results = against_peer(tmp_path, ack_for(AckCode.ACCEPT), 3, close_after_answer=True)
    assert results == ["AA", "AA", "AA"]


def test_mllp_cancelled_send_does_not_leave_its_ack_for_the_next(tmp_path: Path) -> None:
    async def main() -> str:
        server = await serve_mllp(ack_for(AckCode.ACCEPT), delay=0.3)
        host, port = server.sockets[0].getsockname()[:2]
        channel = mllp((host, port), tmp_path)
        await channel.start()
        try:
            first = channel.render(work_for(make_adt("CANCELLED")), "k1")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(channel.send(first), 0.1)
            await asyncio.sleep(0.4)  # the late ACK for CANCELLED has been sent by now
            return await channel.send(channel.render(work_for(make_adt("NEXT")), "k2"))
        finally:
            await channel.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == "AA"


def test_mllp_nothing_listening_is_retryable(tmp_path: Path) -> None:
    channel = mllp(("127.0.0.1", free_port()), tmp_path)
    outgoing = channel.render(work_for(make_adt("NOBODY")), "k")
    error = run_with(channel, lambda: outcome(channel, outgoing))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "cannot reach" in str(error)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server.cert_chain_pems[0].write_to_path(folder / "server.pem")
    server.private_key_pem.write_to_path(folder / "server.key")
    ca.issue_cert("carehub@sender.test").private_key_and_cert_chain_pem.write_to_path(
        folder / "client.pem"
    )
    return {
        "ca": folder / "ca.pem",
        "server": folder / "server.pem",
        "server_key": folder / "server.key",
        "client": folder / "client.pem",
    }


def test_mllp_tls_forward_with_client_certificate(tmp_path: Path, certs: dict[str, Path]) -> None:
    config = local_config()
    config.listeners.mllp[0].tls = TLSConfig(
        cert=certs["server"],
        key=certs["server_key"],
        client_ca=certs["ca"],
        require_client_cert=True,
    )
    text = make_adt("TLS1")
    with HubThread(config, tmp_path / "dest") as dest:
        # ca and cert are given relative to the config folder, as in a route file
        (tmp_path / "config").mkdir()
        for name in ("ca", "client"):
            (tmp_path / "config" / f"{name}.pem").write_bytes(certs[name].read_bytes())
        channel = mllp(dest.mllp_address, tmp_path, tls=True, ca="ca.pem", cert="client.pem")
        outgoing = channel.render(work_for(text), "k")
        assert run_with(channel, lambda: channel.send(outgoing)) == "AA"
        (received,) = dest.store.find()
        assert received.raw == text.encode()

        untrusting = mllp(dest.mllp_address, tmp_path, tls=True, cert="client.pem")
        error = run_with(untrusting, lambda: outcome(untrusting, outgoing))
        assert isinstance(error, DeliveryError) and error.retryable  # unknown CA: fix, then retry


def test_mllp_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="tls: true"):
        MLLPChannel.Options(host="h", port=2575, ca=tmp_path / "ca.pem")
    with pytest.raises(ValidationError, match="key needs cert"):
        MLLPChannel.Options(host="h", port=2575, tls=True, key=tmp_path / "k.pem")
    with pytest.raises(ValidationError, match="unknown character set"):
        MLLPChannel.Options(host="h", port=2575, encoding="klingon")
    with pytest.raises(ValidationError):
        MLLPChannel.Options(host="h", port=0)


# -- webhook ----------------------------------------------------------------------------------
@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookServer:
    """A real uvicorn server on a background thread that records every request.

    /hook answers 202; /status/<code> answers that code with a long text body; /slow waits
    two seconds before answering."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []

        async def record(request: Request) -> Response:
            self.requests.append(
                Recorded(request.url.path, dict(request.headers), await request.body())
            )
            if request.url.path == "/slow":
                await asyncio.sleep(2)
                return Response(status_code=200)
            if request.url.path.startswith("/status/"):
                code = int(request.path_params["code"])
                headers = {"Retry-After": "30"} if code == 429 else {}
                return PlainTextResponse(f"status {code}: " + "x" * 500, code, headers)
            return Response(status_code=202)

        app = Starlette(
            routes=[
                Route("/hook", record, methods=["POST"]),
                Route("/slow", record, methods=["POST"]),
                Route("/status/{code}", record, methods=["POST"]),
            ]
        )
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off")
        )
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> WebhookServer:
        self._thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self._server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture(scope="module")
def webhook_server() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server


@pytest.fixture
def http(webhook_server: WebhookServer) -> WebhookServer:
    webhook_server.requests.clear()
    return webhook_server


def post(channel: WebhookChannel, outgoing: Outgoing) -> str | DeliveryError:
    return run_with(channel, lambda: outcome(channel, outgoing))


def test_webhook_event_body_headers_and_signature(tmp_path: Path, http: WebhookServer) -> None:
    channel = build(
        WebhookChannel,
        tmp_path,
        url=http.url("/hook"),
        headers={"X-Tenant": "north", "Idempotency-Key": "configured-values-lose"},
        auth_header="Bearer s3cret-token",
        hmac_secret="shared-signing-secret",
    )
    at = datetime(2026, 11, 25, 8, 30, tzinfo=UTC)
    work = work_for(make_adt("WH1", "A03"), route="discharges", message_id=12)
    work.event = PydanticEvent(kind="discharge", at=at)
    outgoing = channel.render(work, "12:discharges:0")
    assert "s3cret" not in repr(outgoing) and "shared-signing-secret" not in repr(outgoing)

    assert post(channel, outgoing) == "HTTP 202"

    (request,) = http.requests
    assert json.loads(request.body) == {
        "message_id": 12,
        "route": "discharges",
        "idempotency_key": "12:discharges:0",
        "message_type": "ADT",
        "trigger_event": "A03",
        "control_id": "WH1",
        "event": {"kind": "discharge", "at": "2026-11-25T08:30:00Z"},
    }
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["idempotency-key"] == "12:discharges:0"
    assert headers["x-carehub-delivery"] == "12:discharges:0"
    assert headers["authorization"] == "Bearer s3cret-token"
    assert headers["x-tenant"] == "north"
    expected = hmac.new(b"shared-signing-secret", request.body, hashlib.sha256).hexdigest()
    assert headers["x-carehub-signature"] == f"sha256={expected}"
    assert hmac.compare_digest(sign("shared-signing-secret", request.body), expected)


def test_webhook_v2_body_and_no_optional_headers(tmp_path: Path, http: WebhookServer) -> None:
    channel = build(WebhookChannel, tmp_path, url=http.url("/hook"), body="v2")
    text = make_adt("WH2", terminator="\n")
    outgoing = channel.render(work_for(text), "k2")
    assert post(channel, outgoing) == "HTTP 202"
    (request,) = http.requests
    document = json.loads(request.body)
    assert document["v2"] == make_adt("WH2")  # CR segment ends
    assert document["event"] is None
    assert "authorization" not in request.headers
    assert "x-carehub-signature" not in request.headers


def test_webhook_retry_sends_identical_bytes_and_key(tmp_path: Path, http: WebhookServer) -> None:
    channel = build(
        WebhookChannel, tmp_path, url=http.url("/hook"), hmac_secret="retry-signing-secret"
    )
    outgoing = channel.render(work_for(make_adt("WH3")), "same-key")
    receipts = run_with(
        channel, lambda: asyncio.gather(channel.send(outgoing), channel.send(outgoing))
    )
    assert receipts == ["HTTP 202", "HTTP 202"]
    first, second = http.requests
    assert first.body == second.body
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == "same-key"
    assert first.headers["x-carehub-signature"] == second.headers["x-carehub-signature"]


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\naccepted",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # nothing to read: not read at all
    ],
    ids=["short-body", "empty-body"],
)
def test_webhook_deliveries_reuse_one_connection(tmp_path: Path, answer: bytes) -> None:
    """Sequential deliveries to one webhook share a kept-alive connection; a fresh TCP
    connection per delivery is what an unread answer used to cost."""
    connections: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(str(writer.get_extra_info("peername")))
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def scenario() -> list[str | DeliveryError]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        channel = build(WebhookChannel, tmp_path, url=f"http://127.0.0.1:{port}/hook")
        await channel.start()
        try:
            work = work_for(make_adt("KEEP1"))
            return [await outcome(channel, channel.render(work, f"k-{i}")) for i in range(20)]
        finally:
            await channel.close()
            server.close()

    receipts = asyncio.run(scenario())
    assert receipts == ["HTTP 200"] * 20
    assert len(connections) == 1, connections


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (429, True), (408, True), (400, False), (404, False)],
)
def test_webhook_status_codes(
    tmp_path: Path, http: WebhookServer, status: int, retryable: bool
) -> None:
    channel = build(WebhookChannel, tmp_path, url=http.url(f"/status/{status}"))
    error = post(channel, channel.render(work_for(make_adt("WH4")), "k"))
    assert isinstance(error, DeliveryError)
    assert error.retryable is retryable
    text = str(error)
    assert f"HTTP {status}" in error.message and f"status {status}: xxx" in text
    # The receiver's body is what it said: stored with the attempt, never logged.
    assert error.said is not None and error.said.startswith(f"status {status}: xxx")
    assert len(error.said) <= 200 and error.said not in error.message
    if status == 429:
        assert "Retry-After: 30" in error.message


def test_webhook_connection_refused_is_retryable(tmp_path: Path) -> None:
    channel = build(WebhookChannel, tmp_path, url=f"http://127.0.0.1:{free_port()}/hook")
    error = post(channel, channel.render(work_for(make_adt("WH5")), "k"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "ConnectError" in str(error)


def test_webhook_peer_closing_without_an_answer_is_retryable(tmp_path: Path) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async def scenario() -> str | DeliveryError:
        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        channel = build(WebhookChannel, tmp_path, url=f"http://127.0.0.1:{port}/hook")
        await channel.start()
        try:
            return await outcome(channel, channel.render(work_for(make_adt("WH9")), "k"))
        finally:
            await channel.close()
            server.close()

    error = asyncio.run(scenario())
    assert isinstance(error, DeliveryError) and error.retryable
    assert "RemoteProtocolError" in str(error) and "no answer within" not in str(error)


def test_webhook_timeout_is_retryable(tmp_path: Path, http: WebhookServer) -> None:
    channel = build(WebhookChannel, tmp_path, url=http.url("/slow"), timeout=0.3)
    started = time.monotonic()
    error = post(channel, channel.render(work_for(make_adt("WH6")), "k"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "no answer within 0.3 s" in str(error)
    assert time.monotonic() - started < 1.5


def test_webhook_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        WebhookChannel.Options(url="ftp://example.test/hook")
    with pytest.raises(ValidationError):
        WebhookChannel.Options(url="https://example.test/hook", body="xml")
    assert WebhookChannel.Options(url="https://example.test/hook").headers == {}
