"""An HTTP destination answering 501 Not Implemented or 505 HTTP Version Not Supported will
answer the same to every retry: the delivery is refused for good at once (a dead letter for
someone to act on), not retried until the attempts run out. Other 5xx are still retried. Real
HTTP servers: the webhook test server of test_channels and the FHIR test server."""

from __future__ import annotations

from pathlib import Path

import pytest

from carehub.builtins.channels import WebhookChannel
from carehub.components import DeliveryError
from carehub.testing import make_adt
from tests import test_channels as channel_tests
from tests import test_fhir_referrals as fhir_tests
from tests.helpers_channels import build
from tests.helpers_channels import work_for as adt_work_for
from tests.test_channels import WebhookServer, post
from tests.test_fhir_referrals import FhirServer, channel_for, ref_i12, send, work_for

# Fixtures: the webhook test server (/status/<code> answers that code); the FHIR test server.
webhook_server, http = channel_tests.webhook_server, channel_tests.http
fhir_server = fhir_tests.fhir_server


@pytest.mark.parametrize(("status", "retryable"), [(501, False), (505, False), (502, True)])
def test_webhook_not_implemented_is_refused_for_good(
    tmp_path: Path, http: WebhookServer, status: int, retryable: bool
) -> None:
    channel = build(WebhookChannel, tmp_path, url=http.url(f"/status/{status}"))
    error = post(channel, channel.render(adt_work_for(make_adt("WH501")), "k"))
    assert isinstance(error, DeliveryError)
    assert f"HTTP {status}" in error.message
    assert error.retryable is retryable


@pytest.mark.parametrize(("status", "retryable"), [(501, False), (505, False), (500, True)])
def test_fhir_server_not_implementing_the_transaction_is_refused_for_good(
    fhir_server: FhirServer, tmp_path: Path, status: int, retryable: bool
) -> None:
    channel = channel_for(fhir_server.base_url, tmp_path)
    fhir_server.fail_with = status
    (error,) = send(channel, channel.render(work_for(ref_i12()), "carehub-1-1-abc"))
    assert isinstance(error, DeliveryError)
    assert f"HTTP {status}: test server says {status}" in str(error)
    assert error.retryable is retryable
