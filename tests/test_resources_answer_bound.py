"""An HSDS API directory reads an answer no further than the FHIR clients do (MAX_ANSWER_BYTES,
decompressed): an answer too large, or a gzip one that unpacks to far more, is refused naming
the directory's address (credentials masked) and the bound, and the last good directory is
kept. A real uvicorn server on loopback sends every answer."""

from __future__ import annotations

import json
import logging
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from carehub.builtins.http_channel import MAX_ANSWER_BYTES
from carehub.resources.hsds import ApiDirectory, DirectoryError
from tests.test_fhir_referrals import Served

SAMPLE = Path(__file__).resolve().parents[1] / "config" / "resources" / "directory.json"
#: What the oversize and the bomb answers unpack to: valid JSON (an empty list padded with
#: spaces), so reading them whole would "succeed" with an empty directory.
HUGE = 64 * 1024 * 1024
CHUNK = 64 * 1024
SECRET = "s3cr3t-pw"


def _padded_json_gzipped(size: int) -> bytes:
    """``[`` + spaces + ``]`` of ``size`` bytes as gzip: about a thousandth of the size."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    spaces = b" " * (1024 * 1024)
    parts = [packer.compress(b"[")]
    parts += [packer.compress(spaces) for _ in range(size // len(spaces))]
    return b"".join([*parts, packer.compress(b"]"), packer.flush()])


class Directory:
    """An HSDS API whose ``/services`` answers as ``mode`` says: ``good`` (the sample export as
    one page), ``endless`` (HUGE bytes streamed without a Content-Length), ``large`` (HUGE
    bytes with one) or ``bomb`` (gzip unpacking to HUGE bytes). With ``gzip`` every answer is
    gzipped when the request asks for it, as most web servers do."""

    def __init__(self, *, gzip: bool = False) -> None:
        self.mode = "good"
        self.requests = 0
        self.accept_encoding = ""
        self.services: list[dict[str, Any]] = json.loads(SAMPLE.read_text(encoding="utf-8"))
        self.bomb = _padded_json_gzipped(HUGE)
        app: Any = Starlette(routes=[Route("/services", self.answer)])
        self.served = Served(GZipMiddleware(app, minimum_size=0) if gzip else app)

    async def answer(self, request: Request) -> Response:
        self.requests += 1
        self.accept_encoding = request.headers.get("accept-encoding", "")
        if self.mode == "good":
            page = {"total_pages": 1, "page_number": 1, "contents": self.services}
            return JSONResponse(page)
        if self.mode == "bomb":
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
            return Response(self.bomb, headers=headers)

        async def spaces() -> AsyncIterator[bytes]:
            """HUGE bytes a chunk at a time (the server, in this process, holds no more), until
            the client hangs up."""
            yield b"["
            for _ in range(HUGE // CHUNK - 1):
                if await request.is_disconnected():
                    return
                yield b" " * CHUNK
            yield b" " * (CHUNK - 2) + b"]"

        length = {"Content-Length": str(HUGE)} if self.mode == "large" else None
        return StreamingResponse(spaces(), headers=length, media_type="application/json")

    @property
    def url(self) -> str:
        """The API's base URL, with credentials (basic auth) that must never be shown."""
        return f"http://carehub:{SECRET}@127.0.0.1:{self.served.port}"

    def __enter__(self) -> Directory:
        self.served.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.served.__exit__(*exc)


@pytest.fixture
def hsds() -> Iterator[Directory]:
    with Directory() as directory:
        yield directory


def _refused(directory: ApiDirectory) -> tuple[DirectoryError, int]:
    """The error services() raises, and the most memory (bytes) Python held meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(DirectoryError) as caught:
            directory.services()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return caught.value, peak


def _says_where_and_how_much(error: DirectoryError, port: int) -> None:
    text = str(error)
    assert text.startswith(f"http://carehub:***@127.0.0.1:{port}/services: "), text
    assert "larger than 10 MiB" in text, text
    assert SECRET not in text and "page=" not in text  # no password, no query


@pytest.mark.parametrize("mode", ["endless", "large"])
def test_a_directory_answer_larger_than_the_bound_is_refused_without_reading_it_whole(
    hsds: Directory, mode: str
) -> None:
    hsds.mode = mode
    directory = ApiDirectory(hsds.url, cache_seconds=0)
    try:
        error, peak = _refused(directory)
    finally:
        directory.close()
    _says_where_and_how_much(error, hsds.served.port)
    assert peak < 3 * MAX_ANSWER_BYTES < HUGE, f"{peak / 2**20:.0f} MiB held"


def test_a_gzip_bomb_from_the_directory_is_unpacked_no_further_than_the_bound(
    hsds: Directory,
) -> None:
    assert len(hsds.bomb) < 1024 * 1024  # 64 MiB of JSON sent as well under 1 MiB
    hsds.mode = "bomb"
    directory = ApiDirectory(hsds.url, cache_seconds=0)
    try:
        error, peak = _refused(directory)
    finally:
        directory.close()
    _says_where_and_how_much(error, hsds.served.port)
    assert peak < 3 * MAX_ANSWER_BYTES < HUGE, f"{peak / 2**20:.0f} MiB held"


def test_the_last_good_directory_is_kept_when_an_answer_is_too_large(
    hsds: Directory, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning names the address and the bound; the server is asked again only after
    another cache_seconds, not by every message meanwhile."""
    now = [1000.0]
    directory = ApiDirectory(hsds.url, cache_seconds=60, clock=lambda: now[0])
    try:
        good = directory.services()
        assert len(good) == len(hsds.services) > 0
        hsds.mode = "bomb"
        now[0] += 61
        with caplog.at_level(logging.WARNING, logger="carehub.resources.hsds"):
            assert directory.services() == good
        (warning,) = [r.getMessage() for r in caplog.records]
        assert f"127.0.0.1:{hsds.served.port}/services" in warning, warning
        assert "larger than 10 MiB" in warning and "keeping the last good answer" in warning
        assert SECRET not in warning
        asked = hsds.requests
        now[0] += 59
        assert directory.services() == good and hsds.requests == asked
        hsds.mode = "good"
        now[0] += 2
        assert len(directory.services()) == len(good) and hsds.requests == asked + 1
    finally:
        directory.close()


def test_a_directory_answer_gzipped_as_asked_is_read() -> None:
    with Directory(gzip=True) as hsds:
        directory = ApiDirectory(hsds.url, cache_seconds=0)
        try:
            services = directory.services()
        finally:
            directory.close()
    # Only what the bounded reader unpacks is asked for (never br or zstd, which httpx adds
    # when their packages are installed).
    assert hsds.accept_encoding == "gzip, deflate"
    assert [s.id for s in services] == [s["id"] for s in hsds.services]
