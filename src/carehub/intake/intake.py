"""The one path every listener (MLLP, HTTP, file drop) sends received bytes down.

decode by MSH-18 -> read the header through the lazy view -> store (group commit) -> ACK.
AA only after the commit; AE when stored but the content is refused; AR when the frame is not
HL7 at all or cannot be taken (too large, cut short). Every outcome is a row in the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from carehub.hl7.ack import AckCode, ErrorCode, build_ack
from carehub.hl7.charsets import decode_message, encode_reply
from carehub.hl7.header import MessageHeader
from carehub.hl7.view import MessageView, NotHL7Error
from carehub.store.group_commit import GroupCommit, StoreUnavailable
from carehub.store.schema import MessageStatus
from carehub.store.store import InsertOutcome, NewMessage
from carehub.workqueue import patient_key

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class Arrival:
    """How a message came in: the transport, the named listener, and the peer address."""

    transport: str
    listener: str
    peer: str | None = None
    default_charset: str = "utf-8"


@dataclass(slots=True, frozen=True)
class IntakeResult:
    code: AckCode
    ack: bytes
    message_id: int | None
    duplicate: bool = False
    reason: str | None = None


#: Called with the result of one frame once it is settled (committed, or refused by the store).
Answer = Callable[[IntakeResult], None]


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
            view = MessageView(decoded.text)
        except NotHL7Error:
            self._reject(
                payload,
                arrival,
                None,
                "not an HL7 v2 message: no MSH segment at the start of the frame",
                ErrorCode.SEGMENT_SEQUENCE,
                answer,
                charset=decoded.charset,
            )
            return
        header = MessageHeader.read(view)
        problem = header.problem()
        message = NewMessage(
            raw=payload,
            transport=arrival.transport,
            listener=arrival.listener,
            peer=arrival.peer,
            status=MessageStatus.REFUSED if problem else MessageStatus.RECEIVED,
            ack_code=AckCode.ERROR.value if problem else AckCode.ACCEPT.value,
            header=header,
            charset=decoded.charset,
            detail=problem or decoded.warning,
            text=decoded.text,
        )

        def committed(outcome: InsertOutcome | StoreUnavailable) -> None:
            answer(self._answer(outcome, message, view, problem, arrival))

        self.writer.submit_soon(message, committed)

    def _answer(
        self,
        outcome: InsertOutcome | StoreUnavailable,
        message: NewMessage,
        view: MessageView,
        problem: str | None,
        arrival: Arrival,
    ) -> IntakeResult:
        """The ACK for a committed (or refused by the store) message, and the counts."""
        charset = message.charset or "utf-8"
        if isinstance(outcome, StoreUnavailable):
            self.counts[arrival.listener, "store_error"] += 1
            reason = "message not stored: the message store is unavailable; please resend"
            ack = self._ack(AckCode.ERROR, view, reason, ErrorCode.APPLICATION_INTERNAL_ERROR, "")
            return IntakeResult(
                AckCode.ERROR, self._encode(ack, charset, message.raw), None, False, reason
            )
        if problem:
            self.counts[arrival.listener, "refused"] += 1
            location = "MSH-1-10" if "MSH-10" in problem else "MSH-1-9"
            ack = self._ack(
                AckCode.ERROR, view, problem, ErrorCode.REQUIRED_FIELD_MISSING, location
            )
            return IntakeResult(
                AckCode.ERROR,
                self._encode(ack, charset, message.raw),
                outcome.message_id,
                False,
                problem,
            )
        self.counts[arrival.listener, "duplicate" if outcome.duplicate else "accepted"] += 1
        if self.on_accepted is not None and not outcome.duplicate:
            patient = message.header.patient if message.header else None
            self.on_accepted(
                outcome.message_id,
                patient_key(
                    patient.value if patient else None,
                    patient.authority if patient else None,
                    outcome.message_id,
                ),
            )
        ack = self._ack(AckCode.ACCEPT, view, "", None, "")
        return IntakeResult(
            AckCode.ACCEPT,
            self._encode(ack, charset, message.raw),
            outcome.message_id,
            outcome.duplicate,
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
            view: MessageView | None = MessageView(decoded.text)
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
    ) -> None:
        self.counts[arrival.listener, "rejected"] += 1
        header = MessageHeader.read(view) if view else None
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
            ack = self._ack(AckCode.REJECT, view, reason, error_code, "")
            answer(
                IntakeResult(
                    AckCode.REJECT, self._encode(ack, charset, payload), message_id, False, reason
                )
            )

        self.writer.submit_soon(message, committed)

    def _ack(
        self,
        code: AckCode,
        view: MessageView | None,
        reason: str,
        error_code: ErrorCode | None,
        location: str,
    ) -> str:
        return build_ack(
            code,
            view,
            reason=reason,
            error_code=error_code,
            error_location=location,
            hub_application=self.hub_application,
            hub_facility=self.hub_facility,
        )

    @staticmethod
    def _encode(ack: str, charset: str, received: bytes) -> bytes:
        """The ACK in the message's own character set (and UTF-16/32 byte order and mark)."""
        return encode_reply(ack, charset, received)
