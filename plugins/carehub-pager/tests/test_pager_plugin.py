"""carehub-pager through carehub itself: routes dry-run with carehub.testing, pages sent to a
real local HTTP gateway, and a running hub that pages, retries and counts failures."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from carehub.cli import main
from carehub.components import DeliveryError, Outgoing
from carehub.errors import ConfigError
from carehub.routing.router import RoutingResult
from carehub.testing import (
    HubThread,
    bind_channel,
    local_config,
    make_adt,
    mllp_exchange,
    run_routes,
    run_routes_async,
)
from click.testing import CliRunner

from carehub_pager.plugin import STATS, PagerChannel, load_schedule, page_text

if TYPE_CHECKING:
    from conftest import PageGateway

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "config" / "carehub.yaml"
ADMIT = HERE / "messages" / "admit-ward.hl7"
DESTINATION = "admissions-page/on-call-pager"
#: What the admit message says about the patient; none of it may reach a page.
PATIENT_DETAILS = ("TESTPATIENT", "ALEX", "P0001", "19700101", "V0001", "1234567890")


def on_unit(unit: str, control_id: str = "MSG00001", **kwargs: Any) -> str:
    """make_adt's message with the patient on another unit (PV1-3.1)."""
    return make_adt(control_id, location=f"{unit}^12^B", **kwargs)


def page_of(result: RoutingResult) -> dict[str, Any]:
    (delivery,) = result.deliveries
    assert delivery.channel == "pager"
    page: dict[str, Any] = json.loads(delivery.outgoing.payload)
    return page


# -- dry runs ---------------------------------------------------------------------------------
def test_route_pages_the_unit_on_call_with_no_patient_details(tmp_path: Path) -> None:
    result = run_routes(ADMIT, CONFIG, tmp_path)

    (route,) = result.matched
    assert route.route == "admissions-page" and route.error is None
    assert [s.step for s in route.steps] == [
        "translate v2-to-event",
        "enrich on-call",
        f"forward pager {DESTINATION}",
    ]
    assert route.steps[1].output == {"unit": "WARD", "on_call": "Dr. Robin Okafor"}
    assert page_of(result) == {
        "to": "5550101",
        "text": f"carehub: admission - unit WARD - msg {result.message_id}",
    }
    (delivery,) = result.deliveries
    recorded = delivery.outgoing.payload.decode() + json.dumps(delivery.outgoing.metadata)
    for detail in (*PATIENT_DETAILS, "test-token"):
        assert detail not in recorded


def test_async_tests_dry_run_with_run_routes_async(tmp_path: Path) -> None:
    async def an_async_test() -> RoutingResult:  # as in an anyio or pytest-asyncio test
        return await run_routes_async(ADMIT, CONFIG, tmp_path)

    assert page_of(asyncio.run(an_async_test()))["to"] == "5550101"


def test_carehub_routes_fixture(
    carehub_routes: Callable[[str], RoutingResult], request: pytest.FixtureRequest
) -> None:
    if not request.config.getini("carehub_config"):
        pytest.skip("run pytest from plugins/carehub-pager: its pyproject sets carehub_config")
    result = carehub_routes("tests/messages/admit-ward.hl7")
    assert [r.route for r in result.matched] == ["admissions-page"]
    assert result.deliveries[0].destination == DESTINATION


def test_unit_not_in_the_schedule_pages_the_star_entry(tmp_path: Path) -> None:
    result = run_routes(on_unit("5E", event="A04", patient_class="E"), CONFIG, tmp_path)
    assert page_of(result) == {
        "to": "5550199",
        "text": f"carehub: ed registration - unit 5E - msg {result.message_id}",
    }


def test_units_match_without_case_and_a_hostile_unit_is_cleaned(tmp_path: Path) -> None:
    assert page_of(run_routes(on_unit("4w"), CONFIG, tmp_path))["to"] == "5550144"
    assert page_text("admission", 'W<script>"\x07ARD-ONE-TWO-THREE-FOUR', 7) == (
        "carehub: admission - unit WscriptARD-ONE-T - msg 7"
    )


