"""HTTP intake against a real hub: 200 with the ACK of every stored message, tokens, health,
metrics."""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from carehub.hl7.ack import read_ack
from carehub.testing import HubThread, local_config, make_adt

TIMEOUT = 30.0
HL7_TYPE = "x-application/hl7-v2+er7"


def post(hub: HubThread, body: bytes, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": HL7_TYPE}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{hub.http_url}/hl7", content=body, headers=headers, timeout=TIMEOUT)


def ack_of(response: httpx.Response) -> tuple[str, str, str]:
    return read_ack(response.content.decode())


@pytest.fixture
def token_hub(tmp_path: Path) -> Iterator[HubThread]:
    config = local_config()
    config.listeners.http.tokens = ["s3cret"]
    with HubThread(config, tmp_path / "data") as running:
        yield running


def test_good_message_is_acked_aa_and_stored_with_transport_and_peer(hub: HubThread) -> None:
    response = post(hub, make_adt("H1").encode())
    assert response.status_code == 200
    assert response.headers["content-type"] == f"{HL7_TYPE}; charset=utf-8"
    assert ack_of(response)[:2] == ("AA", "H1")
    [stored] = hub.store.find()
    assert (stored.control_id, stored.transport, stored.listener) == ("H1", "http", "http")
    assert stored.status == "received" and stored.ack_code == "AA"
    host, _, port = stored.peer.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    assert stored.raw == make_adt("H1").encode()


def test_message_without_control_id_is_200_ae_and_stored_refused(hub: HubThread) -> None:
    response = post(hub, make_adt("").encode())
    assert response.status_code == 200
    code, control_id, text = ack_of(response)
    assert (code, control_id) == ("AE", "")
    assert "MSH-10" in text
    [stored] = hub.store.find()
    assert (stored.status, stored.ack_code) == ("refused", "AE")


@pytest.mark.parametrize(
    ("trailer", "problem"),
    [("BTS|5\rFTS|1\r", "BTS-1"), ("", "no BTS")],
    ids=["count-disagrees", "cut-short"],
)
def test_a_batch_that_does_not_hold_together_is_refused_whole(
    hub: HubThread, trailer: str, problem: str
) -> None:
    """A batch whose trailers are missing (cut short on the way) or count other than it holds
    is AR naming why, and none of its messages is stored as received: the sender sends it
    again whole rather than lose the part that did not come."""
    body = (
        "FHS|^~\\&|LAB|HOSP\rBHS|^~\\&|LAB|HOSP\r" + make_adt("B1").replace("\n", "\r") + trailer
    ).encode()
    response = post(hub, body)
    assert response.status_code == 200
    code, _, text = ack_of(response)
    assert code == "AR"
    assert problem in text and "send the whole batch again" in text
    assert [m.status for m in hub.store.find()] == ["rejected"]


def test_a_batch_trailer_without_its_header_is_refused_as_the_file_drop_refuses_it(
    hub: HubThread,
) -> None:
    response = post(hub, (make_adt("T1").replace("\n", "\r") + "BTS|1\r").encode())
    assert response.status_code == 200
    code, _, text = ack_of(response)
    assert code == "AR" and "BTS" in text
    assert [m.status for m in hub.store.find()] == ["rejected"]


def test_body_that_is_not_hl7_is_200_ar(hub: HubThread) -> None:
    response = post(hub, b'{"resourceType": "Patient"}')
    assert response.status_code == 200
    code, _, text = ack_of(response)
    assert code == "AR"
    assert "not an HL7 v2 message" in text
    assert hub.store.count("rejected") == 1


