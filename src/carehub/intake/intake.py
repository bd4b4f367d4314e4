"""The one path every listener (MLLP, HTTP, file drop) sends received bytes down.

decode by MSH-18 -> read the header through the lazy view -> store (group commit) -> ACK.
AA only after the commit; AE when stored but the content is refused (an empty MSH-9, MSH-10 or
MSH-11, bytes that are not in the character set MSH-18 names, a line that is not a segment);
AR when the frame is not HL7 at all or cannot be taken as one message (too large, cut short,
several messages in one frame, unusable delimiters), or its MSH-11 processing ID is not one
the listener takes (a training or debugging message on a production port). Every outcome is a
row in the store, and only an AA message is routed.

A resend of a stored message (same MSH-3, MSH-4, MSH-10 and content) is answered AA and not
stored again; a message that reuses a control ID with other content is a new message, stored
and routed, and its row says which message used the control ID before (store.NewMessage).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from carehub.hl7.ack import (
    AckCode,
    ErrorCode,
    accept_ack_wanted,
    application_ack_wanted,
    build_ack,
)
from carehub.hl7.batch import split_data
from carehub.hl7.charsets import codec_for, decode_message, encode_reply, is_wide, same_charset
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView, NotHL7Error
from carehub.store.group_commit import Committed, GroupCommit, StoreUnavailable
from carehub.store.schema import MessageStatus
from carehub.store.store import InsertOutcome, MessageStore, NewMessage
from carehub.workqueue import patient_key

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Arrival:
    """How a message came in: the transport, the named listener, and the peer address."""

    transport: str
    listener: str
    peer: str | None = None
    default_charset: str = "utf-8"
    #: The listener honours enhanced-mode acknowledgment (MLLPListenerConfig.enhanced_acks).
    enhanced_acks: bool = False
    #: The code of a message the store could not take (a listener's ``not_stored_ack``).
    not_stored: AckCode = AckCode.ERROR
    #: The MSH-11 processing IDs the listener takes (its ``processing_ids``): production
    #: only unless it says otherwise.
    processing_ids: tuple[str, ...] = ("P",)


@dataclass(slots=True, frozen=True)
class IntakeResult:
    """One frame's outcome. ``code`` is the outcome in original-mode terms, whatever was sent
    (it is what the store records); ``ack`` is the answer, with CA/CE/CR in enhanced mode;
    ``send`` is False when the sender's MSH-15 asked for no answer to this outcome;
    ``application_ack`` is, in enhanced mode, the application acknowledgment (AA/AE/AR) its
    MSH-16 asked for, to be sent on the same connection after ``ack`` (or alone when ``send``
    is False); ``charset`` is the codec the answers are written in, the one the message was
    read with (HTTP names it in the answer's content type)."""

    code: AckCode
    ack: bytes
    message_id: int | None
    duplicate: bool = False
    reason: str | None = None
    send: bool = True
    application_ack: bytes | None = None
    charset: str = "utf-8"


#: Called with the result of one frame once it is settled (committed, or refused by the store).
Answer = Callable[[IntakeResult], None]

#: Messages of one batch (a file in the drop, a body posted over HTTP) handed to the store at a
#: time. Each group is parsed and committed on the event loop (a few milliseconds), and other
#: senders' messages join its commit or the next, so their answers do not wait for the rest of
#: the batch.
BATCH_GROUP = 100

_Item = TypeVar("_Item")


class BatchStopped(StoreUnavailable):
    """Why the rest of a batch was not stored: an earlier message of it was not."""


BATCH_STOPPED = (
    "message not stored: an earlier message of this batch was not stored, so none after it "
    "was either; send the batch again (what was stored is recognised as resent)"
)


async def receive_in_groups(
    intake: Intake,
    items: Iterable[_Item],
    take: Callable[[Intake, _Item], Awaitable[IntakeResult]],
    size: int = BATCH_GROUP,
) -> AsyncIterator[list[tuple[_Item, IntakeResult]]]:
    """Each group of ``size`` items taken together, in order, with its results: a group's
    messages are submitted in order and share a commit, and the loop answers other senders
    between groups, as it would not if thousands of messages were started at once.

    Once a message is answered "not stored" (a full disk, a write lock held too long), every
    later group is answered "not stored" without being stored: the sender's resend of the
    batch then brings them in the batch's order. Storing them would route a patient's A03
    ahead of the A01 that only the resend brings. Within a group the messages share one
    commit, and so one outcome, unless other senders' messages fill that commit (MAX_BATCH):
    then its tail goes in the next, which a full disk may take when it refused the first."""
    group: list[_Item] = []
    taker = intake

    async def taken() -> list[tuple[_Item, IntakeResult]]:
        nonlocal taker
        results = await asyncio.gather(*(take(taker, item) for item in group))
        if taker is intake and any(_not_stored(result) for result in results):
            taker = intake.storing_nothing(BatchStopped(BATCH_STOPPED))
        return list(zip(group, results, strict=True))

    for item in items:
        group.append(item)
        if len(group) == size:
            yield await taken()
            group = []
    if group:
        yield await taken()


def _not_stored(result: IntakeResult) -> bool:
    return result.message_id is None and result.code is not AckCode.ACCEPT


class _StoringNothing(GroupCommit):
    """A writer that answers every message "not stored" with one reason, on the next loop
    pass, and stores nothing (Intake.storing_nothing). It keeps the store it stands in for, so
    that it is a whole GroupCommit to whatever asks (writable, failing)."""

    def __init__(self, store: MessageStore, reason: StoreUnavailable) -> None:
        super().__init__(store)
        self.reason = reason

    def submit_soon(self, message: NewMessage, done: Committed) -> None:
        asyncio.get_running_loop().call_soon(done, self.reason)


@dataclass(slots=True, frozen=True)
class _Refusal:
    """Why a message's content is refused (AE), and where, for the ACK's ERR segment."""

    reason: str
    error_code: ErrorCode
    location: str = ""


_LINE_END = re.compile(r"\r\n|\r|\n")
_LEADING_BLANK = "\ufeff \t\r\n\x0b"  # what MessageView skips before MSH
_DEFAULT_ENCODING = "^~\\&"  # MSH-2 as nearly every sender writes it
#: Characters of a line that is not a segment quoted back in the ACK, so the sender can find it.
_EXCERPT = 20


class Intake:
    def __init__(
        self,
        writer: GroupCommit,
        *,
        hub_application: str = "CAREHUB",
        hub_facility: str = "",
        on_accepted: Callable[[int, str], None] | None = None,
    ) -> None:
        self.writer = writer
        #: Told (message id, patient key) of each new message after its commit: the hub
        #: publishes it to the work queue. Not called for resends, refusals or rejections.
        self.on_accepted = on_accepted
        self.hub_application = hub_application
        self.hub_facility = hub_facility
        #: (listener, outcome) -> count; outcome is accepted, duplicate, refused, rejected or
        #: store_error. Read by /health and /metrics; a dict increment costs nothing per message.
        self.counts: Counter[tuple[str, str]] = Counter()

    def storing_nothing(self, reason: StoreUnavailable) -> Intake:
        """This intake with a writer that stores nothing and answers each message "not
        stored" for ``reason``; it counts into the same counts."""
        stopped = copy.copy(self)
        stopped.writer = _StoringNothing(self.writer.store, reason)
        return stopped

    async def receive(self, payload: bytes, arrival: Arrival) -> IntakeResult:
        """Store one message and return the ACK that answers it."""
        return await self._awaited(self.receive_soon, payload, arrival)

    async def reject_unreadable_frame(
        self, head: bytes, size: int, arrival: Arrival, reason: str
    ) -> IntakeResult:
        """Answer a frame that cannot be taken whole (see ``reject_unreadable_frame_soon``)."""
        return await self._awaited(self.reject_unreadable_frame_soon, head, size, arrival, reason)

    @staticmethod
    async def _awaited(submit: Callable[..., None], *args: object) -> IntakeResult:
        future: asyncio.Future[IntakeResult] = asyncio.get_running_loop().create_future()
        submit(*args, future.set_result)
        return await future

    def receive_soon(self, payload: bytes, arrival: Arrival, answer: Answer) -> None:
        """Store one message; ``answer`` is called with the result (and its ACK) once it is
        committed. The MLLP listener takes this form: no task or future per frame."""
        decoded = decode_message(payload, arrival.default_charset)
        try:
            view = MessageView(decoded.text, decoded.charset)
        except NotHL7Error:
            # A batch is answered from its FHS/BHS header, so its sender can match the AR.
            batch = _batch_header(decoded.text, decoded.charset)
            self._reject(
                payload,
                arrival,
                batch.view if batch else None,
                _not_hl7_reason(decoded.text),
                ErrorCode.SEGMENT_SEQUENCE,
                answer,
                charset=decoded.charset,
                header=batch.header if batch else None,
            )
            return
        unreadable = _delimiters_problem(decoded.text)
        if unreadable is not None:
            # Without its delimiters no field can be found where it belongs (a missing MSH-2
            # shifted MSH-10 into MSH-11 and was answered AA): nothing of it can be trusted
            # beyond what the field separator alone finds, when MSH-2 is in its place.
            readable = _header_by_field_separator(decoded.text, decoded.charset)
            self._reject(
                payload,
                arrival,
                readable.view if readable else None,
                unreadable,
                ErrorCode.DATA_TYPE_ERROR,
                answer,
                charset=decoded.charset,
                # ERR-2 names the field: MSH-1 or MSH-2 of the (first) MSH segment.
                location="MSH-1-1" if unreadable.startswith("MSH-1 ") else "MSH-1-2",
                header=readable.header if readable else None,
            )
            return
        if arrival.transport == "mllp" and is_wide(decoded.charset):
            # Its bytes can hold <FS><CR> (U+0D1C in UTF-16LE is 1C 0D), which ends the frame
            # in mid-message: whatever came whole cannot be trusted to be the whole message.
            self._reject(
                payload,
                arrival,
                view,
                _WIDE_ON_MLLP,
                ErrorCode.DATA_TYPE_ERROR,
                answer,
                charset=decoded.charset,
                location="MSH-1-18",
            )
            return
        irregular = view.first_irregular()
        problem: _Refusal | None = None
        if irregular is not None:
            second = _second_message(view, irregular)
            if second is not None:
                # One frame, one message: storing it as one would forward the second inside
                # the first, and splitting it would answer two messages with one ACK.
                self._reject(
                    payload,
                    arrival,
                    view,
                    _several_messages_reason(payload, decoded.text, view, second),
                    ErrorCode.SEGMENT_SEQUENCE,
                    answer,
                    charset=decoded.charset,
                    location="MSH-2",  # ERR-2: the second MSH segment, not a field
                )
                return
        header = MessageHeader.read(view)
        processing_id = header.processing_id
        if processing_id and processing_id not in arrival.processing_ids:
            # A training or debugging message on a production port (a test system pointed at
            # it by mistake): routing it would tell care teams of patients who do not exist.
            self._reject(
                payload,
                arrival,
                view,
                _processing_id_reason(processing_id, arrival.processing_ids),
                ErrorCode.UNSUPPORTED_PROCESSING_ID,
                answer,
                charset=decoded.charset,
                location="MSH-1-11",
                header=header,
            )
            return
        header_problem = header.problem()
        if header_problem:
            location = "MSH-1-10" if "MSH-10" in header_problem else "MSH-1-9"
            problem = _Refusal(header_problem, ErrorCode.REQUIRED_FIELD_MISSING, location)
        elif not processing_id:
            problem = _Refusal(
                _no_processing_id_reason(arrival.processing_ids),
                ErrorCode.REQUIRED_FIELD_MISSING,
                "MSH-1-11",
            )
        elif decoded.lossy:
            # Routing it would forward replacement characters in place of a patient's letters.
            problem = _Refusal(
                _unreadable_text_reason(decoded.warning),
                ErrorCode.DATA_TYPE_ERROR,
                "MSH-1-18",
            )
        elif irregular is not None:
            problem = _Refusal(
                _not_a_segment_reason(decoded.text, view, irregular), ErrorCode.SEGMENT_SEQUENCE
            )
        elif arrival.transport == "mllp" and (framing := _framing_byte(payload)) is not None:
            problem = _Refusal(framing, ErrorCode.DATA_TYPE_ERROR)
        message = NewMessage(
            raw=payload,
            transport=arrival.transport,
            listener=arrival.listener,
            peer=arrival.peer,
            status=MessageStatus.REFUSED if problem else MessageStatus.RECEIVED,
            ack_code=AckCode.ERROR.value if problem else AckCode.ACCEPT.value,
            header=header,
            charset=decoded.charset,
            detail=problem.reason if problem else decoded.warning,
            text=decoded.text,
        )
        if problem is None and header.control_id:
            message.digest = view.content_digest()

        def committed(outcome: InsertOutcome | StoreUnavailable) -> None:
            answer(self._answer(outcome, message, view, problem, arrival))

        self.writer.submit_soon(message, committed)

    def _answer(
        self,
        outcome: InsertOutcome | StoreUnavailable,
        message: NewMessage,
        view: MessageView,
        problem: _Refusal | None,
        arrival: Arrival,
    ) -> IntakeResult:
        """The ACK for a committed (or refused by the store) message, and the counts."""
        if isinstance(outcome, StoreUnavailable):
            self.counts[arrival.listener, "store_error"] += 1
            reason = (
                str(outcome)
                if isinstance(outcome, BatchStopped)
                else "message not stored: the message store is unavailable; please resend"
            )
            return self._result(
                arrival.not_stored,
                view,
                message,
                arrival,
                None,
                reason=reason,
                error_code=ErrorCode.APPLICATION_INTERNAL_ERROR,
            )
        if problem:
            self.counts[arrival.listener, "refused"] += 1
            return self._result(
                AckCode.ERROR,
                view,
                message,
                arrival,
                outcome.message_id,
                reason=problem.reason,
                error_code=problem.error_code,
                location=problem.location,
            )
        self.counts[arrival.listener, "duplicate" if outcome.duplicate else "accepted"] += 1
        if outcome.reuses is not None:
            log.info(
                "message %d reuses the sender and control ID of message %d with other content; "
                "stored as a new message",
                outcome.message_id,
                outcome.reuses,
            )
        if self.on_accepted is not None and not outcome.duplicate:
            # The order key the router makes of the stored row (routing.router.order_key):
            # an identifier without an authority is its sending facility's (NewMessage.patient).
            patient_id, authority = message.patient()
            self.on_accepted(
                outcome.message_id, patient_key(patient_id, authority, outcome.message_id)
            )
        return self._result(
            AckCode.ACCEPT, view, message, arrival, outcome.message_id, outcome.duplicate
        )

    def reject_unreadable_frame_soon(
        self, head: bytes, size: int, arrival: Arrival, reason: str, answer: Answer
    ) -> None:
        """Answer a frame that cannot be taken whole (over the size limit, or cut short).

        Only its first bytes are kept; they are stored as a rejected row so an operator can see
        what the sender tried, and the ACK echoes MSH-10 when the head holds it.
        """
        decoded = decode_message(head, arrival.default_charset)
        try:
            view: MessageView | None = MessageView(decoded.text, decoded.charset)
        except NotHL7Error:
            view = None
        detail = f"{reason} ({size} bytes received; the first {len(head)} kept)"
        self._reject(
            head,
            arrival,
            view,
            reason,
            ErrorCode.APPLICATION_INTERNAL_ERROR,
            answer,
            charset=decoded.charset,
            detail=detail,
        )

    def _reject(
        self,
        payload: bytes,
        arrival: Arrival,
        view: MessageView | None,
        reason: str,
        error_code: ErrorCode,
        answer: Answer,
        *,
        charset: str,
        detail: str | None = None,
        location: str = "",
        header: MessageHeader | None = None,
    ) -> None:
        """Store the frame as rejected and answer AR. ``header``: what can be read of it, when
        that is less than ``view`` would read (the view is then only what the ACK echoes)."""
        self.counts[arrival.listener, "rejected"] += 1
        if header is None and view is not None:
            header = MessageHeader.read(view)
        message = NewMessage(
            raw=payload,
            transport=arrival.transport,
            listener=arrival.listener,
            peer=arrival.peer,
            status=MessageStatus.REJECTED,
            ack_code=AckCode.REJECT.value,
            header=header,
            charset=charset,
            detail=detail or reason,
        )

        def committed(outcome: InsertOutcome | StoreUnavailable) -> None:
            message_id = None
            if isinstance(outcome, StoreUnavailable):
                self.counts[arrival.listener, "store_error"] += 1
            else:
                message_id = outcome.message_id
            answer(
                self._result(
                    AckCode.REJECT,
                    view,
                    message,
                    arrival,
                    message_id,
                    reason=reason,
                    error_code=error_code,
                    location=location,
                )
            )

        self.writer.submit_soon(message, committed)

    def _result(
        self,
        code: AckCode,
        view: MessageView | None,
        message: NewMessage,
        arrival: Arrival,
        message_id: int | None,
        duplicate: bool = False,
        *,
        reason: str = "",
        error_code: ErrorCode | None = None,
        location: str = "",
    ) -> IntakeResult:
        """The answer to one frame: an original-mode ACK, or on a listener that honours it and
        for a message that asks for it, the enhanced-mode accept ACK, sent as MSH-15 says, and
        the application ACK, as MSH-16 says. carehub's application is the store and the routing
        after it: its AA says the message is committed and will be routed, so both answers are
        known at the commit and go out together, the application ACK second."""
        header = message.header
        enhanced = arrival.enhanced_acks and header is not None and header.asks_enhanced_mode
        charset = message.charset or "utf-8"

        def encoded(as_accept_ack: bool) -> bytes:
            ack = build_ack(
                code,
                view,
                reason=reason,
                error_code=error_code,
                error_location=location,
                hub_application=self.hub_application,
                hub_facility=self.hub_facility,
                enhanced=as_accept_ack,
                charset_field=_ack_charset_field(view, message.charset),
            )
            return encode_reply(ack, charset, message.raw)

        ack = encoded(enhanced)
        send = True
        application_ack = None
        if enhanced and header is not None:
            send = accept_ack_wanted(header.accept_ack_type, code)
            # A message refused at commit (CE, CR) reaches no application: its accept ACK is
            # the whole answer. One whose accept ACK the sender did not want still hears its
            # outcome, as MSH-16 asks.
            processed = code is AckCode.ACCEPT or not send
            if processed and application_ack_wanted(header.application_ack_type, code):
                application_ack = encoded(False)  # an ACK of its own, with its own MSH-10
        return IntakeResult(
            code,
            ack,
            message_id,
            duplicate,
            reason or None,
            send,
            application_ack,
            charset,
        )


#: HL7 table 0103: what each MSH-11 processing ID says a message is for.
PROCESSING_ID_MEANINGS = {"P": "production", "T": "training", "D": "debugging"}


def _processing_id_reason(value: str, taken: tuple[str, ...]) -> str:
    """Why a message whose MSH-11 the listener does not take is rejected."""
    meaning = PROCESSING_ID_MEANINGS.get(value, "not an HL7 table 0103 value")
    return (
        f"MSH-11 processing ID '{value}' ({meaning}) is not taken by this listener "
        f"(processing_ids: [{', '.join(taken)}])"
    )


def _no_processing_id_reason(taken: tuple[str, ...]) -> str:
    return (
        "MSH-11 (processing ID) is empty: it must say what the message is for (P production, "
        f"T training, D debugging; this listener takes [{', '.join(taken)}])"
    )


_WIDE_ON_MLLP = (
    "UTF-16 and UTF-32 cannot be framed by MLLP (their bytes can hold the end block 1C 0D, "
    "which cuts the message short): send it as UTF-8, or over HTTP or the file drop; "
    "not accepted"
)


def _framing_byte(payload: bytes) -> str | None:
    """Why a message holding an MLLP start or end block byte is refused, or None."""
    found = [(at, byte) for byte in (0x0B, 0x1C) if (at := payload.find(byte)) >= 0]
    if not found:
        return None
    at, byte = min(found)
    name = "start block (0x0B)" if byte == 0x0B else "end block (0x1C)"
    return (
        f"byte {at} of the message is an MLLP {name}, which a message cannot hold (it could "
        "not be forwarded over MLLP); the message was stored but not accepted"
    )


def _ack_charset_field(view: MessageView | None, used: str | None) -> str | None:
    """None to echo MSH-18 in the ACK; '' to leave it out, when the message was not read in
    the character set it declares (8-bit bytes declared UTF-16, an unknown name): the ACK is
    written in what was used, and must not claim another."""
    if view is None:
        return None
    msh = view.fields(0)
    declared = msh[18].split(view.separators.repetition, 1)[0].strip() if len(msh) > 18 else ""
    if not declared:
        return None
    codec = codec_for(declared, "utf-8")
    return None if codec is not None and same_charset(codec, used or "utf-8") else ""


def _delimiters_problem(text: str) -> str | None:
    """Why MSH-1 and MSH-2 cannot be taken as the message's delimiters, or None: the field
    separator and the one to five encoding characters after it must be neither letters,
    digits nor blanks, and all different."""
    body = text.lstrip(_LEADING_BLANK)
    if body.startswith("MSH|^~\\&|"):
        return None  # nearly every message
    field = body[3]
    if field.isalnum() or field.isspace():
        shown = f"'{field}'" if field.isprintable() and field != " " else f"U+{ord(field):04X}"
        return f"MSH-1 (the field separator) is {shown}: it must not be a letter, digit or blank"
    encoding = re.split(r"[\r\n]", body[4:], maxsplit=1)[0].split(field, 1)[0]
    delimiters = field + encoding
    if (
        not encoding
        or len(encoding) > 5
        or any(c.isalnum() or c.isspace() for c in encoding)
        or len(set(delimiters)) != len(delimiters)
    ):
        return (
            f"MSH-2 (the encoding characters) is '{_excerpt(encoding)}': it must hold the "
            "component, repetition, escape and subcomponent separators, none a letter, digit "
            "or blank and all different, as in MSH|^~\\&|; the message cannot be read "
            "without them"
        )
    return None


@dataclass(slots=True, frozen=True)
class _ReadableHeader:
    """The MSH segment of a message whose MSH-2 cannot be used, read by MSH-1 alone."""

    #: The MSH segment with MSH-2 taken as ``^~\&``: what the ACK echoes and is written with.
    view: MessageView
    header: MessageHeader


def _header_by_field_separator(text: str, charset: str) -> _ReadableHeader | None:
    """What the field separator alone reads of a header whose MSH-2 is unusable but in its
    place (delimiter characters, only repeated or too many, as ``^^\\&``), so the AR can echo
    MSH-3 to MSH-6 and MSH-10 and the stored row be found by its control ID.

    Each field is kept whole, as written: with the component and escape characters unknown,
    none is split into components or unescaped (``--sender`` still finds a first component
    written with ``^``). So the message type and the patient stay unknown, and MSH-15 and
    MSH-16 are not read: the sender always gets the original-mode AR.

    None when MSH-1 is unreadable, or MSH-2 is missing or holds a letter, digit or blank (a
    missing MSH-2 puts every later field one place off), or MSH-1 is one of ``^~\\&``.
    """
    line = _LINE_END.split(text.lstrip(_LEADING_BLANK), maxsplit=1)[0]
    field_separator = line[3]
    fields = line.split(field_separator)
    written = fields[1]
    if (
        field_separator.isalnum()
        or field_separator.isspace()
        or field_separator in _DEFAULT_ENCODING
        or not written
        or any(c.isalnum() or c.isspace() for c in written)
    ):
        return None
    fields[1] = _DEFAULT_ENCODING
    view = MessageView(field_separator.join(fields), charset)
    header = MessageHeader(
        sending_application=view.msh(3),
        sending_facility=view.msh(4),
        receiving_application=view.msh(5),
        receiving_facility=view.msh(6),
        message_type="",
        trigger_event="",
        structure="",
        control_id=view.msh(10).strip(),
        processing_id=view.msh(11).strip(),
        version=view.msh(12).strip(),
        accept_ack_type="",
        application_ack_type="",
        patient=None,
    )
    return _ReadableHeader(view, header)


def _unreadable_text_reason(warning: str | None) -> str:
    """Why a message whose bytes contradict its MSH-18 is refused (see decode_message)."""
    return (
        f"{warning}: the text cannot be read without losing letters; send it in the character "
        "set MSH-18 names, or name the one it is written in; the message was stored but not "
        "accepted"
    )


def _not_hl7_reason(text: str) -> str:
    if text.lstrip(_LEADING_BLANK).startswith("MSH"):
        return (
            "the MSH segment is cut short: it must begin with MSH-1 and MSH-2 (the field "
            "separator and encoding characters, as in MSH|^~\\&|)"
        )
    reason = "not an HL7 v2 message: no MSH segment at the start of the frame"
    if text.lstrip(_LEADING_BLANK).startswith(("FHS", "BHS")):
        reason += " (it holds an FHS/BHS batch: send each of its messages in a frame of its own)"
    return reason


def _batch_header(text: str, charset: str) -> _ReadableHeader | None:
    """What answers an FHS/BHS batch sent where one message is expected, so that its sender
    can match the AR to what it sent: the sender and receiver of its FHS (else BHS), swapped
    in the ACK's MSH-3 to MSH-6; its control ID, FHS-11 (else BHS-11), in MSA-2; the
    processing ID and version of its first message. Each field is taken from the first
    header that values it. None when the text does not begin with FHS or BHS, or its
    delimiters cannot be used."""
    body = text.lstrip(_LEADING_BLANK)
    if not body.startswith(("FHS", "BHS")) or len(body) < 4:
        return None
    if _delimiters_problem("MSH" + body[3:]) is not None:
        return None
    separator = body[3]
    headers: list[list[str]] = []
    first_message: list[str] = []
    for line in _LINE_END.split(body):
        if line.startswith(("FHS" + separator, "BHS" + separator)):
            headers.append(line.split(separator))
        elif line.startswith("MSH" + separator):
            first_message = line.split(separator)
            break

    def value(fields: list[str], number: int) -> str:
        """FHS-n, BHS-n or MSH-n as written (fields[0] is the segment ID, fields[1] n=2)."""
        return fields[number - 1] if number - 1 < len(fields) else ""

    def first(number: int) -> str:
        return next((v for h in headers if (v := value(h, number)).strip()), "")

    msh = [
        "MSH",
        value(headers[0], 2),
        *(first(number) for number in (3, 4, 5, 6)),
        "",  # MSH-7
        "",  # MSH-8
        "",  # MSH-9: the ACK names no trigger event
        first(11).strip(),
        value(first_message, 11),
        value(first_message, 12),
    ]
    view = MessageView(separator.join(msh), charset)
    return _ReadableHeader(view, MessageHeader.read(view))


def _second_message(view: MessageView, start: int) -> int | None:
    """Position of the first segment from ``start`` on that begins another message."""
    segments = view.segments
    for position in range(start, len(segments)):
        if segments[position].startswith("MSH"):
            return position
    return None


def _count_messages(view: MessageView) -> int:
    return sum(1 for segment in view.segments if segment.startswith("MSH"))


def _line_number(text: str, position: int) -> int:
    """The line (1 for the first, blank lines counted, each ended by CR, LF or CRLF) of the
    text that holds the view's segment ``position``: where an editor shows it."""
    body = text.lstrip(_LEADING_BLANK)
    line = 1 + len(_LINE_END.findall(text, 0, len(text) - len(body)))
    seen = -1
    for piece in _LINE_END.split(body):
        if piece and not piece.isspace():
            seen += 1
            if seen == position:
                return line
        line += 1
    return line


def _excerpt(line: str) -> str:
    """The start of a line, printable, to quote in an ACK."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in line[:_EXCERPT])
    return shown + ("..." if len(line) > _EXCERPT else "")


def _not_a_segment_reason(text: str, view: MessageView, position: int) -> str:
    line = _line_number(text, position)
    return (
        f"line {line} is not an HL7 segment (a segment ID such as PID, then "
        f"'{view.separators.field}'): it starts '{_excerpt(view.segments[position])}'; "
        "the message was stored but not accepted"
    )


def _several_messages_reason(payload: bytes, text: str, view: MessageView, second: int) -> str:
    count = _count_messages(view)
    where = f"line {_line_number(text, second)}"
    parts = split_data(payload).messages
    if len(parts) > 1:
        where += f", byte {parts[1].offset}"
    return (
        f"the frame holds {count} HL7 messages (the second MSH segment starts at {where}); "
        "one message per frame: none of them was accepted, send each in a frame of its own"
    )