def write_config(folder: Path, schedule: str, forward: str = "") -> Path:
    """A hub config whose one route pages through the given schedule file."""
    (folder / "routes").mkdir(parents=True)
    (folder / "routes" / "page.yaml").write_text(
        "routes:\n"
        "  - name: page\n"
        "    steps:\n"
        f"      - enrich: {{use: on-call, schedule: {schedule}}}\n"
        f"      - forward: {{channel: pager, url: 'http://127.0.0.1:9/page'{forward}}}\n",
        encoding="utf-8",
    )
    (folder / "carehub.yaml").write_text("routes: [routes/*.yaml]\n", encoding="utf-8")
    return folder / "carehub.yaml"


def test_no_one_on_call_is_a_route_error_not_a_silent_drop(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "on-call.csv").write_bytes((HERE / "config" / "on-call.csv").read_bytes())
    config = write_config(tmp_path / "conf", "on-call.csv")

    icu = run_routes(on_unit("icu"), config, tmp_path / "data")
    assert page_of(icu) == {
        "to": "+1 555 0177",
        "text": f"carehub: admission - unit icu - msg {icu.message_id}",
    }

    result = run_routes(on_unit("5E"), config, tmp_path / "data")
    assert result.deliveries == []
    (error,) = result.errors
    assert "no on-call clinician for unit '5E'" in error


def test_unknown_and_missing_options_are_config_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "typo", "on-call.yaml", ", tokn: x")
    with pytest.raises(ConfigError, match=r"page\.yaml:5: route 'page': .*tokn: Extra inputs"):
        run_routes(ADMIT, config, tmp_path / "data")
    config = write_config(tmp_path / "missing", "on-call.yaml")
    with pytest.raises(ConfigError, match="cannot read the on-call schedule"):
        run_routes(ADMIT, config, tmp_path / "data")


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("s.yaml", "WARD: {name: Dr. A, pager: call-me}", r"s\.yaml: unit 'WARD': pager:"),
        ("s.yaml", "WARD: {name: Dr. A, pager: '555', email: a@b}", "email: Extra inputs"),
        ("s.yaml", "- WARD", "a mapping of unit"),
        ("s.yaml", "", "lists no units"),
        ("s.csv", "unit,name\nWARD,Dr. A\n", "columns unit,name,pager"),
        ("s.csv", "unit,name,pager\nW,A,555\nw,B,556\n", r"s\.csv:3: unit 'w' is listed twice"),
        ("s.txt", "WARD,Dr. A,555", r"\.yaml, \.yml or \.csv"),
    ],
)
def test_bad_schedules_name_the_file_and_entry(
    tmp_path: Path, name: str, text: str, error: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=error):
        load_schedule(path)


# -- a real gateway ---------------------------------------------------------------------------
def routed(tmp_path: Path, message: str | Path = ADMIT) -> tuple[PagerChannel, Outgoing]:
    """The pager channel of the sample route and what it rendered for ``message``."""
    (delivery,) = run_routes(message, CONFIG, tmp_path).deliveries
    channel = bind_channel(CONFIG, DESTINATION, tmp_path)
    assert isinstance(channel, PagerChannel)
    return channel, delivery.outgoing


def send(channel: PagerChannel, outgoing: Outgoing) -> str | DeliveryError:
    """Start the channel, send once, close it; the receipt or the DeliveryError raised."""

    async def run() -> str | DeliveryError:
        await channel.start()
        try:
            return await channel.send(outgoing)
        except DeliveryError as err:
            return err
        finally:
            await channel.close()

    return asyncio.run(run())


