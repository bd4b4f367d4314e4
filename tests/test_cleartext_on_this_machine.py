"""Loopback never leaves the machine, but a port any local account may bind is not the
receiver's while the receiver is not listening: a destination there sent to in clear
(http://, MLLP without tls, SMTP without STARTTLS) is warned about at start, unless the
destination says ``allow_cleartext: true``; a privileged port (below Linux's
ip_unprivileged_port_start) is not. The shipped sample sends nowhere nobody configured: its
destinations' URLs come from the environment with no default, and `carehub demo` points them
at its own stand-ins without a warning. Real `carehub` processes throughout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers_cli import (
    environment,
    project,
    routes_check,
    unprivileged_port_start,
    unprotected_lines,
)
from tests.helpers_http import CarehubProcess, wait_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = PROJECT_ROOT / "config" / "carehub.yaml"
#: The variables the sample's destinations read, which have no default.
SAMPLE_URLS = ("CARE_PLATFORM_URL", "SMS_GATEWAY_URL", "CARE_FHIR_URL", "CBO_FHIR_URL")

ROUTES = """\
routes:
  - name: local
    when: {type: ADT}
    steps:
      - translate: v2-to-event
      - forward: {channel: webhook, name: plain-hook, url: "http://127.0.0.1:8085/events"}
      - forward: {channel: webhook, name: accepted-hook, url: "http://localhost:8086/events", allow_cleartext: true}
      - forward: {channel: webhook, name: tls-hook, url: "https://127.0.0.1:8443/events"}
      - forward: {channel: webhook, name: low-port-hook, url: "http://127.0.0.1/events"}
      - forward: {channel: fhir-notification, name: plain-fhir, base_url: "http://[::1]:8088/fhir"}
      - forward: {channel: mllp, name: plain-ehr, host: localhost, port: 2575}
      - forward: {channel: mllp, name: tls-ehr, host: 127.0.0.1, port: 2576, tls: true}
      - forward: {channel: email, name: plain-mail, host: 127.0.0.1, port: 1025, starttls: false, sender: hub@example.org, to: desk@example.org}
      - forward: {channel: email, name: relay-mail, host: 127.0.0.1, port: 25, starttls: false, sender: hub@example.org, to: desk@example.org}
      - forward: {channel: webhook, name: remote-hook, url: "http://platform.example.org/events", allow_cleartext: true}
      - notify:
          channels:
            sms: {channel: sms, url: "http://127.0.0.1:8087/sms", allow_cleartext: true}
