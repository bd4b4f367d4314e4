"""Requests refused for their bearer token leave a trace: a WARNING naming the peer address and
the endpoint (never the token offered), at most once a minute per address, and
carehub_http_auth_failures by endpoint; /health's details asked for with a wrong token count
too, a probe without one does not. A token shorter than 16 characters is warned about at
start, naming where it is set and not the token. Real hub, real HTTP from several loopback
addresses."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from carehub.testing import HubThread, local_config, make_adt
from tests.helpers_http import wait_for

TIMEOUT = 30.0
LOGGER = "carehub.intake.http"
TOKEN = "a-long-enough-intake-token-0042"
WRONG = "guessed-token-that-is-wrong-7"
ORG_TOKEN = "food-bank-token-long-enough-01"


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=TIMEOUT)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LOGGER and r.levelname == "WARNING" and "bearer token" in r.getMessage()
    ]


def failures(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("carehub_http_auth_failures_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('"')[1]] = float(value)
    return found


def test_refused_tokens_are_logged_per_peer_and_counted_by_endpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAREHUB_HTTP_TOKENS", raising=False)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    config = local_config()
    config.listeners.http.tokens = [TOKEN]
    config.listeners.http.organization_tokens = {"Food Bank": ORG_TOKEN}
    wrong = {"Authorization": f"Bearer {WRONG}"}
    with HubThread(config, tmp_path / "data") as hub:
        url = hub.http_url
        with client("127.0.0.2") as http:
            assert http.post(f"{url}/hl7", content=make_adt("NOPE").encode()).status_code == 401
            answer = http.post(f"{url}/hl7", content=make_adt("NOPE").encode(), headers=wrong)
            assert answer.status_code == 401
            assert http.get(f"{url}/metrics", headers=wrong).status_code == 401
            update = {"status": "accepted"}
            assert http.post(f"{url}/referrals/R1/status", json=update).status_code == 401
            # /health answers a probe without a token, and the status alone for a wrong one.
            assert http.get(f"{url}/health").json() == {"status": "ok"}
            assert http.get(f"{url}/health", headers=wrong).json() == {"status": "ok"}
        with client("127.0.0.3") as http:
            assert http.get(f"{url}/metrics", headers=wrong).status_code == 401
        wait_for(lambda: len(refusal_lines(caplog)) == 2, 10, what="one line per address")
        with client("127.0.0.1") as http:
            token = {"Authorization": f"Bearer {TOKEN}"}
            answer = http.post(f"{url}/hl7", content=make_adt("YES").encode(), headers=token)
            assert answer.status_code == 200
            text = http.get(f"{url}/metrics", headers=token).text
        assert [m.control_id for m in hub.store.find()] == ["YES"]
    assert failures(text) == {
        "/hl7": 2.0,
        "/metrics": 2.0,
        "/referrals/{referral_key:path}/status": 1.0,
        "/health": 1.0,
    }
    lines = sorted(refusal_lines(caplog))
    assert len(lines) == 2, lines  # five refusals from 127.0.0.2 within the minute: one line
    assert lines[0].startswith("HTTP listener http: refused a request to /hl7 from 127.0.0.2:")
    assert lines[1].startswith("HTTP listener http: refused a request to /metrics from 127.0.0.3:")
    assert all(WRONG not in line and TOKEN not in line for line in lines)
    assert all("R1" not in line for line in lines)  # the route, not the referral's key


def test_short_tokens_are_warned_about_at_start_by_where_they_are_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAREHUB_HTTP_TOKENS", f"{TOKEN}, tiny9")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    config = local_config()
    config.listeners.http.tokens = ["q7Z", TOKEN]
    config.listeners.http.organization_tokens = {"Food Bank": "fb1X", "Pantry": ORG_TOKEN}
    # Short tokens still work: a warning, not a refusal.
    with HubThread(config, tmp_path / "data") as hub, client("127.0.0.1") as http:
        token = {"Authorization": "Bearer tiny9"}
        answer = http.post(f"{hub.http_url}/hl7", content=make_adt("T").encode(), headers=token)
        assert answer.status_code == 200
    short = [
        r.getMessage() for r in caplog.records if "shorter than 16 characters" in r.getMessage()
    ]
    named = sorted(line.split(" is a bearer token")[0] for line in short)
    assert named == [
        "entry 2 of $CAREHUB_HTTP_TOKENS",
        "listeners.http.organization_tokens['Food Bank']",
        "listeners.http.tokens[0]",
    ], short
    for line in short:
        assert not any(t in line for t in ("q7Z", "tiny9", "fb1X")), line
