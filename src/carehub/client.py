"""An asyncio MLLP client: send a message, wait for the frame that answers it.

A message whose MSH-16 asks for an application acknowledgment is answered, by a receiver in
enhanced mode, with an accept ACK (CA/CE/CR, when MSH-15 asks for one) and then the
application ACK (AA/AE/AR) on the same connection: ``send`` waits for both and returns the
application ACK, so that the next message's answer is not taken for this one's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from carehub.hl7.ack import AckCode, application_ack_wanted
from carehub.hl7.charsets import decode_message
from carehub.hl7.framing import Frame, FrameDecoder, encode_frame
from carehub.hl7.view import MessageView, NotHL7Error

#: The outcome each accept acknowledgment code reports, in application-ACK terms.
_OUTCOME_OF_ACCEPT = {"CA": "AA", "CE": "AE", "CR": "AR"}


class NoAnswer(ConnectionError):
    """The peer closed the connection or did not answer in time."""


class NoApplicationAck(NoAnswer):
    """The accept ACK came (CA: the receiver has committed the message), but not the
    application ACK its MSH-16 asks for, in time: the message is the receiver's, its outcome
    is not known. ``accept`` is the accept ACK. The connection is out of step (the
    application ACK may still come) and should be closed."""

    def __init__(self, message: str, accept: bytes) -> None:
        super().__init__(message)
        self.accept = accept


class MLLPClient:
    """One persistent connection; ``send`` is request/response (one frame out, one frame back)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 30.0,
        max_answer_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.timeout = timeout
        self._decoder = FrameDecoder(max_answer_bytes)
        self._answers: list[bytes] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        kwargs = {}
        if self.ssl_context is not None:
            kwargs["server_hostname"] = self.server_hostname or self.host
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl_context, **kwargs),
            self.timeout,
        )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = None

    async def __aenter__(self) -> MLLPClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, payload: bytes) -> bytes:
        """Send one message and return its answer: the next frame the peer sends back, or,
        when that is an accept ACK and the message's MSH-16 asks for an application ACK of
        the outcome it reports, the frame after it (the application ACK)."""
        answers = await self.exchange(payload)
        return answers[-1]

    async def exchange(self, payload: bytes) -> list[bytes]:
        """Send one message and return every frame that answers it, in order: one, or an
        accept ACK and the application ACK after it (see ``send``)."""
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._writer.write(encode_frame(payload))
        await self._writer.drain()
        first = await self.receive()
        # A message refused at commit (CE, CR) reaches no application: no application ACK
        # follows its accept ACK.
        if _accept_code(first) != "CA" or not _application_ack_asked(payload, "CA"):
            return [first]
        try:
            return [first, await self.receive()]
        except NoAnswer as err:
            raise NoApplicationAck(
                f"{err}: the accept ACK (CA) came, but not the application ACK the message's "
                "MSH-16 asks for",
                first,
            ) from err

    async def receive(self) -> bytes:
        """The next answer frame (answers that arrived together are handed out in order)."""
        assert self._reader is not None
        while not self._answers:
            try:
                data = await asyncio.wait_for(self._reader.read(65536), self.timeout)
            except TimeoutError as err:
                raise NoAnswer(
                    f"no answer from {self.host}:{self.port} in {self.timeout:g} s"
                ) from err
            if not data:
                raise NoAnswer(f"{self.host}:{self.port} closed the connection without answering")
            for event in self._decoder.feed(data):
                if isinstance(event, Frame):
                    self._answers.append(event.payload)
        return self._answers.pop(0)


def _accept_code(answer: bytes) -> str | None:
    """MSA-1 of an answer when it is an accept acknowledgment (CA, CE or CR), else None."""
    try:
        view = MessageView(answer.decode("latin-1"))
    except NotHL7Error:
        return None
    code = view.get("MSA-1").strip().upper()
    return code if code in _OUTCOME_OF_ACCEPT else None


def _application_ack_asked(payload: bytes, accept_code: str) -> bool:
    """Whether the message's MSH-16 asks for an application ACK of the outcome its accept ACK
    reports, as carehub's own listener decides it (ack.application_ack_wanted)."""
    try:
        view = MessageView(decode_message(payload).text)
    except NotHL7Error:
        return False
    outcome = AckCode(_OUTCOME_OF_ACCEPT[accept_code])
    return application_ack_wanted(view.get("MSH-16"), outcome)