"""  # noqa: E501

#: Destination -> what its line must say; every other destination has none.
EXPECTED = {
    "local/plain-hook": "http://127.0.0.1:8085 in clear (http://, no TLS) on this machine: "
    "any local user who binds port 8085 while its receiver is not listening receives what "
    "it sends; use https://, or set allow_cleartext: true on this destination",
    "local/plain-fhir": "http://[::1]:8088 in clear (http://, no TLS) on this machine: any "
    "local user who binds port 8088",
    "local/plain-ehr": "localhost:2575 over MLLP in clear (no tls: true) on this machine: any "
    "local user who binds port 2575",
    "local/plain-mail": "SMTP server 127.0.0.1:1025 in clear (starttls: false, no use_tls) on "
    "this machine: any local user who binds port 1025",
    # allow_cleartext accepts sending in clear on this machine, never to another one.
    "local/remote-hook": "http://platform.example.org in clear (http://, no TLS): anyone on "
    "the network between can read it",
}
if unprivileged_port_start() <= 25:  # any account may bind even 25 and 80 here
    EXPECTED["local/relay-mail"] = "SMTP server 127.0.0.1:25 in clear"
    EXPECTED["local/low-port-hook"] = "http://127.0.0.1 in clear"


def assert_one_line_per_exposed_destination(output: str) -> None:
    lines = unprotected_lines(output)
    assert set(lines) == set(EXPECTED), lines
    for name, words in EXPECTED.items():
        assert words in lines[name], lines[name]


def test_routes_check_warns_of_cleartext_to_a_port_any_local_user_may_bind(
    tmp_path: Path,
) -> None:
    checked = routes_check(project(tmp_path / "config", ROUTES), tmp_path / "data")
    assert checked.returncode == 0, checked.stderr
    assert_one_line_per_exposed_destination(checked.stderr)
    assert all(line.startswith("warning: ") for line in unprotected_lines(checked.stderr).values())


def test_serve_logs_cleartext_to_a_port_any_local_user_may_bind_at_start(tmp_path: Path) -> None:
    config = project(tmp_path / "config", ROUTES)
    args = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    with CarehubProcess(args, tmp_path / "logs", "serve") as serve:
        serve.wait_ready()
        assert serve.terminate() == 0
    assert_one_line_per_exposed_destination(serve.stderr)
    for line in unprotected_lines(serve.stderr).values():
        assert " WARNING carehub.routing.table: " in line


def test_allow_cleartext_must_be_true_or_false(tmp_path: Path) -> None:
    routes = (
        "routes:\n"
        "  - name: local\n"
        "    steps:\n"
        "      - forward:\n"
        "          channel: webhook\n"
        "          url: http://127.0.0.1:8085/events\n"
        "          allow_cleartext: sometimes\n"
    )
    checked = routes_check(project(tmp_path / "config", routes), tmp_path / "data")
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert (
        "routes.yaml:7: route 'local': steps[0].forward.allow_cleartext: "
        "Input should be a valid boolean"
    ) in checked.stderr


@pytest.mark.parametrize("unset", SAMPLE_URLS)
def test_the_sample_needs_each_destination_from_the_environment(tmp_path: Path, unset: str) -> None:
    """With every other variable set, the one left unset is a config error naming the file,
    the line, the key and the variable: never a default port on this machine."""
    others = {name: f"https://{name.lower()}.example.org/x" for name in SAMPLE_URLS}
    checked = routes_check(
        SAMPLE_CONFIG, tmp_path / "data", **{**others, unset: None}, SMTP_STARTTLS=None
    )
    assert checked.returncode == 2, checked.stdout + checked.stderr
    assert re.search(
        r"routes/[a-z-]+\.yaml:\d+: routes\[\d+\]\.steps\[\d+\]\.\S*(url|base_url): "
        f"environment variable {unset} is not set",
        checked.stderr,
    ), checked.stderr


def test_serve_on_the_sample_with_only_its_signing_key_does_not_start(tmp_path: Path) -> None:
    """As the README once had it: CARE_PLATFORM_SECRET alone. The hub refuses to start rather
    than send patient data to 127.0.0.1:8085-8088, where any local account may listen."""
    args = ["serve", "--config", str(SAMPLE_CONFIG), "--data-dir", str(tmp_path / "data")]
    args += ["--mllp-port", "0", "--http-port", "0"]
    # CarehubProcess passes this environment on: the suite's own stand-in URLs are taken out.
    command = ["env", *(f"--unset={name}" for name in SAMPLE_URLS), "--unset=SMTP_STARTTLS"]
    command += [sys.executable, "-m", "carehub.cli", *args]
    with CarehubProcess(args, tmp_path / "logs", "serve", command) as serve:
        wait_for(
            lambda: serve.process.poll() is not None or "carehub ready" in serve.stdout,
            60,
            0.05,
            "serve to exit or start",
        )
        assert "carehub ready" not in serve.stdout, serve.stdout
        assert serve.process.wait(30) != 0
    assert "environment variable CARE_PLATFORM_URL is not set" in serve.stderr


def test_the_demo_points_the_sample_at_its_own_stand_ins_without_a_warning(
    tmp_path: Path,
) -> None:
    """`carehub demo` (what `make demo` runs) with none of the sample's destinations in the
    environment: it sets them to its stand-ins, which hold their loopback ports while the hub
    runs, so nothing warns of sending to them in clear; everything is delivered."""
    env = environment(**dict.fromkeys(SAMPLE_URLS), SMTP_HOST=None, SMTP_PORT=None)
    env.pop("CARE_PLATFORM_SECRET", None)
    env.pop("SMTP_STARTTLS", None)
    done = subprocess.run(
        [sys.executable, "-m", "carehub.cli", "demo", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
        cwd=PROJECT_ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "in clear" not in done.stderr, done.stderr
    assert "carehub demo" in done.stdout and "delivered" in done.stdout
