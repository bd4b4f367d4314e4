"""The email and SMS channels against real destinations: an aiosmtpd SMTP server (plain,
STARTTLS and implicit TLS with trustme certificates, AUTH, scripted refusals), a socket that
never greets, and a real uvicorn HTTP server standing in for an SMS gateway. No mocks."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pluggy
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import ValidationError

import carehub.hookspecs
from carehub.builtins import messaging
from carehub.builtins.messaging import (
    EmailChannel,
    SmsChannel,
    fill_template,
    message_id,
    shorten,
)
from carehub.components import Channel, DeliveryError, Outgoing, Work
from carehub.errors import ConfigError
from carehub.testing import make_adt
from tests.helpers_channels import build, outcome, run_with
from tests.helpers_channels import work_for as _work_for
from tests.helpers_http import HTTPServer, Received
from tests.helpers_smtp import free_port

SENDER = "carehub@hospital.test"


# -- helpers ----------------------------------------------------------------------------------
def work_for(text: str, *, route: str = "notify", message_id: int = 7, event: Any = None) -> Work:
    """A Work as routing hands it to a messaging channel (on the notify route by default)."""
    return _work_for(text, route=route, message_id=message_id, event=event)


def attempt(channel: Channel, outgoing: Outgoing) -> str | DeliveryError:
    return run_with(channel, lambda: outcome(channel, outgoing))


def notification(
    key: str = "12:notify:0", body: str = "Patient admitted to 4 West.\n", **metadata: str
) -> Outgoing:
    """An Outgoing as the notify step builds it."""
    return Outgoing(body.encode("utf-8"), "text/plain; charset=utf-8", key, metadata)


# -- an SMTP server ---------------------------------------------------------------------------
@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool


class Recorder:
    """An aiosmtpd handler that keeps every message and answers what the test scripts:
    ``rcpt_reply``/``data_reply`` (None: accept)."""

    QUEUED = "250 2.0.0 Ok: queued as 4XQ7Z2"

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self.hold = 0.0  # seconds to sit on each DATA (to see how many arrive at once)
        self.in_data = 0
        self.max_in_data = 0
        self._lock = threading.Lock()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        with self._lock:
            self.in_data += 1
            self.max_in_data = max(self.max_in_data, self.in_data)
        try:
            await asyncio.sleep(self.hold)
        finally:
            with self._lock:
                self.in_data -= 1
        parsed = message_from_bytes(envelope.original_content, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        self.mails.append(
            Mail(envelope.mail_from, list(envelope.rcpt_tos), parsed, _over_tls(server))
        )
        return self.QUEUED


def _over_tls(server: Any) -> bool:
    """Whether the session is encrypted, by STARTTLS or implicit TLS (aiosmtpd's
    ``session.ssl`` only covers STARTTLS)."""
    return server.transport.get_extra_info("ssl_object") is not None


@dataclass
class MailServer:
    controller: Controller
    recorder: Recorder
    logins: list[tuple[str, str]]

    @property
    def port(self) -> int:
        return self.controller.port

    def channel(self, tmp_path: Path, **options: Any) -> EmailChannel:
        options = {"host": "127.0.0.1", "port": self.port, "sender": SENDER, **options}
        return build(EmailChannel, tmp_path, **{"timeout": 10, **options})


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A private CA (its PEM on disk, as ca_file wants it) and a server context for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    return {"ca": folder / "ca.pem", "server": context}


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., MailServer]]:
    """Start aiosmtpd servers on 127.0.0.1 as the test configures them; stop them after."""
    started: list[Controller] = []

    def start(
        *, tls: ssl.SSLContext | None = None, implicit_tls: bool = False, auth: bool = False
    ) -> MailServer:
        recorder = Recorder()
        logins: list[tuple[str, str]] = []

        def authenticator(
            server: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            assert isinstance(data, LoginPassword)
            login, password = data.login.decode(), data.password.decode()
            logins.append((login, password))
            return AuthResult(success=(login, password) == ("carehub", "s3cret"), handled=False)

        options: dict[str, Any] = {"hostname": "127.0.0.1", "port": free_port()}
        if implicit_tls:
            options["ssl_context"] = tls
        elif tls is not None:
            options.update(tls_context=tls, require_starttls=True)
        if auth:
            options.update(authenticator=authenticator, auth_required=True)
        controller = Controller(recorder, **options)
        controller.start()
        started.append(controller)
        return MailServer(controller, recorder, logins)

    yield start
    for controller in started:
        controller.stop()


# -- registration -----------------------------------------------------------------------------
def test_registers_email_and_sms() -> None:
    pm = pluggy.PluginManager("carehub")
    pm.add_hookspecs(carehub.hookspecs)
    pm.register(messaging)
    registered: list[type[Channel]] = []
    pm.hook.carehub_register_channels(register=registered.append)
    assert {c.name: c for c in registered} == {"email": EmailChannel, "sms": SmsChannel}


# -- email ------------------------------------------------------------------------------------
def test_email_notification_headers_body_and_envelope(
    tmp_path: Path, smtp_server: Callable[..., MailServer]
) -> None:
    server = smtp_server()
    channel = server.channel(tmp_path, starttls=False, sender="Carehub Alerts <" + SENDER + ">")
    outgoing = notification(
        body="Müller, José was admitted to 4 West at 08:30.\nSee the chart for details.\n",
        to="ada@clinic.test",
        subject="Admission: your patient",
        reply_to="care-desk@hospital.test",
        recipient_name="Dr. Ada Lovelace, MD",
    )
    before = datetime.now(UTC).replace(microsecond=0)

    receipt = attempt(channel, outgoing)

    assert receipt == "SMTP 250 2.0.0 Ok: queued as 4XQ7Z2"
    (mail,) = server.recorder.mails
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == ["ada@clinic.test"]
    assert not mail.tls
    message = mail.message
    assert message["From"].addresses[0].display_name == "Carehub Alerts"
    (to,) = message["To"].addresses
    assert (to.display_name, to.addr_spec) == ("Dr. Ada Lovelace, MD", "ada@clinic.test")
    assert message["Subject"] == "Admission: your patient"
    assert message["Reply-To"] == "care-desk@hospital.test"
    assert message["Message-ID"] == "<12%3Anotify%3A0@carehub.hospital.test>"
    assert message["X-Carehub-Delivery"] == "12:notify:0"
    assert message["Auto-Submitted"] == "auto-generated"
    assert parsedate_to_datetime(message["Date"]) >= before
    assert message.get_content_type() == "text/plain"
    assert message.get_content().replace("\r\n", "\n") == (
        "Müller, José was admitted to 4 West at 08:30.\nSee the chart for details.\n"
    )


def test_email_resend_has_the_same_message_id(
    tmp_path: Path, smtp_server: Callable[..., MailServer]
) -> None:
    server = smtp_server()
    channel = server.channel(tmp_path, starttls=False)
    outgoing = notification(to="ada@clinic.test", subject="s")
    other = notification(key="12:notify:1", to="ada@clinic.test", subject="s")

    async def body() -> list[str | DeliveryError]:
        return [await outcome(channel, o) for o in (outgoing, outgoing, other)]

    assert run_with(channel, body) == ["SMTP 250 2.0.0 Ok: queued as 4XQ7Z2"] * 3
    ids = [m.message["Message-ID"] for m in server.recorder.mails]
    assert ids[0] == ids[1] != ids[2]


def test_email_subject_falls_back_and_header_injection_is_flattened(
    tmp_path: Path, smtp_server: Callable[..., MailServer]
) -> None:
    server = smtp_server()
    channel = server.channel(tmp_path, starttls=False, subject="Care team update")
    no_subject = notification(key="a", to="ada@clinic.test")
    hostile = notification(
        key="b",
        to="ada@clinic.test",
        subject="Discharge\r\nBcc: everyone@elsewhere.test",
        recipient_name="Ada\nLovelace",
    )

    async def body() -> list[str | DeliveryError]:
        return [await outcome(channel, o) for o in (no_subject, hostile)]

    assert all(isinstance(r, str) for r in run_with(channel, body))
    first, second = server.recorder.mails
    assert first.message["Subject"] == "Care team update"
    assert second.message["Subject"] == "Discharge Bcc: everyone@elsewhere.test"
    assert second.message["Bcc"] is None
    assert second.rcpt_tos == ["ada@clinic.test"]
    assert second.message["To"].addresses[0].display_name == "Ada Lovelace"


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"to": "  "},
        {"to": "not an address"},
        {"to": "a@clinic.test, b@clinic.test"},
        {"to": "a@clinic.test", "reply_to": "x@"},
    ],
)
def test_email_bad_recipient_is_not_retryable_and_sends_nothing(
    tmp_path: Path, smtp_server: Callable[..., MailServer], metadata: dict[str, str]
) -> None:
    server = smtp_server()
    channel = server.channel(tmp_path, starttls=False)
    error = attempt(channel, notification(**metadata))
    assert isinstance(error, DeliveryError) and not error.retryable
    assert server.recorder.mails == []


def test_email_starttls_with_a_private_ca(
    tmp_path: Path, smtp_server: Callable[..., MailServer], certs: dict[str, Any]
) -> None:
    server = smtp_server(tls=certs["server"])
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "ca.pem").write_bytes(certs["ca"].read_bytes())
    channel = server.channel(tmp_path, ca_file="ca.pem")  # relative to the config folder
    assert attempt(channel, notification(to="ada@clinic.test")).startswith("SMTP 250")
    (mail,) = server.recorder.mails
    assert mail.tls


def test_email_starttls_with_an_unknown_ca_is_retryable(
    tmp_path: Path, smtp_server: Callable[..., MailServer], certs: dict[str, Any]
) -> None:
    server = smtp_server(tls=certs["server"])
    error = attempt(server.channel(tmp_path), notification(to="ada@clinic.test"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "certificate" in str(error).lower()
    assert server.recorder.mails == []

    unchecked = server.channel(tmp_path, validate_certs=False)
    assert attempt(unchecked, notification(to="ada@clinic.test")).startswith("SMTP 250")


def test_email_starttls_required_but_not_offered_is_retryable(
    tmp_path: Path, smtp_server: Callable[..., MailServer]
) -> None:
    server = smtp_server()  # no TLS at all
    error = attempt(server.channel(tmp_path), notification(to="ada@clinic.test"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "STARTTLS" in str(error)
    assert server.recorder.mails == []


def test_email_implicit_tls(
    tmp_path: Path, smtp_server: Callable[..., MailServer], certs: dict[str, Any]
) -> None:
    server = smtp_server(tls=certs["server"], implicit_tls=True)
    channel = server.channel(tmp_path, use_tls=True, ca_file=str(certs["ca"]))
    assert attempt(channel, notification(to="ada@clinic.test")).startswith("SMTP 250")
    (mail,) = server.recorder.mails
    assert mail.tls


def test_email_auth_success(
    tmp_path: Path, smtp_server: Callable[..., MailServer], certs: dict[str, Any]
) -> None:
    server = smtp_server(tls=certs["server"], auth=True)
    channel = server.channel(
        tmp_path, ca_file=str(certs["ca"]), username="carehub", password="s3cret"
    )
    assert "s3cret" not in repr(channel.options)
    assert attempt(channel, notification(to="ada@clinic.test")).startswith("SMTP 250")
    assert server.logins == [("carehub", "s3cret")]
    assert len(server.recorder.mails) == 1


def test_email_auth_failure_is_not_retryable(
    tmp_path: Path, smtp_server: Callable[..., MailServer], certs: dict[str, Any]
) -> None:
    server = smtp_server(tls=certs["server"], auth=True)
    channel = server.channel(
        tmp_path, ca_file=str(certs["ca"]), username="carehub", password="wrong"
    )
    error = attempt(channel, notification(to="ada@clinic.test"))
    assert isinstance(error, DeliveryError) and not error.retryable
    assert "535" in str(error) and "carehub" in str(error)
    assert "wrong" not in str(error)
    assert server.recorder.mails == []


@pytest.mark.parametrize(
    ("rcpt_reply", "data_reply", "retryable", "code"),
    [
        ("550 5.1.1 Mailbox unavailable", None, False, "550"),
        ("553 5.1.3 Bad destination mailbox address", None, False, "553"),
        ("451 4.3.0 Try again later", None, True, "451"),
        ("452 4.2.2 Mailbox full", None, True, "452"),
        (None, "554 5.7.1 Message rejected as spam", False, "554"),
        (None, "451 4.7.1 Greylisted, come back later", True, "451"),
    ],
)
def test_email_smtp_replies(
    tmp_path: Path,
    smtp_server: Callable[..., MailServer],
    rcpt_reply: str | None,
    data_reply: str | None,
    retryable: bool,
    code: str,
) -> None:
    server = smtp_server()
    server.recorder.rcpt_reply = rcpt_reply
    server.recorder.data_reply = data_reply
    error = attempt(server.channel(tmp_path, starttls=False), notification(to="ada@clinic.test"))
    assert isinstance(error, DeliveryError)
    assert error.retryable is retryable
    assert code in str(error) and "ada@clinic.test" in str(error)


def test_email_server_down_is_retryable(tmp_path: Path) -> None:
    channel = build(
        EmailChannel, tmp_path, host="127.0.0.1", port=free_port(), sender=SENDER, timeout=5
    )
    error = attempt(channel, notification(to="ada@clinic.test"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "SMTPConnectError" in str(error)


def test_email_server_that_never_greets_times_out_retryably(tmp_path: Path) -> None:
    async def main() -> tuple[str | DeliveryError, float]:
        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # accept, say nothing
            writer.close()

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        channel = build(
            EmailChannel, tmp_path, host="127.0.0.1", port=port, sender=SENDER, timeout=0.3
        )
        await channel.start()
        started = time.monotonic()
        try:
            return await outcome(channel, notification(to="ada@clinic.test")), started
        finally:
            await channel.close()
            server.close()

    error, started = asyncio.run(main())
    assert isinstance(error, DeliveryError) and error.retryable
    assert "no answer within 0.3 s" in str(error)
    assert time.monotonic() - started < 5


def test_email_limits_concurrent_connections(
    tmp_path: Path, smtp_server: Callable[..., MailServer]
) -> None:
    server = smtp_server()
    server.recorder.hold = 0.1
    channel = server.channel(tmp_path, starttls=False, max_connections=2)
    batch = [notification(key=f"k{i}", to=f"r{i}@clinic.test") for i in range(6)]
    receipts = run_with(channel, lambda: asyncio.gather(*(channel.send(o) for o in batch)))
    assert len(receipts) == 6 and len(server.recorder.mails) == 6
    assert server.recorder.max_in_data == 2


def test_email_render_for_a_plain_forward(tmp_path: Path) -> None:
    events = pytest.importorskip("carehub.events")
    event = events.CareEvent(
        kind="admission",
        message_type="ADT",
        trigger_event="A01",
        occurred_at=datetime(2026, 11, 25, 8, 30, tzinfo=UTC),
        patient=events.Patient(name=events.HumanName(family="MÜLLER", given="JOSÉ")),
        encounter=events.Encounter(
            location=events.Location(point_of_care="4W", room="401", facility="NORTH")
        ),
    )
    channel = build(
        EmailChannel, tmp_path, host="smtp.test", sender=SENDER, to="ward@hospital.test"
    )
    outgoing = channel.render(work_for(make_adt("FWD1"), route="adt", event=event), "k1")
    assert outgoing.metadata == {"to": "ward@hospital.test", "subject": "carehub notification"}
    assert outgoing.content_type == "text/plain; charset=utf-8"
    body = outgoing.payload.decode()
    assert body == (
        "admission (ADT^A01)\n"
        "at 2026-11-25 08:30+00:00\n"
        "at NORTH 4W\n"
        "carehub message 7 on route adt, control id FWD1\n"
    )
    assert "MÜLLER" not in body and "TESTPATIENT" not in body  # no PHI in a plain forward
    assert channel.render(work_for(make_adt("FWD1"), route="adt", event=event), "k1") == outgoing

    without_event = channel.render(work_for(make_adt("FWD2", "A03")), "k2").payload.decode()
    assert without_event.splitlines()[0] == "ADT^A03"

    no_to = build(EmailChannel, tmp_path, host="smtp.test", sender=SENDER)
    with pytest.raises(ValueError, match="no 'to' option"):
        no_to.render(work_for(make_adt("FWD3")), "k3")


def test_email_rendered_forward_is_delivered(
    tmp_path: Path, smtp_server: Callable[..., MailServer]
) -> None:
    server = smtp_server()
    channel = server.channel(tmp_path, starttls=False, to="ward@hospital.test", subject="ADT")
    outgoing = channel.render(work_for(make_adt("FWD4")), "fwd-key")
    assert attempt(channel, outgoing).startswith("SMTP 250")
    (mail,) = server.recorder.mails
    assert mail.rcpt_tos == ["ward@hospital.test"]
    assert mail.message["Subject"] == "ADT"
    assert "carehub message 7" in mail.message.get_content()


def test_email_options_are_checked(tmp_path: Path) -> None:
    base = {"host": "smtp.test", "sender": SENDER}
    implicit = EmailChannel.Options(**base, use_tls=True)
    assert (implicit.port, implicit.starttls) == (465, False)
    assert EmailChannel.Options(**base, use_tls=True, port=2465).port == 2465
    assert EmailChannel.Options(**base).port == 587
    with pytest.raises(ValidationError, match="exclude each other"):
        EmailChannel.Options(**base, use_tls=True, starttls=True)
    with pytest.raises(ValidationError, match="go together"):
        EmailChannel.Options(**base, username="u")
    with pytest.raises(ValidationError, match="no AUTH in clear"):
        EmailChannel.Options(**base, starttls=False, username="u", password="p")
    with pytest.raises(ValidationError, match="ca_file is a TLS setting"):
        EmailChannel.Options(**base, starttls=False, ca_file="ca.pem")
    with pytest.raises(ValidationError, match="not an email address"):
        EmailChannel.Options(host="smtp.test", sender="carehub")
    with pytest.raises(ValidationError, match="exactly one"):
        EmailChannel.Options(**base, to="a@x.test, b@x.test")
    with pytest.raises(ValidationError):
        EmailChannel.Options(**base, colour="blue")  # extra="forbid"


def test_email_missing_ca_file_is_a_start_error(tmp_path: Path) -> None:
    channel = build(EmailChannel, tmp_path, host="smtp.test", sender=SENDER, ca_file="nope.pem")
    with pytest.raises(ConfigError, match=r"nope\.pem"):
        asyncio.run(channel.start())


def test_message_id_is_valid_and_one_to_one() -> None:
    assert message_id("12:adt:0", "carehub.h.test") == "<12%3Aadt%3A0@carehub.h.test>"
    assert message_id("a b%", "d") == "<a%20b%25@d>"
    assert message_id(".x..y.", "d") == "<%2Ex%2E%2Ey%2E@d>"
    assert message_id("a.b", "d") == "<a.b@d>"
    assert message_id("a:b", "d") != message_id("a%3Ab", "d")


# -- SMS --------------------------------------------------------------------------------------
def gateway_status(request: Received) -> int:
    """/status/<code> answers that code; everything else is accepted (202)."""
    parts = request.path.strip("/").split("/")
    return int(parts[1]) if parts[0] == "status" else 202


@pytest.fixture(scope="module")
def gateway_server() -> Iterator[HTTPServer]:
    slow = lambda request: 2.0 if request.path == "/slow" else 0.0  # noqa: E731
    with HTTPServer(gateway_status, delay=slow) as server:
        yield server


@pytest.fixture
def gateway(gateway_server: HTTPServer) -> HTTPServer:
    gateway_server.clear()
    return gateway_server


def test_sms_default_body_and_headers(tmp_path: Path, gateway: HTTPServer) -> None:
    channel = build(SmsChannel, tmp_path, url=gateway.url("/sms"), auth_header="Bearer tok-123")
    text = 'Admitted: "4 West"\\ bed 2\nCall back é'
    outgoing = notification(key="12:notify:sms", body=text, to="+15551234567")
    assert "tok-123" not in repr(outgoing) and "tok-123" not in repr(channel.options)

    assert attempt(channel, outgoing) == "HTTP 202"

    (request,) = gateway.requests
    assert request.json == {"to": "+15551234567", "text": text, "reference": "12:notify:sms"}
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer tok-123"
    assert request.headers["idempotency-key"] == "12:notify:sms"
    assert request.headers["x-carehub-delivery"] == "12:notify:sms"


def test_sms_custom_template_and_no_auth(tmp_path: Path, gateway: HTTPServer) -> None:
    template = '{"messages": [{"destination": "{to}", "body": "carehub: {text}"}], "n": 1}'
    channel = build(SmsChannel, tmp_path, url=gateway.url("/sms"), body_template=template)
    assert attempt(channel, notification(body="Discharged", to="+4917012345")) == "HTTP 202"
    (request,) = gateway.requests
    assert request.json == {
        "messages": [{"destination": "+4917012345", "body": "carehub: Discharged"}],
        "n": 1,
    }
    assert "authorization" not in request.headers


def test_sms_long_text_is_shortened_and_the_receipt_says_so(
    tmp_path: Path, gateway: HTTPServer
) -> None:
    channel = build(SmsChannel, tmp_path, url=gateway.url("/sms"), max_length=20)
    long_text = "Patient discharged home with follow-up in two weeks."
    receipt = attempt(channel, notification(body=long_text, to="+15551234567"))
    assert receipt == f"HTTP 202 (text shortened from {len(long_text)} to 20 characters)"
    (request,) = gateway.requests
    sent = request.json["text"]
    assert sent == "Patient discharged…" and len(sent) <= 20

    gateway.clear()
    exact = "x" * 20
    assert attempt(channel, notification(body=exact, to="+1555")) == "HTTP 202"
    assert gateway.requests[0].json["text"] == exact


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (429, True), (408, True), (400, False), (401, False), (404, False)],
)
def test_sms_status_codes(
    tmp_path: Path, gateway: HTTPServer, status: int, retryable: bool
) -> None:
    channel = build(SmsChannel, tmp_path, url=gateway.url(f"/status/{status}"))
    error = attempt(channel, notification(to="+15551234567"))
    assert isinstance(error, DeliveryError)
    assert error.retryable is retryable
    assert f"HTTP {status}: test server says {status}" in str(error)


def test_sms_gateway_down_is_retryable(tmp_path: Path) -> None:
    channel = build(SmsChannel, tmp_path, url=f"http://127.0.0.1:{free_port()}/sms")
    error = attempt(channel, notification(to="+15551234567"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "ConnectError" in str(error)


def test_sms_timeout_is_retryable(tmp_path: Path, gateway: HTTPServer) -> None:
    channel = build(SmsChannel, tmp_path, url=gateway.url("/slow"), timeout=0.3)
    started = time.monotonic()
    error = attempt(channel, notification(to="+15551234567"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "no answer within 0.3 s" in str(error)
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("metadata", [{}, {"to": " "}])
def test_sms_without_a_recipient_is_not_retryable(
    tmp_path: Path, gateway: HTTPServer, metadata: dict[str, str]
) -> None:
    channel = build(SmsChannel, tmp_path, url=gateway.url("/sms"))
    error = attempt(channel, notification(**metadata))
    assert isinstance(error, DeliveryError) and not error.retryable
    assert gateway.requests == []


def test_sms_render_for_a_plain_forward(tmp_path: Path, gateway: HTTPServer) -> None:
    channel = build(SmsChannel, tmp_path, url=gateway.url("/sms"), to="+15550001111")
    outgoing = channel.render(work_for(make_adt("SMS1"), route="adt"), "k")
    assert outgoing.metadata == {"to": "+15550001111"}
    text = outgoing.payload.decode()
    assert text == (
        "carehub: ADT^A01; at TEST_HOSPITAL; carehub message 7 on route adt, control id SMS1"
    )
    assert attempt(channel, outgoing) == "HTTP 202"
    assert gateway.requests[0].json["text"] == text

    no_to = build(SmsChannel, tmp_path, url=gateway.url("/sms"))
    with pytest.raises(ValueError, match="no 'to' option"):
        no_to.render(work_for(make_adt("SMS2")), "k")


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ('{"to": "{to}", "text": "{txt}"}', "unknown placeholder"),
        ('{"to": "{to}"}', "must use"),
        ('{"to": {to}, "text": "{text}"}', "not JSON"),
        ('{"to": "{to}", "text": "{text}"', "not JSON"),
        ('{"{to}": "x", "text": "{text}"}', "inside JSON strings"),
    ],
)
def test_sms_bad_templates_are_config_errors(template: str, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        SmsChannel.Options(url="https://sms.test/send", body_template=template)


def test_sms_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        SmsChannel.Options(url="ftp://sms.test/send")
    with pytest.raises(ValidationError):
        SmsChannel.Options(url="https://sms.test/send", method="GET")
    with pytest.raises(ValidationError):
        SmsChannel.Options(url="https://sms.test/send", colour="blue")
    options = SmsChannel.Options(url="https://sms.test/send")
    assert (options.method, options.max_length, options.to) == ("POST", 320, None)


def test_fill_template_and_shorten() -> None:
    filled = fill_template('{"t": "{text}"}', {"text": 'a "b"\n\\'})
    assert json.loads(filled) == {"t": 'a "b"\n\\'}
    assert shorten("abcdef", 6) == "abcdef"
    assert shorten("abc def", 5) == "abc…"
    assert len(shorten("x" * 400, 320)) == 320