def test_send_posts_the_page_to_the_gateway(
    tmp_path: Path, gateway: PageGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGER_URL", gateway.url())
    monkeypatch.setenv("PAGER_TOKEN", "s3cret")
    channel, outgoing = routed(tmp_path)
    assert "s3cret" not in repr(outgoing)

    assert send(channel, outgoing) == "HTTP 202"

    (request,) = gateway.received
    assert request.path == "/page"
    assert json.loads(request.body) == json.loads(outgoing.payload)
    assert json.loads(request.body)["to"] == "5550101"
    assert json.loads(request.body)["text"].startswith("carehub: admission - unit WARD - msg ")
    assert request.headers["authorization"] == "Bearer s3cret"
    assert request.headers["idempotency-key"] == outgoing.idempotency_key
    assert request.headers["content-type"] == "application/json"
    for detail in PATIENT_DETAILS:
        assert detail.encode() not in request.body


@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (401, False), (408, True), (429, True), (503, True)]
)
def test_gateway_answers_map_to_retryable_or_not(
    tmp_path: Path,
    gateway: PageGateway,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    retryable: bool,
) -> None:
    monkeypatch.setenv("PAGER_URL", gateway.url())
    gateway.answers = [status]
    error = send(*routed(tmp_path))
    assert isinstance(error, DeliveryError)
    assert error.retryable is retryable
    assert f"HTTP {status}: status {status}" in str(error)  # stored with the attempt
    # What the gateway said is kept apart from the channel's own account, which the log
    # shows whole: the status, never the gateway's words.
    assert error.said == f"status {status}"
    assert error.loggable == f"POST {gateway.url()}: HTTP {status}"


def test_unreachable_or_slow_gateway_is_retryable(
    tmp_path: Path, gateway: PageGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGER_URL", "http://127.0.0.1:9/page")  # discard port: refused
    error = send(*routed(tmp_path / "refused"))
    assert isinstance(error, DeliveryError) and error.retryable

    gateway.slow_seconds = 1.0
    channel = PagerChannel(
        PagerChannel.Options(url=gateway.url("/slow"), timeout=0.2), routed(tmp_path)[0].context
    )
    error = send(channel, Outgoing(b"{}", "application/json", "k"))
    assert isinstance(error, DeliveryError) and error.retryable
    assert "no answer within 0.2 s" in str(error)


# -- a running hub ----------------------------------------------------------------------------
def test_running_hub_pages_retries_and_counts_failures(
    tmp_path: Path,
    gateway: PageGateway,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PAGER_URL", gateway.url())
    STATS.reset()
    gateway.answers = [503, 202, 400]  # first page: retried then sent; second: refused
    config = local_config(worker=True, routes=["routes/*.yaml"], source=CONFIG)
    with (
        caplog.at_level(logging.INFO, logger="carehub"),
        HubThread(config, tmp_path / "data") as hub,
    ):
        mllp_exchange(hub.mllp_address, [ADMIT.read_bytes()])
        (first,) = hub.wait_for_deliveries(1)
        assert (first.status, first.attempts) == ("delivered", 2)
        mllp_exchange(hub.mllp_address, [on_unit("4W", "MSG2", patient_id="P0002").encode()])
        first, refused = hub.wait_for_deliveries(2)
        assert (refused.status, refused.attempts) == ("dead", 1)

    assert [json.loads(r.body)["to"] for r in gateway.received] == ["5550101"] * 2 + ["5550144"]
    # The log tells the status of each failure, and never what the gateway answered.
    (dead_letter,) = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
    assert dead_letter.endswith(f"POST {gateway.url()}: HTTP 400")
    assert "HTTP 503" in caplog.text
    assert "status 400" not in caplog.text and "status 503" not in caplog.text
    assert STATS.failures["pager"] == 2 and STATS.dead["pager"] == 1
    for step in ("translate v2-to-event", "enrich on-call"):
        assert STATS.steps[step].count == 2

    result = CliRunner().invoke(
        main,
        [
            "pager-status",
            "--data-dir",
            str(tmp_path / "data"),
            "--schedule",
            str(HERE / "config" / "on-call.yaml"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "pager deliveries: dead 1, delivered 1"
    assert "dead #2 message 2 to admissions-page/on-call-pager after 1 attempt(s)" in lines[1]
    assert "HTTP 400" in lines[1]
    assert "on call WARD: Dr. Robin Okafor (pager 5550101)" in lines
    assert "on call *: House Supervisor (pager 5550199)" in lines


def test_pager_status_with_no_deliveries(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["pager-status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output == "pager deliveries: none\n"