def test_body_over_the_size_limit_is_413_ar_naming_the_limit(tmp_path: Path) -> None:
    config = local_config()
    config.listeners.http.max_message_bytes = 1024
    with HubThread(config, tmp_path / "data") as hub:
        body = make_adt("BIG", extra_segments=[f"NTE|1||{'x' * 6000}"]).encode()
        response = post(hub, body)
        assert response.status_code == 413
        code, control_id, text = ack_of(response)
        assert (code, control_id) == ("AR", "BIG")
        assert f"{len(body)} bytes exceeds" in text and "limit of 1024 bytes" in text
        [stored] = hub.store.find()
        assert stored.status == "rejected" and stored.raw == body[:4096]  # only the head is kept
        # A message within the limit on the same listener is still taken.
        assert post(hub, make_adt("SMALL").encode()).status_code == 200


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_endless_body_is_answered_413_once_past_the_limit(tmp_path: Path, framing: str) -> None:
    """A sender streaming a body that never ends (or declaring 1 GB) gets its 413 as soon as the
    limit is passed: the hub does not read, or hold in memory, more than the limit."""
    config = local_config()
    config.listeners.http.max_message_bytes = 64 * 1024
    with HubThread(config, tmp_path / "data") as hub:
        assert hub.hub.http_listener and hub.hub.http_listener.address
        port = hub.hub.http_listener.address[1]
        head = make_adt("ENDLESS").encode() + b"NTE|1||"
        length = (
            "Transfer-Encoding: chunked" if framing == "chunked" else "Content-Length: 1000000000"
        )
        request = (
            f"POST /hl7 HTTP/1.1\r\nHost: x\r\nContent-Type: {HL7_TYPE}\r\n{length}\r\n\r\n"
        ).encode()
        chunk = b"x" * 16 * 1024

        def framed(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" else data

        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(request + framed(head))
            sock.setblocking(False)
            sent, answer = len(head), b""
            while b"\r\n\r\n" not in answer:
                assert sent < 8 * 1024 * 1024, f"no answer after {sent} bytes of body"
                try:
                    sock.send(framed(chunk))
                    sent += len(chunk)
                except BlockingIOError:
                    pass  # the hub has stopped reading: its answer is on the way
                except (BrokenPipeError, ConnectionResetError):
                    pass
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    select.select([sock], [], [], 0.01)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        [stored] = hub.store.find()
        assert (stored.status, stored.control_id) == ("rejected", "ENDLESS")


def test_without_authorization_is_401_and_nothing_is_stored(token_hub: HubThread) -> None:
    response = post(token_hub, make_adt("T1").encode())
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert token_hub.store.count() == 0


@pytest.mark.parametrize(
    "authorization", ["Bearer wrong", "Bearer s3cre", "Basic s3cret", "s3cret"]
)
def test_wrong_token_or_scheme_is_401(token_hub: HubThread, authorization: str) -> None:
    response = httpx.post(
        f"{token_hub.http_url}/hl7",
        content=make_adt("T1").encode(),
        headers={"Authorization": authorization},
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert token_hub.store.count() == 0


def test_right_bearer_token_is_200(token_hub: HubThread) -> None:
    response = post(token_hub, make_adt("T1").encode(), token="s3cret")
    assert response.status_code == 200
    assert ack_of(response)[:2] == ("AA", "T1")
    assert token_hub.store.count() == 1


def test_tokens_from_the_environment_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAREHUB_HTTP_TOKENS", " envtoken , other ")
    with HubThread(local_config(), tmp_path / "data") as hub:
        assert post(hub, make_adt("E1").encode()).status_code == 401
        assert post(hub, make_adt("E1").encode(), token="nope").status_code == 401
        assert post(hub, make_adt("E1").encode(), token="envtoken").status_code == 200
        assert post(hub, make_adt("E2").encode(), token="other").status_code == 200
        assert hub.store.count() == 2


def test_health_is_ok_without_a_token_and_shows_the_status_alone(token_hub: HubThread) -> None:
    response = httpx.get(f"{token_hub.http_url}/health", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    wrong = httpx.get(
        f"{token_hub.http_url}/health", headers={"Authorization": "Bearer nope"}, timeout=TIMEOUT
    )
    assert wrong.json() == {"status": "ok"}


def test_health_details_need_a_token_when_tokens_are_set(token_hub: HubThread) -> None:
    response = httpx.get(
        f"{token_hub.http_url}/health", headers={"Authorization": "Bearer s3cret"}, timeout=TIMEOUT
    )
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ok" and report["store"] == "ok"
    assert {"kind": "HTTP", "name": "http"}.items() <= report["listeners"][1].items()


def test_health_shows_its_details_on_a_hub_without_tokens(hub: HubThread) -> None:
    report = httpx.get(f"{hub.http_url}/health", timeout=TIMEOUT).json()
    assert report["status"] == "ok" and "listeners" in report and "intake" in report


def test_metrics_need_a_token_when_tokens_are_set(token_hub: HubThread) -> None:
    url = f"{token_hub.http_url}/metrics"
    assert httpx.get(url, timeout=TIMEOUT).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=TIMEOUT)
    assert wrong.status_code == 401 and "carehub_" not in wrong.text
    right = httpx.get(url, headers={"Authorization": "Bearer s3cret"}, timeout=TIMEOUT)
    assert right.status_code == 200 and "carehub_intake_messages_total" in right.text


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_api_docs_are_not_served_unless_turned_on(
    token_hub: HubThread, tmp_path: Path, path: str
) -> None:
    assert httpx.get(f"{token_hub.http_url}{path}", timeout=TIMEOUT).status_code == 404
    config = local_config()
    config.listeners.http.api_docs = True
    with HubThread(config, tmp_path / "docs-data") as documented:
        assert httpx.get(f"{documented.http_url}{path}", timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize("tokens", ['["${CAREHUB_HTTP_TOKEN}"]', '[""]', '[good, " "]'])
def test_a_token_that_comes_out_empty_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokens: str
) -> None:
    from click.testing import CliRunner

    from carehub.cli import main

    monkeypatch.delenv("CAREHUB_HTTP_TOKENS", raising=False)
    monkeypatch.setenv("CAREHUB_HTTP_TOKEN", "")
    config = tmp_path / "carehub.yaml"
    config.write_text(
        f"routes: []\nlisteners:\n  http: {{host: 0.0.0.0, tokens: {tokens}}}\n", encoding="utf-8"
    )
    where = ["--config", str(config), "--data-dir", str(tmp_path / "data")]
    for command in (["routes", "check", "--offline"], ["serve", "--mllp-port", "0"]):
        result = CliRunner().invoke(main, [*command, *where])
        assert result.exit_code == 2, result.output
        assert f"{config}:3: listeners.http.tokens:" in result.stderr
        assert "would let anyone in" in result.stderr
        assert "carehub ready" not in result.output


@pytest.mark.parametrize("value", ["", " , ", "good,"])
def test_an_empty_token_in_the_environment_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from click.testing import CliRunner

    from carehub.cli import main

    monkeypatch.setenv("CAREHUB_HTTP_TOKENS", value)
    config = tmp_path / "carehub.yaml"
    config.write_text("routes: []\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["routes", "check", "--offline", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "CAREHUB_HTTP_TOKENS" in result.stderr and "would let anyone in" in result.stderr


def test_metrics_count_accepted_messages(hub: HubThread) -> None:
    for control_id in ("M1", "M2", "M3"):
        assert post(hub, make_adt(control_id).encode()).status_code == 200
    assert post(hub, make_adt("").encode()).status_code == 200
    response = httpx.get(f"{hub.http_url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert 'carehub_intake_messages_total{listener="http",outcome="accepted"} 3.0' in lines
    assert 'carehub_intake_messages_total{listener="http",outcome="refused"} 1.0' in lines


def test_duplicate_post_is_aa_twice_and_stored_once(hub: HubThread) -> None:
    body = make_adt("DUP1").encode()
    first, second = post(hub, body), post(hub, body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert ack_of(first)[:2] == ack_of(second)[:2] == ("AA", "DUP1")
    [stored] = hub.store.find()
    assert [change.event for change in hub.store.history(stored.id)] == ["received", "resent"]


@pytest.mark.parametrize(
    ("host", "tokens", "warned"),
    [("0.0.0.0", [], True), ("127.0.0.1", [], False), ("0.0.0.0", ["s3cret-token"], False)],
)
def test_an_open_http_listener_on_the_network_is_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    tokens: list[str],
    warned: bool,
) -> None:
    monkeypatch.delenv("CAREHUB_HTTP_TOKENS", raising=False)
    config = local_config()
    config.listeners.http.host = host
    config.listeners.http.tokens = tokens
    caplog.set_level(logging.WARNING, logger="carehub.hub")
    with HubThread(config, tmp_path / "data"):
        pass
    warnings = [r.getMessage() for r in caplog.records if "takes messages" in r.getMessage()]
    assert bool(warnings) is warned, warnings
    assert all("s3cret" not in text for text in warnings)
