"""carehub's messaging channels: ``email`` (SMTP) and ``sms`` (an HTTP SMS gateway).

They deliver care-team notifications. The notify step builds their ``Outgoing`` itself: the
payload is the rendered message body (``text/plain; charset=utf-8``) and ``metadata`` names the
recipient, so ``send`` takes everything recipient-specific from the delivery, never from the
channel's options:

    ``to``              the recipient's address (email address or phone number); required
    ``subject``         email only; falls back to the ``subject`` option
    ``reply_to``        email only, optional
    ``recipient_name``  email only, optional: the display name in ``To:``

``render`` exists for the plain forward step: it sends a short summary of the message to the
fixed ``to`` of the options. Like the other channels, ``send`` turns every failure into a
``DeliveryError`` that says whether retrying can help, and secrets (SMTP password, the gateway's
Authorization value) are applied per attempt and never recorded in the rendered ``Outgoing``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.errors
import email.policy
import json
import logging
import re
import ssl
from email.headerregistry import Address, ContentTypeHeader
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import quote

import aiosmtplib
import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from carehub.builtins.http_channel import (
    HttpChannel,
    cleartext_on_this_machine,
    finish_reading,
    http_url,
    read_some,
)
from carehub.care.templating import one_line
from carehub.components import (
    Channel,
    ComponentContext,
    ComponentOptions,
    DeliveryError,
    Outgoing,
    Work,
    on_this_machine,
)
from carehub.errors import ConfigError
from carehub.hookspecs import hookimpl
from carehub.intake.tls import client_context

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
RECEIPT_LIMIT = 100

log = logging.getLogger(__name__)


# -- shared helpers ---------------------------------------------------------------------------
def summary_lines(work: Work) -> list[str]:
    """What a plain forward says about a message: what happened, when, where, and carehub's
    reference to it.

    Deliberately without patient names or identifiers: a plain forward has no care-team
    relationship, consent check or detail level behind it (the notify step has), and email and
    SMS are not places to put PHI by default. The message id lets the reader look it up.

    Each line is one line: a facility or control ID can hold a line break decoded from an
    HL7 escape, which would otherwise start a line of the body that passes for a header."""
    message = work.message
    event = work.event
    message_type = "^".join(p for p in (message.message_type, message.trigger_event) if p)
    message_type = message_type or "HL7 message"
    kind = getattr(event, "kind", None)
    lines = [f"{str(kind).replace('_', ' ')} ({message_type})" if kind else message_type]
    occurred = getattr(event, "occurred_at", None)
    if isinstance(occurred, dt.datetime):
        lines.append(f"at {occurred.isoformat(sep=' ', timespec='minutes')}")
    encounter = getattr(event, "encounter", None)
    location = getattr(encounter, "location", None)
    place = [
        getattr(location, "facility", None)
        or getattr(event, "sending_facility", None)
        or message.sending_facility,
        getattr(location, "point_of_care", None),
    ]
    where = " ".join(str(p) for p in place if p)
    if where:
        lines.append(f"at {where}")
    reference = f"carehub message {message.id} on route {work.route}"
    if message.control_id:
        reference += f", control id {message.control_id}"
    lines.append(reference)
    return [one_line(line) for line in lines]


def _recipient(outgoing: Outgoing, channel: str) -> str:
    """``metadata["to"]``; a delivery without one can never succeed, so it is not retryable."""
    to = outgoing.metadata.get("to", "").strip()
    if not to:
        raise DeliveryError(
            f"{channel} delivery {outgoing.idempotency_key} names no recipient (metadata 'to')",
            retryable=False,
        )
    return to


def _payload_text(outgoing: Outgoing, channel: str) -> tuple[str, str]:
    """The payload as text and its subtype ("plain", "html"), decoded by the charset its
    content type declares (UTF-8 when it declares none)."""
    header = email.policy.default.header_factory(
        "Content-Type", outgoing.content_type or TEXT_CONTENT_TYPE
    )
    assert isinstance(header, ContentTypeHeader)
    if header.maintype != "text":
        raise DeliveryError(
            f"{channel} channel sends text, not {outgoing.content_type!r}", retryable=False
        )
    charset = header.params.get("charset") or "utf-8"
    try:
        return outgoing.payload.decode(charset), header.subtype
    except (LookupError, UnicodeDecodeError) as err:
        raise DeliveryError(
            f"{channel} delivery {outgoing.idempotency_key}: payload is not {charset}: {err}",
            retryable=False,
        ) from err


def _one_line(value: str) -> str:
    """A header value on one line: a subject or name with a line break (from a template or a
    roster) is formatting, not a reason to fail, and must never become a header injection."""
    return " ".join(value.split())


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- email ------------------------------------------------------------------------------------
def parse_address(value: str) -> Address:
    """Exactly one email address (with or without a display name), or ValueError.

    The stdlib parser is lenient and records problems as defects instead of raising; every
    defect but a non-ASCII local part (legal with SMTPUTF8) makes the address unusable here."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"{value!r} contains a line break")
    try:
        header: Any = email.policy.default.header_factory("To", value)
    except (IndexError, ValueError) as err:  # the parser raises IndexError on "x@"
        raise ValueError(f"{value!r} is not an email address") from err
    defects = [d for d in header.defects if not isinstance(d, email.errors.NonASCIILocalPartDefect)]
    addresses = header.addresses
    if len(addresses) != 1:
        raise ValueError(f"{value!r} must be exactly one email address, not {len(addresses)}")
    (address,) = addresses
    if defects or not address.username or not address.domain:
        raise ValueError(f"{value!r} is not an email address")
    return address


