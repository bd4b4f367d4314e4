"""Patient data that would leave unprotected is told at start, not found later: one WARNING per
destination on another machine sent to in clear or without checking the server, and per one on
this machine sent to in clear on a port any local account may bind unless it says
``allow_cleartext: true`` (`serve` and `routes check` alike, a real `carehub` process each),
one for an MLLP TLS listener that takes any client, and a webhook signing key that anyone could
know is refused. The shipped sample requires STARTTLS and a signing key of the site's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from carehub.config import TLSConfig
from carehub.testing import HubThread, local_config
from tests.helpers_cli import project, routes_check, unprivileged_port_start, unprotected_lines
from tests.helpers_http import CarehubProcess

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = PROJECT_ROOT / "config" / "carehub.yaml"

ROUTES = """\
routes:
  - name: outward
    when: {type: ADT}
    steps:
      - translate: v2-to-event
      - forward: {channel: webhook, name: unverified-platform, url: "https://platform.example.org/events", verify_tls: false}
      - forward: {channel: webhook, name: plain-platform, url: "http://user:pw@platform.example.org:8080/events?token=abc123"}
      - forward: {channel: webhook, name: local-platform, url: "http://127.0.0.1:8085/events"}
      - forward: {channel: webhook, name: verified-platform, url: "https://platform.example.org/events"}
      - forward: {channel: webhook, name: local-unverified, url: "https://127.0.0.1:8443/events", verify_tls: false}
      - forward: {channel: mllp, name: remote-ehr, host: ehr.example.org, port: 2575}
      - forward: {channel: mllp, name: local-ehr, host: localhost, port: 2575}
      - forward: {channel: mllp, name: tls-ehr, host: ehr.example.org, port: 2576, tls: true}
      - forward: {channel: fhir-notification, name: plain-fhir, base_url: "http://fhir.example.org/fhir"}
      - forward: {channel: fhir-notification, name: local-fhir, base_url: "http://[::1]:8088/fhir", allow_cleartext: true}
      - forward: {channel: email, name: plain-mail, host: smtp.example.org, starttls: false, sender: hub@example.org, to: desk@example.org}
      - forward: {channel: email, name: unverified-mail, host: smtp.example.org, validate_certs: false, sender: hub@example.org, to: desk@example.org}
      - forward: {channel: email, name: local-mail, host: 127.0.0.1, starttls: false, sender: hub@example.org, to: desk@example.org}
      - forward: {channel: email, name: tls-mail, host: smtp.example.org, sender: hub@example.org, to: desk@example.org}
      - forward: {channel: sms, name: plain-sms, url: "http://sms.example.org/send", to: "+15555550100"}
