"""The fhir-referral channel's WARNING lines name a referral by its row id (#N), never by its
key (the referral number, an identifier), and a failed send's own account, which the log and
`carehub status` show, names the Task search without its query (the referral's identifier).
A real hub sends to a real FHIR test server over HTTP; the search failing or the server
answering without a Task location are what the log is read for."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.requests import Request
from starlette.responses import Response

from carehub.cli import main
from carehub.components import ComponentContext, DeliveryError
from carehub.referrals.state import ReferralStateEnricher, list_referrals
from carehub.store.store import MessageStore
from carehub.testing import HubThread, mllp_exchange
from tests.helpers_http import wait_for
from tests.test_cli import env_without_carehub, free_port
from tests.test_fhir_referrals import FhirServer, channel_for, ref_i12, send, work_for
from tests.test_routing_e2e import FAST_RETRY, routed_config

REFERRAL_NUMBER = "RGH-R-2026-0042"
ROUTES = """
routes:
  - name: referrals
    when: {{type: REF}}
    steps:
      - translate: v2-to-event
      - enrich: {{use: referral-state}}
      - forward: {{channel: fhir-referral, name: cbo, base_url: {url}, retry: {retry}}}
"""


class TroubledFhirServer(FhirServer):
    """The FHIR test server, answering a transaction without any Task location when
    ``no_location`` is set, and a Task search with ``search_status`` when one is set."""

    def __init__(self) -> None:
        super().__init__()
        self.no_location = False
        self.search_status: int | None = None

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        answer = super().apply(raw)
        if self.no_location:
            for entry in answer["entry"]:
                entry["response"].pop("location", None)
        return answer

    async def search_tasks(self, request: Request) -> Response:
        if self.search_status is not None:
            self.gets.append(f"Task?{request.url.query}")
            return self.outcome(self.search_status, f"search failed for {request.url.query}")
        return await super().search_tasks(request)


@pytest.fixture
def fhir_server() -> Iterator[TroubledFhirServer]:
    with TroubledFhirServer() as server:
        yield server


def referral_message(trigger: str, control_id: str) -> bytes:
    text = ref_i12(control_id, ref_id=f"{REFERRAL_NUMBER}^RGH")
    return text.replace("REF^I12^REF_I12", f"REF^{trigger}^REF_I12").encode()


def warnings_of(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def hub_config(tmp_path: Path, server: FhirServer) -> Any:
    return routed_config(tmp_path, ROUTES.format(url=server.base_url, retry=FAST_RETRY % 2))


def test_a_referral_the_server_gives_no_task_location_is_named_by_its_row_id(
    tmp_path: Path, fhir_server: TroubledFhirServer, caplog: pytest.LogCaptureFixture
) -> None:
    fhir_server.no_location = True
    caplog.set_level(logging.WARNING)
    with HubThread(hub_config(tmp_path, fhir_server), tmp_path / "data") as hub:
        mllp_exchange(hub.mllp_address, [referral_message("I12", "PHI-REF-1")])
        wait_for(lambda: "not polled" in warnings_of(caplog), what="the not-polled warning")
        [referral] = list_referrals(hub.store.engine, limit=None)

    logged = warnings_of(caplog)
    assert f"referral #{referral.id} not polled" in logged
    assert REFERRAL_NUMBER not in logged and referral.referral_key not in logged


def test_a_failed_task_search_is_logged_and_shown_without_the_referrals_identifier(
    tmp_path: Path, fhir_server: TroubledFhirServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    data_dir = tmp_path / "data"
    with HubThread(hub_config(tmp_path, fhir_server), data_dir) as hub:
        mllp_exchange(hub.mllp_address, [referral_message("I12", "PHI-REF-1")])
        wait_for(lambda: fhir_server.count("Task") == 1, what="the referral's Task created")
        fhir_server.search_status = 500
        mllp_exchange(hub.mllp_address, [referral_message("I14", "PHI-REF-2")])
        wait_for(lambda: "dead letter" in warnings_of(caplog), what="the cancel a dead letter")
        result = CliRunner().invoke(
            main, ["status", "--data-dir", str(data_dir), "--json"], env=env_without_carehub()
        )
    assert result.exit_code == 0, result.output
    [cbo] = json.loads(result.output)["destinations"]

    assert any(REFERRAL_NUMBER in get for get in fhir_server.gets)  # it was searched by it
    logged = warnings_of(caplog)
    searched = f"GET {fhir_server.base_url}/Task (the referral's Task, before cancelling it)"
    assert f"{searched}: HTTP 500" in logged
    assert cbo["last_error"] == f"{searched}: HTTP 500"
    for shown in (logged, cbo["last_error"]):
        assert REFERRAL_NUMBER not in shown and "identifier=" not in shown, shown


def test_a_task_search_that_gets_no_answer_names_the_search_without_its_query(
    tmp_path: Path, fhir_server: FhirServer
) -> None:
    """The cancel's search at a server that does not answer: the error's own account (all
    the log shows) names the search, not the identifier searched for."""
    store = MessageStore(f"sqlite:///{tmp_path / 'carehub.db'}")
    store.migrate()
    try:
        context = ComponentContext(tmp_path, tmp_path, store)
        state = ReferralStateEnricher(ReferralStateEnricher.Options(), context)
        created = work_for(referral_message("I12", "PHI-REF-1").decode(), 1)
        state.enrich(created)
        cancel = work_for(referral_message("I14", "PHI-REF-2").decode(), 2)
        state.enrich(cancel)
        closed = f"http://127.0.0.1:{free_port()}/fhir"
        channel = channel_for(closed, tmp_path, store, poll=False)
        [error] = send(channel, channel.render(cancel, "carehub-2-1"))
    finally:
        store.close()

    assert isinstance(error, DeliveryError)
    assert error.loggable.startswith(f"GET {closed}/Task: ")
    assert REFERRAL_NUMBER not in error.loggable and "identifier=" not in error.loggable
