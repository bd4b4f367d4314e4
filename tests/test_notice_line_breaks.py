"""A line break decoded from an HL7 escape (``\\.br\\``, ``\\X0D0A\\``) in a name, facility or
practitioner never reshapes a notice: the email subject stays whole on one line, and no value
starts a line of the body or of a text message, where it could pass for a header. A real hub
sends the notices to a real SMTP server and SMS gateway (the care route of test_notify, its
fixtures reused); the plain email forward, and the templates' filters, are checked too."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
from aiosmtpd.controller import Controller

from carehub.care.templating import CONTINUATION, MessageTemplates
from carehub.components import ComponentContext
from carehub.testing import HubThread, local_config, mllp_exchange
from tests.helpers_smtp import Mailbox, free_port
from tests.test_notify import (  # noqa: F401  (fixtures: care, mailbox, gateway)
    CC_PHONE,
    PCP,
    adt,
    care,
    gateway,
    mailbox,
)

#: A facility (PV1-3.4 and MSH-4) whose escapes decode to CR LF and then header-like lines.
FACILITY = "EVIL\\X0D0A\\Bcc: attacker3@evil.test\\X0D0A\\X-Evil: 1"
#: The same as a notice may print it: one line.
FACILITY_SHOWN = "EVIL Bcc: attacker3@evil.test X-Evil: 1"
#: What no line of a notice may start with.
INJECTED = re.compile(r"^\s*(Bcc|Subject|X-Evil|Reply-To):", re.MULTILINE)


def _injected() -> str:
    """An ADT of the care route with line breaks escaped into the patient's name, the
    attending practitioner and the diagnosis as well as the facility."""
    return (
        adt("A04", "INJ-1", facility=FACILITY)
        .replace("Tester^Pat", "Tester\\.br\\Subject: pwned^Pat")
        .replace("^Attend^Ann^", "^Attend\\X0A\\Reply-To: x@evil.test^Ann^")
        .replace("Chest pain, unspecified", "Chest pain\\X0D\\Bcc: dx@evil.test")
    )


def test_an_escaped_line_break_stays_inside_its_value_in_email_and_sms(
    care: Callable[..., Any],  # noqa: F811
) -> None:
    message = _injected()
    with care() as hub:
        assert hub.send(message) == ["AA"]
        hub.settle()
        (mail,) = hub.mailbox.to(PCP)
        (text,) = hub.texts()
    assert mail.subject == f"ED visit at {FACILITY_SHOWN}"
    body = mail.body
    assert not INJECTED.search(body), body
    assert body.startswith("Pat Tester Subject: pwned registered in the emergency department")
    assert f"at {FACILITY_SHOWN}" in body
    assert "Chest pain Bcc: dx@evil.test" in body  # the diagnosis, whole, on its own line
    assert mail.message["Bcc"] is None and mail.message["X-Evil"] is None
    assert text["to"] == CC_PHONE
    assert not INJECTED.search(text["text"]), text["text"]
    assert "Pat Tester Subject: pwned" in text["text"]


# -- the plain email forward --------------------------------------------------------------------
FORWARD_ROUTES = """\
routes:
  - name: adt-mail
    when: {{type: ADT}}
    steps:
      - translate: v2-to-event
      - forward:
          channel: email
          name: desk
          host: 127.0.0.1
          port: {port}
          starttls: false
          sender: hub@carehub.test
          to: desk@clinic.test
          retry: {{max_attempts: 2, initial_delay: 0.05, max_delay: 0.1}}
"""


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[tuple[HubThread, Mailbox]]:
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        (tmp_path / "routes").mkdir()
        (tmp_path / "routes" / "mail.yaml").write_text(
            FORWARD_ROUTES.format(port=controller.port), encoding="utf-8"
        )
        config = local_config(worker=True)
        config.source = tmp_path / "carehub.yaml"
        config.routes = ["routes/*.yaml"]
        config.worker.poll_interval = 0.05
        with HubThread(config, tmp_path / "data") as running:
            yield running, box
    finally:
        controller.stop()


def test_the_plain_email_forward_keeps_each_summary_line_one_line(
    desk: tuple[HubThread, Mailbox],
) -> None:
    running, box = desk
    (answer,) = mllp_exchange(running.mllp_address, [_injected().encode()])
    assert b"MSA|AA|" in answer
    running.wait_for_deliveries(1)
    (mail,) = box.mails
    lines = mail.body.splitlines()
    assert not INJECTED.search(mail.body), mail.body
    assert len(lines) == 4, lines  # what happened, when, where, carehub's reference
    assert lines[2] == f"at {FACILITY_SHOWN} ED", lines


# -- the templates ------------------------------------------------------------------------------
def _templates(tmp_path: Path, **texts: str) -> MessageTemplates:
    loader = jinja2.DictLoader({f"{name}.txt": text for name, text in texts.items()})
    return MessageTemplates(ComponentContext(tmp_path, tmp_path), None, loader)


def test_every_printed_value_is_one_line(tmp_path: Path) -> None:
    templates = _templates(
        tmp_path,
        notice="Subject: About {{ name }}\n{{ name }} at {{ where | upper }} ({{ count }}, "
        "{{ missing }}, {{ nothing }}).\nNeeds: {{ needs | join(', ') }}\n",
    )
    subject, body = templates.render(
        "notice",
        "email",
        {
            "name": "Okafor\r\nBcc: a@evil.test\u2028X-Evil:\x001\x85",
            "where": "ward\x0b5",
            "count": 3,
            "nothing": None,
            "needs": ["food\nSubject: x", "housing"],
        },
    )
    assert subject == "About Okafor Bcc: a@evil.test X-Evil: 1"
    assert body == (
        "Okafor Bcc: a@evil.test X-Evil: 1  at WARD 5 (3, , None).\n"
        "Needs: food Subject: x, housing\n"
    )


def test_a_template_keeps_a_notes_lines_only_when_it_says_so(tmp_path: Path) -> None:
    templates = _templates(
        tmp_path,
        notice="Note: {{ note | multiline }}\nFlat: {{ note }}\nEmpty: {{ missing | multiline }}.",
    )
    _, body = templates.render(
        "notice", "email", {"note": "Call back Monday.\r\nBcc: a@evil.test\r\nAsk for Jo\x07"}
    )
    assert body == (
        "Note: Call back Monday.\n"
        f"{CONTINUATION}Bcc: a@evil.test\n"
        f"{CONTINUATION}Ask for Jo\n"
        "Flat: Call back Monday. Bcc: a@evil.test Ask for Jo \n"
        "Empty: .\n"
    )