"""  # noqa: E501


#: Destination -> what its line must say; every other destination has no line. On this
#: machine, each port any local account may bind has one (LOCAL), but local-fhir's: it says
#: allow_cleartext.
EXPECTED = {
    "outward/unverified-platform": "https://platform.example.org with verify_tls: false",
    "outward/plain-platform": "http://platform.example.org:8080 in clear (http://, no TLS)",
    "outward/remote-ehr": "ehr.example.org:2575 over MLLP in clear (no tls: true)",
    "outward/plain-fhir": "http://fhir.example.org in clear (http://, no TLS)",
    "outward/plain-mail": "smtp.example.org:587 in clear (starttls: false, no use_tls)",
    "outward/unverified-mail": "smtp.example.org:587 with validate_certs: false",
    "outward/plain-sms": "http://sms.example.org in clear (http://, no TLS)",
}
LOCAL = {
    "outward/local-platform": (
        8085,
        "http://127.0.0.1:8085 in clear (http://, no TLS) on this machine: any local user who "
        "binds port 8085 while its receiver is not listening receives what it sends; use "
        "https://, or set allow_cleartext: true on this destination",
    ),
    "outward/local-ehr": (
        2575,
        "localhost:2575 over MLLP in clear (no tls: true) on this machine: any local user who "
        "binds port 2575 while its receiver is not listening receives what it sends; set "
        "tls: true, or set allow_cleartext: true on this destination",
    ),
    "outward/local-unverified": (
        8443,
        "https://127.0.0.1:8443 with verify_tls: false on this machine: any local user who "
        "binds port 8443 while its receiver is not listening receives what it sends; remove "
        "verify_tls: false, or set allow_cleartext: true on this destination",
    ),
    "outward/local-mail": (
        587,
        "SMTP server 127.0.0.1:587 in clear (starttls: false, no use_tls) on this machine",
    ),
}
EXPECTED.update(
    {name: words for name, (port, words) in LOCAL.items() if port >= unprivileged_port_start()}
)


def assert_one_line_per_unprotected_destination(output: str) -> None:
    lines = unprotected_lines(output)
    assert set(lines) == set(EXPECTED), lines
    for name, words in EXPECTED.items():
        assert words in lines[name], lines[name]
    assert "pw" not in lines["outward/plain-platform"]
    assert "abc123" not in output and "/events" not in lines["outward/plain-platform"]


def test_routes_check_names_each_destination_that_leaves_unprotected(tmp_path: Path) -> None:
    checked = routes_check(project(tmp_path / "config", ROUTES), tmp_path / "data")
    assert checked.returncode == 0, checked.stderr
    assert "ok: 1 route(s), 15 destination(s)" in checked.stdout
    assert_one_line_per_unprotected_destination(checked.stderr)
    assert all(line.startswith("warning: ") for line in unprotected_lines(checked.stderr).values())


def test_serve_logs_each_destination_that_leaves_unprotected_at_start(tmp_path: Path) -> None:
    config = project(tmp_path / "config", ROUTES)
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        assert serve.terminate() == 0
    assert_one_line_per_unprotected_destination(serve.stderr)
    for line in unprotected_lines(serve.stderr).values():
        assert " WARNING carehub.routing.table: " in line


def hmac_project(folder: Path, secret: str) -> Path:
    routes = (
        "routes:\n"
        "  - name: signed\n"
        "    when: {type: ADT}\n"
        "    steps:\n"
        "      - forward:\n"
        "          channel: webhook\n"
        "          url: http://127.0.0.1:8085/events\n"
        f"          hmac_secret: {secret}\n"
    )
    return project(folder, routes)


@pytest.mark.parametrize(
    ("secret", "words"),
    [
        ("change-me", "the key is the placeholder 'change-me'"),
        ("Short-Key-15chr", "the key is shorter than 16 characters"),
        ('""', "the key is shorter than 16 characters"),
    ],
)
def test_a_webhook_signing_key_anyone_could_know_is_refused(
    tmp_path: Path, secret: str, words: str
) -> None:
    checked = routes_check(hmac_project(tmp_path / "config", secret), tmp_path / "data")
    assert checked.returncode != 0
    assert "routes.yaml:8: route 'signed': steps[0].forward.hmac_secret: " in checked.stderr
    assert words in checked.stderr
    assert "Short-Key" not in checked.stderr  # a real key is never quoted


def test_a_webhook_signing_key_of_sixteen_characters_is_taken(tmp_path: Path) -> None:
    checked = routes_check(hmac_project(tmp_path / "config", "sixteen-chars-ok"), tmp_path / "d")
    assert checked.returncode == 0, checked.stderr


def test_the_sample_needs_its_signing_key_from_the_environment(tmp_path: Path) -> None:
    checked = routes_check(SAMPLE_CONFIG, tmp_path / "data", CARE_PLATFORM_SECRET=None)
    assert checked.returncode != 0
    assert "care-events.yaml" in checked.stderr
    assert "forward.hmac_secret: environment variable CARE_PLATFORM_SECRET is not set" in (
        checked.stderr
    )


def test_the_sample_sends_mail_with_starttls_unless_told_otherwise(tmp_path: Path) -> None:
    """With the mail server on another machine: no line while SMTP_STARTTLS is unset (the
    sample requires STARTTLS), one per email channel when it is set to false."""
    remote = {"SMTP_HOST": "smtp.example.org", "CARE_PLATFORM_SECRET": "a-site-signing-key-0001"}
    default = routes_check(SAMPLE_CONFIG, tmp_path / "data", SMTP_STARTTLS=None, **remote)
    assert default.returncode == 0, default.stderr
    assert unprotected_lines(default.stderr) == {}
    plain = routes_check(SAMPLE_CONFIG, tmp_path / "data", SMTP_STARTTLS="false", **remote)
    assert plain.returncode == 0, plain.stderr
    mail = unprotected_lines(plain.stderr)
    assert len(mail) == 4 and all("smtp.example.org" in line for line in mail.values()), mail


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(folder / "ca.pem")
    server.cert_chain_pems[0].write_to_path(folder / "server.pem")
    server.private_key_pem.write_to_path(folder / "server.key")
    (folder / "server.key").chmod(0o600)
    return folder / "server.pem", folder / "server.key", folder / "ca.pem"


@pytest.mark.parametrize(
    ("host", "client_ca", "require", "warned"),
    [
        ("0.0.0.0", False, None, "no client_ca"),
        ("0.0.0.0", True, False, "require_client_cert: false"),
        ("0.0.0.0", True, None, None),
        ("127.0.0.1", False, None, None),
    ],
)
def test_an_mllp_tls_listener_taking_any_client_is_warned_about_at_start(
    tmp_path: Path,
    server_tls: tuple[Path, Path, Path],
    caplog: pytest.LogCaptureFixture,
    host: str,
    client_ca: bool,
    require: bool | None,
    warned: str | None,
) -> None:
    cert, key, ca = server_tls
    config = local_config()
    config.listeners.mllp[0].host = host
    config.listeners.mllp[0].tls = TLSConfig(
        cert=cert, key=key, client_ca=ca if client_ca else None, require_client_cert=require
    )
    caplog.set_level("WARNING", logger="carehub.hub")
    with HubThread(config, tmp_path / "data"):
        pass
    lines = [r.getMessage() for r in caplog.records if "client certificates" in r.getMessage()]
    if warned is None:
        assert lines == []
    else:
        [line] = lines
        assert line.startswith(
            f"MLLP listener 'test' on 0.0.0.0 does not require client certificates ({warned}): "
            "any client that reaches the port can send"
        )
        assert "listeners.mllp[0].tls.client_ca" in line


def test_a_fhir_base_url_with_a_query_is_refused_naming_the_key(tmp_path: Path) -> None:
    """carehub adds paths after a FHIR base URL ($process-message, Task/{id}): a token in its
    query would swallow them (and be stored with every delivery), so it is a config error that
    says where a token goes instead."""
    routes = (
        "routes:\n"
        "  - name: notify\n"
        "    when: {type: ADT}\n"
        "    steps:\n"
        "      - forward:\n"
        "          channel: fhir-notification\n"
        "          base_url: https://fhir.example.org/fhir?access_token=SecretTok3n\n"
    )
    checked = routes_check(project(tmp_path / "config", routes), tmp_path / "data")
    assert checked.returncode != 0
    assert "route 'notify': steps[0].forward.base_url: " in checked.stderr
    assert "cannot carry a query" in checked.stderr and "auth_header" in checked.stderr
    assert "SecretTok3n" not in checked.stderr + checked.stdout
