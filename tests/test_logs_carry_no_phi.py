"""Logs at INFO carry no message bodies, names or identifiers: message bodies live in the store.

The whole sample pipeline runs (`carehub demo`: intake of every sample feed, a refused message
and a resend, routing, care notifications by webhook, SMS and email, a referral sent to a
community organisation and closed, the periodic work) with every logger at INFO, and no
patient name, identifier, birth date, phone number or referral number of the sample feeds may
appear in what was logged. What the demo prints for a person is its output, not a log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from carehub.cli import setup_logging
from carehub.demo import find_sample_config, run_demo
from carehub.hl7.charsets import decode_message
from carehub.hl7.view import MessageView

#: Fields that identify a person, by segment: PID-3 identifiers, PID-5 name, PID-7 birth date,
#: PID-13 phone, PID-19 SSN; NK1-2 a relative's name; RF1-6 the referral number.
_SENSITIVE = {"PID": (3, 5, 7, 13, 19), "NK1": (2,), "RF1": (6,)}


def sensitive_values(feeds: list[Path]) -> set[str]:
    """Every component of those fields in the sample feeds, long enough to be telling."""
    found: set[str] = set()
    for feed in feeds:
        view = MessageView(decode_message(feed.read_bytes()).text)
        seps = view.separators
        for position, name in enumerate(view.segment_names()):
            fields = view.fields(position)
            for number in _SENSITIVE.get(name, ()):
                value = fields[number] if number < len(fields) else ""
                for repetition in value.split(seps.repetition):
                    found.update(
                        part for part in repetition.split(seps.component) if len(part) >= 4
                    )
    return found - {"HOSP", "SYNTH"}  # assigning authorities are not identifiers


def test_the_whole_sample_pipeline_logs_no_phi_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    config = find_sample_config()
    feeds = sorted((config.parent / "feeds").glob("*.hl7"))
    secrets = sensitive_values(feeds)
    assert len(secrets) >= 20, secrets  # the check below has something to look for

    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    caplog.set_level(logging.INFO)
    setup_logging("INFO")  # as `carehub serve` sets up its logs
    settings = ("CARE_FHIR_URL", "CARE_PLATFORM_SECRET", "SMTP_PORT", "CAREHUB_OUTBOX")
    before = {name: os.environ.get(name) for name in settings}
    try:
        assert run_demo(config, tmp_path / "data") == 0
        # The stand-ins' addresses do not outlive the demo in the program that ran it.
        assert {name: os.environ.get(name) for name in settings} == before
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)

    shown = capsys.readouterr().out
    assert any(secret in shown for secret in secrets)  # the demo's own output does show them
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert len(caplog.records) > 5, logged  # the hub did log at INFO
    leaked = sorted(secret for secret in secrets if secret in logged)
    assert not leaked, f"identifiers in the INFO log: {leaked}\n{logged}"
