"""A fast HTTP/1.1 webhook receiver for the routing benchmark: counts what carehub delivers.

Run as `python bench/webhook_sink.py --port 0`: it binds, prints `PORT <n>` (flushed) and serves
until SIGTERM, then exits 0. It runs in its own process and parses HTTP by hand on a bare asyncio
Protocol (request line, headers, Content-Length body, keep-alive, pipelining), so one core
answers tens of thousands of requests a second and the sink is never what the bench measures.

    POST <any path>  a delivery: counted, its Idempotency-Key and the body's "control_id" noted;
                     answered `200 OK` with an empty body
    GET /stats       {"requests", "distinct_keys", "duplicates", "distinct_control_ids",
                      "missing_key", "bad_requests"} as JSON
    GET /ids         every distinct key and control id seen, as JSON lists (for the final check)

A request whose Idempotency-Key was seen before counts as a duplicate (carehub resent it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys

HEADER_END = b"\r\n\r\n"
MAX_HEADER_BYTES = 64 * 1024
CONTROL_ID_MARK = b'"control_id":"'  # carehub writes compact JSON: no space after the colon

OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
OK_EMPTY_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Tally:
    """What the sink has received so far."""

    def __init__(self) -> None:
        self.requests = 0
        self.duplicates = 0
        self.missing_key = 0
        self.bad_requests = 0
        self.keys: set[str] = set()
        self.control_ids: set[str] = set()

    def delivery(self, key: str | None, body: bytes) -> None:
        self.requests += 1
        if key is None:
            self.missing_key += 1
        elif key in self.keys:
            self.duplicates += 1
        else:
            self.keys.add(key)
        start = body.find(CONTROL_ID_MARK)
        if start >= 0:
            start += len(CONTROL_ID_MARK)
            end = body.find(b'"', start)
            if end > start:
                self.control_ids.add(body[start:end].decode("utf-8", "replace"))

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "distinct_keys": len(self.keys),
            "duplicates": self.duplicates,
            "distinct_control_ids": len(self.control_ids),
            "missing_key": self.missing_key,
            "bad_requests": self.bad_requests,
        }

    def ids(self) -> dict[str, list[str]]:
        return {"keys": sorted(self.keys), "control_ids": sorted(self.control_ids)}


class HTTPConnection(asyncio.Protocol):
    """One client connection: parse requests as they complete, answer each in order."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            if not self._handle_one():
                break

    def _handle_one(self) -> bool:
        """Answer the first complete request in the buffer; False if there is none yet."""
        assert self.transport is not None
        head_end = self.buffer.find(HEADER_END)
        if head_end < 0:
            if len(self.buffer) > MAX_HEADER_BYTES:
                self._fail(b"431 Request Header Fields Too Large")
            return False
        lines = bytes(self.buffer[:head_end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(b"400 Bad Request")
            return False
        method, path, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(b"400 Bad Request")
                return False
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail(b"411 Length Required")  # carehub (httpx) always sends Content-Length
            return False
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(b"400 Bad Request")
            return False
        body_start = head_end + len(HEADER_END)
        if len(self.buffer) < body_start + length:
            return False
        body = bytes(self.buffer[body_start : body_start + length])
        del self.buffer[: body_start + length]

        connection = headers.get("connection", "").lower()
        close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        if method == "POST":
            self.tally.delivery(headers.get("idempotency-key"), body)
            self.transport.write(OK_EMPTY_CLOSE if close else OK_EMPTY)
        elif method == "GET" and path == "/stats":
            self._json(self.tally.stats(), close)
        elif method == "GET" and path == "/ids":
            self._json(self.tally.ids(), close)
        else:
            self._reply(b"404 Not Found", b"", close)
        if close:
            self.transport.close()
        return True

    def _json(self, value: object, close: bool) -> None:
        self._reply(b"200 OK", json.dumps(value).encode(), close, b"application/json")

    def _reply(
        self, status: bytes, body: bytes, close: bool, content_type: bytes = b"text/plain"
    ) -> None:
        assert self.transport is not None
        head = [
            b"HTTP/1.1 " + status,
            b"Content-Type: " + content_type,
            b"Content-Length: " + str(len(body)).encode(),
        ]
        if close:
            head.append(b"Connection: close")
        self.transport.write(b"\r\n".join(head) + HEADER_END + body)

    def _fail(self, status: bytes) -> None:
        self.tally.bad_requests += 1
        self._reply(status, b"", close=True)
        self.buffer.clear()
        assert self.transport is not None
        self.transport.close()


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then close the listener and return (exit code 0)."""
    tally = Tally()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await loop.create_server(lambda: HTTPConnection(tally), host, port, backlog=1024)
    async with server:
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP/1.1 webhook sink for the routing bench")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
