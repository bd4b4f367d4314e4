"""Answers compressed because carehub asked for it: every HTTP channel sends Accept-Encoding
gzip (aiohttp's default), and servers such as HAPI FHIR then gzip what they answer. The
webhook, SMS, FHIR referral and FHIR notification channels must read those answers decoded,
and read no more of one than a bounded amount however far it unpacks. Real servers (uvicorn,
Starlette's GZipMiddleware) on loopback; the notifications run through a real hub."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from carehub.builtins.channels import WebhookChannel
from carehub.builtins.messaging import SmsChannel
from carehub.components import DeliveryError
from carehub.store.store import MessageStore
from carehub.testing import make_adt
from tests import test_fhir_referrals as fhir_tests
from tests.helpers_channels import build, outcome, run_with, work_for
from tests.helpers_http import HTTPServer
from tests.test_fhir_notifications import NotificationEndpoint, response_message, routes, run
from tests.test_fhir_referrals import FhirServer, Served, ref_i12
from tests.test_messaging import notification
from tests.test_referral_updates import Referrals, ref_message

store = fhir_tests.store  # a migrated SQLite store


def gzipping(served: Served) -> None:
    """Have a server that has not started yet gzip every answer whose request's
    Accept-Encoding lists gzip, as HAPI FHIR's RestfulServer does."""
    config = served._server.config
    config.app = GZipMiddleware(config.app, minimum_size=0)


@pytest.fixture
def gzip_fhir_server() -> Iterator[FhirServer]:
    server = FhirServer()
    gzipping(server.served)
    with server:
        yield server


@pytest.fixture
def gzip_endpoint() -> Iterator[NotificationEndpoint]:
    endpoint = NotificationEndpoint()
    gzipping(endpoint.served)
    with endpoint:
        yield endpoint


# -- webhook and SMS ---------------------------------------------------------------------------


def test_a_webhook_refusal_sent_gzipped_is_read_as_the_receivers_words(tmp_path: Path) -> None:
    with HTTPServer(lambda _: 400, gzip=True) as server:
        channel = build(WebhookChannel, tmp_path, url=server.url("/hook"))
        error = run_with(
            channel, lambda: outcome(channel, channel.render(work_for(make_adt("GZ1")), "k1"))
        )
        (request,) = server.requests
    assert "gzip" in request.headers["accept-encoding"]
    assert isinstance(error, DeliveryError) and not error.retryable
    assert error.said == "test server says 400"


def test_an_sms_gateway_refusal_sent_gzipped_is_read_as_the_gateways_words(
    tmp_path: Path,
) -> None:
    with HTTPServer(lambda _: 503, gzip=True) as server:
        channel = build(SmsChannel, tmp_path, url=server.url("/sms"))
        error = run_with(channel, lambda: outcome(channel, notification(to="+15550100")))
        (request,) = server.requests
    assert "gzip" in request.headers["accept-encoding"]
    assert isinstance(error, DeliveryError) and error.retryable
    assert error.said == "test server says 503"


# -- FHIR referrals ----------------------------------------------------------------------------


def test_a_referral_answered_gzipped_is_tracked_and_its_cancel_reaches_the_task(
    tmp_path: Path, store: MessageStore, gzip_fhir_server: FhirServer
) -> None:
    """The transaction-response names the Task (so it is polled) and the search before the
    cancel finds it (so the cancel is sent, not retried until it is a dead letter)."""
    referrals = Referrals(tmp_path, store, gzip_fhir_server)
    assert referrals.deliver(ref_i12("RGH-REF-1")) == "HTTP 200 Task/103"
    assert list(referrals.channel.tasks.all()) == ["103"]
    assert referrals.deliver(ref_message("I14", "RGH-REF-3")) == "HTTP 200 Task/103 cancelled"
    assert gzip_fhir_server.resources["Task/103"]["status"] == "cancelled"
    assert all("gzip" in h["accept-encoding"] for h in gzip_fhir_server.headers)


def test_a_referral_refusal_sent_gzipped_keeps_the_servers_words(
    tmp_path: Path, gzip_fhir_server: FhirServer
) -> None:
    gzip_fhir_server.fail_with = 400
    channel = fhir_tests.channel_for(gzip_fhir_server.base_url, tmp_path)
    (error,) = fhir_tests.send(channel, channel.render(fhir_tests.work_for(ref_i12()), "k-1"))
    assert isinstance(error, DeliveryError) and not error.retryable
    assert "HTTP 400" in str(error) and "test server says 400" in str(error)


# -- FHIR notifications ------------------------------------------------------------------------


def _outcome(severity: str, text: str) -> dict[str, Any]:
    issue = {"severity": severity, "code": "invalid", "diagnostics": text}
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def test_a_notification_refused_in_a_gzipped_answer_is_a_dead_letter_saying_why(
    tmp_path: Path, gzip_endpoint: NotificationEndpoint
) -> None:
    """A 200 whose response message says fatal-error is a refusal whether or not it came
    compressed; a 400's OperationOutcome is stored as its words."""
    fatal = response_message("fatal-error", _outcome("fatal", "Encounter class not accepted"))
    gzip_endpoint.answers = [
        (200, fatal, {}),
        (400, _outcome("error", "Encounter.class: code XYZ not in the value set"), {}),
    ]
    texts = [make_adt(f"GZ-{i}", "A01", patient_id=f"P-GZ{i}") for i in range(2)]
    deliveries = run(tmp_path, routes(gzip_endpoint.base_url), texts)
    assert [(d.status, d.attempts) for d in deliveries] == [("dead", 1), ("dead", 1)], [
        d.last_error for d in deliveries
    ]
    first, second = (d.last_error or "" for d in deliveries)
    assert "fatal-error" in first and "Encounter class not accepted" in first
    assert "HTTP 400" in second and "code XYZ not in the value set" in second


# -- how much of an answer is read -------------------------------------------------------------

#: What the bomb unpacks to: 64 MiB of zeros, sent as about 64 KiB of gzip.
BOMB_SIZE = 64 * 1024 * 1024


def _gzip_of_zeros(size: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    zeros = bytes(1024 * 1024)
    return b"".join(packer.compress(zeros) for _ in range(size // len(zeros))) + packer.flush()


def test_an_answer_that_unpacks_to_far_more_is_read_only_up_to_the_bound(
    tmp_path: Path,
) -> None:
    bomb = _gzip_of_zeros(BOMB_SIZE)

    async def answer(request: Request) -> Response:
        if "gzip" not in request.headers.get("accept-encoding", ""):
            return Response(bytes(BOMB_SIZE))
        return Response(bomb, headers={"Content-Encoding": "gzip"})

    with Served(Starlette(routes=[Route("/fhir", answer, methods=["GET"])])) as server:
        channel = build(WebhookChannel, tmp_path, url=server.url("/fhir"))

        async def read() -> bytes:
            async with channel.request("GET", server.url("/fhir"), b"", {}) as response:
                return await response.aread()

        body = run_with(channel, read)
    assert body and body.count(0) == len(body)  # decoded: zeros, not gzip
    from carehub.builtins.http_channel import MAX_ANSWER_BYTES

    assert len(body) == MAX_ANSWER_BYTES < BOMB_SIZE  # and no further than the bound