def message_id(key: str, domain: str) -> str:
    """The Message-ID for a delivery: the same on every retry, so a receiver (or a person)
    recognises a resend; ``domain`` (``carehub.`` + the sender's domain) keeps two carehub
    installations whose keys coincide from colliding in one mailbox.

    RFC 5322 allows only atext and dots in the left part: anything else in the key (":" and
    spaces are common) is %-escaped, which keeps the mapping one-to-one."""
    left = quote(key, safe="!#$&'*+-/=?^_`{|}~.")
    if not left or left.startswith(".") or left.endswith(".") or ".." in left:
        left = left.replace(".", "%2E") or "%00"
    return f"<{left}@{domain}>"


def _ascii_domain(domain: str) -> str:
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return "invalid"


class EmailChannel(Channel):
    """Sends each delivery as one email over SMTP (aiosmtplib).

    Message: ``From: <sender>``, ``To: <recipient_name> <to>``, ``Subject``, ``Reply-To`` when
    given, ``Date`` (the attempt), ``Message-ID: <key@carehub.<sender domain>>`` and
    ``X-Carehub-Delivery: <key>`` (both the same on every retry), ``Auto-Submitted:
    auto-generated`` (RFC 3834: no vacation replies to a robot); the body is the payload text.
    The envelope is the sender's and the recipient's bare addresses.

    Transport: STARTTLS is required by default (``starttls``), or implicit TLS with
    ``use_tls`` (port 465 unless ``port`` is given); ``ca_file`` trusts a private CA.
    ``username``/``password`` log in, and only over TLS: a password is never sent in clear.
    One connection per delivery (mail servers drop idle sessions), at most
    ``max_connections`` at once, because the worker may send dozens of deliveries concurrently
    and servers limit connections per client.

    Outcome: accepted -> receipt ``SMTP 250 <server reply>`` (shortened; it usually holds the
    queue id). 4xx replies, refused or timed-out connections, disconnects, TLS failures and a
    server that does not offer STARTTLS/AUTH -> retryable (the server or its setup can be
    fixed, then the retry goes through). 5xx replies (550 mailbox unavailable, 553 bad address,
    535 authentication failed, ...) -> not retryable: repeating will not change the answer, and
    repeating a failed login can lock the account. A bad recipient address in the delivery, or a
    non-ASCII one the server cannot take (no SMTPUTF8), is not retryable either.
    """

    name = "email"
    description = "send each delivery as an email over SMTP (STARTTLS or TLS, optional AUTH)"

    class Options(ComponentOptions):
        host: str = Field(description="SMTP server")
        port: int = Field(587, ge=1, le=65535, description="SMTP port (465 is usual with use_tls)")
        starttls: bool = Field(True, description="require STARTTLS on a plain connection")
        use_tls: bool = Field(False, description="implicit TLS from the start (port 465)")
        username: str | None = Field(None, description="login name; only sent over TLS")
        password: SecretStr | None = Field(None, description="login password; only sent over TLS")
        sender: str = Field(description="From address")
        timeout: float = Field(30.0, gt=0, description="seconds per SMTP exchange")
        validate_certs: bool = Field(True, description="check the server's TLS certificate")
        ca_file: Path | None = Field(None, description="CA file to trust for a private CA")
        to: str | None = Field(
            None, description="recipient for a plain forward step (notify gives its own)"
        )
        subject: str = Field(
            "carehub notification", description="subject when the delivery gives none"
        )
        max_connections: int = Field(4, ge=1, description="SMTP connections open at once")

        @field_validator("sender", "to")
        @classmethod
        def _address(cls, value: str | None) -> str | None:
            if value is not None:
                parse_address(value)
            return value

        @field_validator("subject")
        @classmethod
        def _subject(cls, value: str) -> str:
            value = _one_line(value)
            if not value:
                raise ValueError("subject must not be empty")
            return value

        @model_validator(mode="after")
        def _transport(self) -> Self:
            if self.use_tls:
                if self.starttls and "starttls" in self.model_fields_set:
                    raise ValueError(
                        "use_tls (implicit TLS) and starttls exclude each other: pick one"
                    )
                self.starttls = False
                if "port" not in self.model_fields_set:
                    self.port = 465
            tls = self.use_tls or self.starttls
            if (self.username is None) != (self.password is None):
                raise ValueError("username and password go together")
            if self.username is not None and not tls:
                raise ValueError("username/password need starttls or use_tls (no AUTH in clear)")
            if self.ca_file is not None and not tls:
                raise ValueError("ca_file is a TLS setting: set starttls or use_tls to use it")
            return self

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self.sender = parse_address(self.options.sender)
        self.domain = "carehub." + _ascii_domain(self.sender.domain)
        self._tls: ssl.SSLContext | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.options.port}"

    def unprotected_transport(self) -> str | None:
        o = self.options
        if on_this_machine(o.host):
            if o.starttls or o.use_tls:
                return None
            return cleartext_on_this_machine(
                f"SMTP server {self.address} in clear (starttls: false, no use_tls)",
                o.port,
                "set starttls: true or use_tls: true",
            )
        if not (o.starttls or o.use_tls):
            return (
                f"sends patient data to SMTP server {self.address} in clear (starttls: false, "
                "no use_tls): anyone on the network between can read it; set starttls: true "
                "or use_tls: true"
            )
        if not o.validate_certs:
            return (
                f"sends patient data to SMTP server {self.address} with validate_certs: false: "
                "the server's certificate is not checked, so anyone on the network between can "
                "pose as the server and read it; remove validate_certs: false (ca_file trusts "
                "a private CA)"
            )
        return None

    async def start(self) -> None:
        """Load the CA file now so a bad path is a start-up error; connect per delivery, so a
        mail server that is down does not stop the hub from starting."""
        o = self.options
        if o.starttls or o.use_tls:
            ca = self.context.path(o.ca_file) if o.ca_file else None
            try:
                self._tls = client_context(ca, verify=o.validate_certs)
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"email channel {self.address}: cannot load {ca}: {err}") from err
        self._slots = asyncio.Semaphore(o.max_connections)

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        if not self.options.to:
            raise ValueError(
                "email channel has no 'to' option: as a plain forward step it needs one "
                "(notifications name their recipient themselves)"
            )
        body = "\n".join(summary_lines(work)) + "\n"
        metadata = {"to": self.options.to, "subject": self.options.subject}
        return Outgoing(body.encode("utf-8"), TEXT_CONTENT_TYPE, idempotency_key, metadata)

    def build_message(self, outgoing: Outgoing) -> EmailMessage:
        """The email for one delivery (``Date`` is the moment of the call); raises a
        non-retryable DeliveryError when the delivery cannot make a valid message."""
        meta = outgoing.metadata
        key = outgoing.idempotency_key
        to_text = _recipient(outgoing, "email")
        try:
            to = parse_address(to_text)
            reply_to = parse_address(meta["reply_to"]) if meta.get("reply_to") else None
        except ValueError as err:
            raise DeliveryError(f"email delivery {key}: {err}", retryable=False) from err
        name = _one_line(meta.get("recipient_name", "")) or to.display_name
        text, subtype = _payload_text(outgoing, "email")

        message = EmailMessage()
        try:
            message["From"] = self.sender
            message["To"] = Address(name, to.username, to.domain)
            if reply_to is not None:
                message["Reply-To"] = reply_to
            message["Subject"] = _one_line(meta.get("subject", "")) or self.options.subject
            message["Date"] = format_datetime(dt.datetime.now(dt.UTC))
            message["Message-ID"] = message_id(key, self.domain)
            message["X-Carehub-Delivery"] = key
            message["Auto-Submitted"] = "auto-generated"
            message.set_content(text, subtype=subtype, charset="utf-8")
        except (ValueError, TypeError) as err:
            raise DeliveryError(f"email delivery {key}: {err}", retryable=False) from err
        return message

    async def send(self, outgoing: Outgoing) -> str:
        if self._slots is None:
            raise RuntimeError("EmailChannel.send() before start()")
        message = self.build_message(outgoing)
        o = self.options
        recipient = message["To"].addresses[0].addr_spec
        smtp = aiosmtplib.SMTP(
            hostname=o.host,
            port=o.port,
            use_tls=o.use_tls,
            start_tls=o.starttls,
            tls_context=self._tls,
            timeout=o.timeout,
            username=o.username,
            password=o.password.get_secret_value() if o.password else None,
        )
        async with self._slots:
            try:
                async with smtp:
                    _, reply = await smtp.send_message(
                        message, sender=self.sender.addr_spec, recipients=[recipient]
                    )
            except (aiosmtplib.SMTPException, OSError, ValueError) as err:
                raise self._error(err, recipient) from err
        return _excerpt(f"SMTP 250 {reply}", RECEIPT_LIMIT)

    def _error(self, err: Exception, recipient: str) -> DeliveryError:
        """The DeliveryError for a failed attempt: 5xx replies are final, the rest is not.
        The server's reply text goes in ``said`` (it can quote the message); the text says
        which server, what carehub asked for and the reply code or what went wrong."""
        where = f"SMTP {self.address}"
        if isinstance(err, aiosmtplib.SMTPRecipientsRefused):
            refusals = err.recipients
            codes = "; ".join(f"{r.recipient}: {r.code}" for r in refusals)
            said = "; ".join(f"{r.recipient}: {r.message}" for r in refusals)
            final = bool(refusals) and all(500 <= r.code < 600 for r in refusals)
            return DeliveryError(f"{where} refused {codes}", retryable=not final, said=said)
        if isinstance(err, aiosmtplib.SMTPResponseException):
            if isinstance(err, aiosmtplib.SMTPAuthenticationError):
                what = f"rejected the login as {self.options.username!r}"
            elif isinstance(err, aiosmtplib.SMTPSenderRefused):
                what = f"refused sender {err.sender}"
            elif isinstance(err, aiosmtplib.SMTPRecipientRefused):
                what = f"refused recipient {err.recipient}"
            elif isinstance(err, aiosmtplib.SMTPDataError):
                what = f"refused the message for {recipient}"
            else:
                what = "answered"
            return DeliveryError(
                f"{where} {what}: {err.code}",
                retryable=not 500 <= err.code < 600,
                said=_excerpt(err.message) or None,
            )
        if isinstance(err, aiosmtplib.SMTPTimeoutError | TimeoutError):
            return DeliveryError(
                f"{where}: no answer within {self.options.timeout:g} s ({err})", said=None
            )
        if isinstance(err, aiosmtplib.SMTPNotSupported):  # SMTPUTF8 for a non-ASCII address
            return DeliveryError(
                f"{where}: {err} (recipient {recipient})", retryable=False, said=None
            )
        if isinstance(err, ssl.SSLError):  # before ValueError: certificate errors are both
            return DeliveryError(f"{where}: TLS failed: {type(err).__name__}: {err}", said=None)
        if isinstance(err, ValueError):  # an address aiosmtplib will not put on the wire
            return DeliveryError(f"{where}: {recipient}: {err}", retryable=False, said=None)
        if isinstance(err, OSError) and not isinstance(err, aiosmtplib.SMTPException):
            return DeliveryError(f"cannot reach {where}: {type(err).__name__}: {err}", said=None)
        # SMTPConnectError, SMTPServerDisconnected, no STARTTLS/AUTH offered, ...
        cause = err.__cause__
        detail = f" ({type(cause).__name__}: {cause})" if cause else ""
        return DeliveryError(f"{where}: {type(err).__name__}: {err}{detail}", said=None)


