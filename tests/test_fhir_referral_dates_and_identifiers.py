"""What a referral's FHIR resources say is what the referral message said: dates as precise
as the sender gave them (a birth year stays a year, in FHIR and in the care event's JSON), no
period that ends before it starts, and a placer identifier whose id may hold an escaped bar.
Sent to the real FHIR test server of test_fhir_referrals (it validates with fhir.resources
R4B) through the real referral-state step and fhir-referral channel."""

from __future__ import annotations

import copy
import json
import re
import urllib.parse
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from carehub.events import CareEvent
from carehub.reference import care_event_schema
from carehub.store.store import MessageStore
from tests import test_fhir_referrals as fhir_tests
from tests.test_fhir_referrals import FhirServer, channel_for, ref_i12, send, work_for
from tests.test_referral_updates import Referrals

# Fixtures: a migrated SQLite store.
store = fhir_tests.store

RF1_DATES = "|R-1^RGH|20261127|20261227|"


def identifier_token(query: str) -> tuple[str, str]:
    """(system, value) of ``identifier=system|value`` as FHIR search reads it
    (search.html#escaping): the first bar not after a backslash ends the system, and ``\\|``,
    ``\\,``, ``\\$``, ``\\\\`` stand for the character itself."""
    name, _, token = urllib.parse.unquote(query).partition("=")
    assert name == "identifier", f"unsupported search {query}"
    system, value = re.split(r"(?<!\\)\|", token, maxsplit=1)
    return re.sub(r"\\(.)", r"\1", system), re.sub(r"\\(.)", r"\1", value)


class TokenSearchingFhirServer(FhirServer):
    """The FHIR test server, reading identifier searches with FHIR's escapes."""

    def check(self, raw: dict[str, Any]) -> bool:
        """The test server's checks, on the Bundle with its conditions' escapes undone: they
        compare a condition's text with the identifier of the resource it creates."""
        plain = copy.deepcopy(raw)
        for entry in plain.get("entry") or []:
            request = entry.get("request") or {}
            if "ifNoneExist" in request:
                system, value = identifier_token(request["ifNoneExist"])
                request["ifNoneExist"] = f"identifier={system}|{value}"
        return super().check(plain)

    def search(self, kind: str, query: str) -> list[str]:
        system, value = identifier_token(query)
        return [
            ref
            for ref, resource in self.resources.items()
            if ref.startswith(kind + "/")
            and any(
                (i.get("system"), i.get("value")) == (system, value)
                for i in resource.get("identifier") or []
            )
        ]


@pytest.fixture
def fhir_server() -> Any:
    with TokenSearchingFhirServer() as server:
        yield server


def created(server: FhirServer, kind: str) -> dict[str, Any]:
    (found,) = [r for ref, r in server.resources.items() if ref.startswith(kind + "/")]
    return found


def deliver(server: FhirServer, tmp_path: Path, text: str) -> str:
    """The referral rendered and sent to the server as a new referral; the receipt."""
    channel = channel_for(server.base_url, tmp_path)
    (receipt,) = send(channel, channel.render(work_for(text), "carehub-1-1-abc"))
    assert server.problems == []
    assert isinstance(receipt, str), receipt
    return receipt


# -- dates as precise as the sender gave them ----------------------------------------------------


@pytest.mark.parametrize(("pid_7", "birth_date"), [("1958", "1958"), ("195803", "1958-03")])
def test_a_birth_year_or_month_reaches_the_server_as_sent(
    fhir_server: FhirServer, tmp_path: Path, pid_7: str, birth_date: str
) -> None:
    text = ref_i12().replace("|19580312|", f"|{pid_7}|")
    deliver(fhir_server, tmp_path, text)
    assert created(fhir_server, "Patient")["birthDate"] == birth_date


@pytest.mark.parametrize(
    ("msh_7", "authored_on"),
    [
        ("2026-0500", "2026"),
        ("202611-0500", "2026-11"),
        ("20261127-0500", "2026-11-27"),
        ("202611271200-0500", "2026-11-27T12:00:00-05:00"),
    ],
)
def test_authored_on_is_as_precise_as_the_message_time(
    fhir_server: FhirServer, tmp_path: Path, msh_7: str, authored_on: str
) -> None:
    text = ref_i12().replace("|20261127120000-0500|", f"|{msh_7}|")
    deliver(fhir_server, tmp_path, text)
    assert created(fhir_server, "ServiceRequest")["authoredOn"] == authored_on
    assert created(fhir_server, "Task")["authoredOn"] == authored_on


