"""An asyncio MLLP client: send a message, wait for the frame that answers it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from carehub.hl7.framing import Frame, FrameDecoder, encode_frame


class NoAnswer(ConnectionError):
    """The peer closed the connection or did not answer in time."""


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
        """Send one message and return the payload of the next frame the peer sends back."""
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._writer.write(encode_frame(payload))
        await self._writer.drain()
        return await self.receive()

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