# -- sms --------------------------------------------------------------------------------------
DEFAULT_SMS_TEMPLATE = '{"to": "{to}", "text": "{text}", "reference": "{key}"}'
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_SMS_FIELDS = frozenset({"to", "text", "key"})


def fill_template(template: str, values: dict[str, str]) -> str:
    """The template with each ``{name}`` replaced by the JSON-escaped value (no quotes added:
    the template's own quotes surround it), so a quote or line break in a message can never
    break out of its JSON string."""
    return _PLACEHOLDER.sub(
        lambda m: json.dumps(values[m.group(1)], ensure_ascii=False)[1:-1], template
    )


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, the cut marked with "…"."""
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"


#: The least room a numbered text must leave for its words; a ``max_length`` smaller than
#: that sends one text, cut (the receipt and the log say so).
MIN_ROOM_PER_TEXT = 20


def split_text(text: str, limit: int) -> list[str]:
    """``text`` as texts of at most ``limit`` characters that together say all of it: the text
    itself when it fits, else numbered parts ("(1/3) ...", "(2/3) ...") split between lines
    where a line fits in one, between words where it does not, and inside a word only when a
    word alone is too long."""
    text = text.strip()
    if len(text) <= limit:
        return [text]
    digits = 1
    while True:
        room = limit - len(f"({'9' * digits}/{'9' * digits}) ")
        if room < MIN_ROOM_PER_TEXT:
            return [text]
        parts = _pack(text, room)
        if len(str(len(parts))) <= digits:
            return [f"({n}/{len(parts)}) {part}" for n, part in enumerate(parts, start=1)]
        digits += 1


def _pack(text: str, room: int) -> list[str]:
    """``text`` in pieces of at most ``room`` characters: as many whole lines to a piece as
    fit, a line longer than ``room`` by its words."""
    pieces: list[str] = []
    current = ""

    def add(chunk: str, joint: str) -> None:
        nonlocal current
        if current and len(current) + len(joint) + len(chunk) <= room:
            current += joint + chunk
            return
        if current:
            pieces.append(current)
        current = chunk

    for line in text.split("\n"):
        if len(line) <= room:
            add(line, "\n")
            continue
        joint = "\n"
        for word in line.split(" "):
            for start in range(0, len(word) or 1, room):
                add(word[start : start + room], joint)
                joint = " "
    if current:
        pieces.append(current)
    return pieces


class SmsChannel(HttpChannel):
    """Sends each delivery as a text message through an HTTP SMS gateway (httpx).

    The request body is ``body_template`` (a JSON document) with ``{to}`` (the recipient's
    number), ``{text}`` (the payload text) and ``{key}`` (the delivery's idempotency key)
    replaced by their JSON-escaped values, so the template fits any gateway's field names;
    placeholders belong inside JSON strings. Text longer than ``max_length`` characters is cut
    with "…" (the receipt says so, and a warning is logged): SMS is billed per segment, and a
    notification that needs more than a few belongs in another channel. The notify step
    never has its notices cut: it sends a longer one as several numbered texts (``as_texts``),
    each a delivery of its own.

    Headers: ``Content-Type: application/json``, ``Idempotency-Key`` and ``X-Carehub-Delivery``
    (the delivery's key, the same on every retry, so gateways that support it drop repeats),
    and ``Authorization: <auth_header>`` when set (applied per request, never recorded).

    Outcome: 2xx -> receipt ``HTTP <code>``; 408, 425, 429, 5xx, timeouts and network errors ->
    retryable; 3xx, other 4xx, 501 and 505 -> not retryable (a bad number or a rejected request
    will not get better by repeating it), with the status and up to 200 characters of the
    response.
    """

    name = "sms"
    description = "send each delivery as a text message through an HTTP SMS gateway"

    class Options(ComponentOptions):
        url: str = Field(description="the SMS gateway's http(s) URL")
        method: Literal["POST"] = Field("POST", description="HTTP method")
        auth_header: SecretStr | None = Field(
            None, description="Authorization header value; never stored"
        )
        body_template: str = Field(
            DEFAULT_SMS_TEMPLATE,
            description="JSON request body with {to}, {text} and {key} placeholders",
        )
        max_length: int = Field(
            320,
            ge=2,
            description="longer text is cut, marked with an ellipsis (notify steps send a "
            "longer notice as several numbered texts instead)",
        )
        timeout: float = Field(10.0, gt=0, description="seconds for the whole request")
        to: str | None = Field(
            None, description="phone number for a plain forward step (notify gives its own)"
        )

        _url = field_validator("url")(http_url)

        @field_validator("body_template")
        @classmethod
        def _template(cls, value: str) -> str:
            names = set(_PLACEHOLDER.findall(value))
            unknown = names - _SMS_FIELDS
            if unknown:
                raise ValueError(
                    f"unknown placeholder(s) {sorted(unknown)} in body_template; "
                    f"use {sorted(_SMS_FIELDS)}"
                )
            missing = {"to", "text"} - names
            if missing:
                raise ValueError(f"body_template must use {sorted(missing)}")
            # Values with quotes, backslashes and line breaks must survive as JSON strings.
            sample = {"to": '+1 "to" \\', "text": 'line\n"text" \\ é', "key": "k:1"}
            filled = fill_template(value, sample)
            try:
                json.loads(filled)
            except ValueError as err:
                raise ValueError(
                    f"body_template is not JSON with its placeholders inside strings: {err}"
                ) from err
            strings = _strings(json.loads(filled))
            if not all(any(sample[n] in s for s in strings) for n in names):
                raise ValueError("body_template placeholders must be inside JSON strings")
            return value

        @field_validator("to")
        @classmethod
        def _to(cls, value: str | None) -> str | None:
            if value is not None and not value.strip():
                raise ValueError("to must not be empty")
            return value

    options: Options

    def as_texts(self, text: str) -> list[str]:
        """``text`` as the texts that carry all of it within ``max_length`` (see
        ``split_text``), for a sender that would rather send several than have it cut."""
        return split_text(text, self.options.max_length)

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        if not self.options.to:
            raise ValueError(
                "sms channel has no 'to' option: as a plain forward step it needs one "
                "(notifications name their recipient themselves)"
            )
        text = "carehub: " + "; ".join(summary_lines(work))
        metadata = {"to": self.options.to}
        return Outgoing(text.encode("utf-8"), TEXT_CONTENT_TYPE, idempotency_key, metadata)

    def request_for(self, outgoing: Outgoing) -> tuple[bytes, dict[str, str], int]:
        """The body and headers for one delivery, and the text's length before any cut."""
        key = outgoing.idempotency_key
        to = _recipient(outgoing, "sms")
        text = _payload_text(outgoing, "sms")[0].strip()
        if not text:
            raise DeliveryError(f"sms delivery {key} has no text", retryable=False)
        values = {"to": to, "text": shorten(text, self.options.max_length), "key": key}
        body = fill_template(self.options.body_template, values).encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-Carehub-Delivery": key,
        }
        if self.options.auth_header:
            headers["Authorization"] = self.options.auth_header.get_secret_value()
        return body, headers, len(text)

    async def send(self, outgoing: Outgoing) -> str:
        body, headers, length = self.request_for(outgoing)
        method, url = self.options.method, self.options.url
        try:
            async with self.request(method, url, body, headers) as response:
                status = response.status_code
                if 200 <= status < 300:
                    await finish_reading(response)
                    receipt = f"HTTP {status}"
                    if length > self.options.max_length:
                        receipt += (
                            f" (text shortened from {length} to "
                            f"{self.options.max_length} characters)"
                        )
                        log.warning(
                            "sms: a text of %d characters was cut to max_length %d, so its "
                            "end was not sent (the delivery's receipt says so)",
                            length,
                            self.options.max_length,
                        )
                    return receipt
                excerpt = _excerpt(await read_some(response))
        except (httpx.TimeoutException, httpx.TransportError) as err:
            raise self.unreached(method, url, err) from err
        # The gateway's body can echo the text it was sent: kept, never logged.
        raise self.refused(method, url, response, said=excerpt or None)


def _strings(document: Any) -> list[str]:
    """Every string value in a JSON document (keys excluded)."""
    if isinstance(document, str):
        return [document]
    if isinstance(document, dict):
        return [s for v in document.values() for s in _strings(v)]
    if isinstance(document, list):
        return [s for v in document for s in _strings(v)]
    return []


# -- registration -----------------------------------------------------------------------------
@hookimpl
def carehub_register_channels(register: Any) -> None:
    """The messaging channels, registered like any plugin's."""
    register(EmailChannel)
    register(SmsChannel)