def test_referral_dates_of_a_month_reach_the_server_as_a_month(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    """An effective month and an expiration day in it: not a period that ends before it
    starts, at the precision both have."""
    text = ref_i12().replace(RF1_DATES, "|R-1^RGH|202612|20261205|")
    deliver(fhir_server, tmp_path, text)
    period = created(fhir_server, "ServiceRequest")["occurrencePeriod"]
    assert period == {"start": "2026-12", "end": "2026-12-05"}


def test_the_care_event_keeps_the_precision_and_still_gives_a_date() -> None:
    """The event's JSON (webhooks, files, the stored snapshots) says ``1958``, matches the
    published schema and reloads as the same event; in Python the birth date is still a date
    (the first day it covers), for ages and sorting."""
    text = ref_i12().replace("|19580312|", "|1958|").replace(RF1_DATES, "|R-1^RGH|202612||")
    event = work_for(text).event
    assert isinstance(event, CareEvent) and event.patient is not None
    assert event.patient.birth_date == date(1958, 1, 1)

    dumped = json.loads(event.model_dump_json())
    assert dumped["patient"]["birth_date"] == "1958"
    assert dumped["referral"]["effective_date"] == "2026-12"
    schema = care_event_schema()["$defs"]["Patient"]["properties"]["birth_date"]["anyOf"][0]
    assert re.fullmatch(schema["pattern"], dumped["patient"]["birth_date"])
    again = CareEvent.model_validate(dumped)
    assert again.model_dump() == event.model_dump()  # all but the store's key (never sent)
    assert json.loads(again.model_dump_json()) == dumped
    full = json.loads(work_for(ref_i12()).event.model_dump_json())  # type: ignore[union-attr]
    assert full["patient"]["birth_date"] == "1958-03-12"


# -- a period that ends before it starts ------------------------------------------------------

INVERTED = "|R-1^RGH|20261227|20261127|"
LEFT_OUT = (
    "occurrencePeriod left out: the effective date (RF1-7, 2026-12-27) is after the "
    "expiration date (RF1-8, 2026-11-27)"
)


def test_a_period_ending_before_it_starts_is_left_out_and_the_delivery_says_so(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    """FHIR's rule per-1 (start not after end): a validating server would refuse the whole
    referral. It still reaches the organisation, without the dates that contradict each
    other, and its delivery records why."""
    channel = channel_for(fhir_server.base_url, tmp_path)
    outgoing = channel.render(work_for(ref_i12().replace(RF1_DATES, INVERTED)), "k1")
    assert outgoing.metadata["left_out"] == LEFT_OUT

    (receipt,) = send(channel, outgoing)
    assert receipt == f"HTTP 200 Task/103 ({LEFT_OUT})"
    assert fhir_server.problems == []
    assert "occurrencePeriod" not in created(fhir_server, "ServiceRequest")


def test_a_modify_with_a_period_ending_before_it_starts_keeps_the_period_sent_before(
    fhir_server: FhirServer, tmp_path: Path, store: MessageStore
) -> None:
    referrals = Referrals(tmp_path, store, fhir_server)
    assert referrals.deliver(ref_i12("RGH-REF-1")) == "HTTP 200 Task/103"
    modify = ref_i12("RGH-REF-2").replace("REF^I12^REF_I12", "REF^I13^REF_I12")
    modify = modify.replace(RF1_DATES, INVERTED).replace("A^ASAP^HL70280", "S^STAT^HL70280")

    assert referrals.deliver(modify) == f"HTTP 200 Task/103 modified ({LEFT_OUT})"
    request = created(fhir_server, "ServiceRequest")
    assert request["priority"] == "stat"
    assert request["occurrencePeriod"] == {"start": "2026-11-27", "end": "2026-12-27"}


# -- the placer identifier ---------------------------------------------------------------------


def test_an_escaped_bar_in_the_referral_id_stays_in_the_placer_identifier(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    text = ref_i12().replace("|R-1^RGH|", "|R\\F\\7^RGH|")
    channel = channel_for(fhir_server.base_url, tmp_path)
    outgoing = channel.render(work_for(text), "carehub-1-1-abc")
    assert send(channel, outgoing, outgoing) == ["HTTP 200 Task/103", "HTTP 200 Task/103"]

    assert fhir_server.problems == []
    placer = {"system": "urn:carehub:id:RGH", "value": "R|7"}
    for kind in ("ServiceRequest", "Task"):
        (identifier,) = created(fhir_server, kind)["identifier"]
        assert {k: identifier[k] for k in placer} == placer
    # The resend found the referral by that identifier instead of creating a second one.
    assert (fhir_server.count("ServiceRequest"), fhir_server.count("Task")) == (1, 1)


def test_a_bar_in_a_referral_id_without_an_authority_stays_in_its_value(
    fhir_server: FhirServer, tmp_path: Path
) -> None:
    """Without an authority in RF1-6 the sending facility is the referral's authority."""
    deliver(fhir_server, tmp_path, ref_i12(ref_id="R\\F\\7"))
    (identifier,) = created(fhir_server, "ServiceRequest")["identifier"]
    assert (identifier["system"], identifier["value"]) == ("urn:carehub:id:RIVERSIDE_GH", "R|7")
