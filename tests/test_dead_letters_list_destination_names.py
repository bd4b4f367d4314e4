"""`dead-letters list --destination NAME` with a name neither the routes nor any delivery has is
an error naming the destinations there are, as `destinations pause` gives: a name mistyped at
3 am must not read as "there are none at all". A destination removed from the routes whose
deliveries are still in the store lists as before.

The README's recipes name the sample config's destinations and senders, so that followed on
the sample they do what they say.

A real hub makes the dead letter, sending to a real HTTP receiver that is down; the operator's
side is the real CLI, run on the route files as they are on disk."""

from __future__ import annotations

import re
from pathlib import Path

from carehub.config import load_config
from carehub.hl7.charsets import decode_message
from carehub.hub import build_routing
from carehub.testing import HubThread
from tests import test_dead_letter_order
from tests.helpers_http import HTTPServer
from tests.test_dead_letter_order import (
    DESTINATION,
    TWO_TRIES,
    cli,
    delivery_of,
    hub_config,
    outage,
)

receiver = test_dead_letter_order.receiver

ROOT = Path(__file__).resolve().parent.parent

#: The placeholders the README's command reference writes (``--destination D``).
PLACEHOLDERS = {"D", "NAME", "APP"}

#: The routes after the EHR forward is taken out: another forward in its place.
WITHOUT_EHR = """
routes:
  - name: adt
    when: {{type: ADT}}
    steps:
      - forward: {{channel: webhook, name: archive, url: "{url}"}}
"""


def test_an_unknown_destination_is_an_error_and_a_removed_one_still_lists(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir) as hub:
        outage(hub, receiver)  # the A01 is a dead letter of adt/ehr
        dead = delivery_of(hub.store, "RGH-O-0001")

    for discarded in ([], ["--discarded"]):
        typo = cli(
            config, data_dir, "dead-letters", "list", "--destination", "adt/ehrr", *discarded
        )
        assert typo.exit_code == 2, typo.output
        assert "unknown destination 'adt/ehrr'; the routes have: adt/ehr" in typo.output
    nothing_dead = cli(
        config, data_dir, "dead-letters", "list", "--destination", DESTINATION, "--discarded"
    )
    assert nothing_dead.exit_code == 0, nothing_dead.output

    # adt/ehr taken out of the routes: its dead letter is still listed by its name.
    (tmp_path / "routes.yaml").write_text(WITHOUT_EHR.format(url=receiver.url()), "utf-8")
    listed = cli(config, data_dir, "dead-letters", "list", "--destination", DESTINATION)
    assert listed.exit_code == 0, listed.output
    assert f"{dead.id} " in listed.output and DESTINATION in listed.output
    discarded_none = cli(
        config, data_dir, "dead-letters", "list", "--destination", DESTINATION, "--discarded"
    )
    assert discarded_none.exit_code == 0, discarded_none.output
    # The new forward has no deliveries yet, but the routes have it: "none", not an error.
    empty = cli(config, data_dir, "dead-letters", "list", "--destination", "adt/archive")
    assert empty.exit_code == 0, empty.output
    assert "no dead letters for destination 'adt/archive'" in empty.output
    assert f"dead letters are waiting for: {DESTINATION} (1)" in empty.output
    gone = cli(config, data_dir, "dead-letters", "list", "--destination", "adt/ehrr")
    assert gone.exit_code == 2, gone.output
    assert "unknown destination 'adt/ehrr'; the routes have: adt/archive" in gone.output


def test_an_unknown_name_with_routes_that_cannot_load_says_both(
    tmp_path: Path, receiver: HTTPServer
) -> None:
    config = hub_config(tmp_path, receiver.url(), TWO_TRIES)
    data_dir = tmp_path / "data"
    with HubThread(load_config(config), data_dir):
        pass  # the store, empty
    broken = WITHOUT_EHR.format(url="${CAREHUB_TEST_NEVER_SET_URL}")
    (tmp_path / "routes.yaml").write_text(broken, "utf-8")
    result = cli(config, data_dir, "dead-letters", "list", "--destination", "adt/ehrr")
    assert result.exit_code == 2, result.output
    assert "no delivery in the store is for destination 'adt/ehrr'" in result.output
    assert "CAREHUB_TEST_NEVER_SET_URL" in result.output


# -- the README's recipes, on the sample config ---------------------------------------------------
def readme_names(pattern: str) -> set[str]:
    """What ``pattern``'s group captures in the README's commands, placeholders left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = {match.group(1) for match in re.finditer(pattern, text)}
    return found - PLACEHOLDERS


def test_the_readme_recipes_name_the_sample_configs_destinations_and_senders(
    tmp_path: Path,
) -> None:
    _, table = build_routing(load_config(ROOT / "config" / "carehub.yaml"), tmp_path / "data")
    named = readme_names(r"--destination ([\w./-]+)") | readme_names(
        r"carehub destinations (?:pause|resume) ([\w./-]+)"
    )
    assert named, "the README has recipes naming destinations"
    assert named <= set(table.destinations), named - set(table.destinations)

    senders = set()
    for feed in (ROOT / "config" / "feeds").glob("*.hl7"):
        msh = decode_message(feed.read_bytes()).text.split("\r", 1)[0].split("|")
        senders |= {msh[2], f"{msh[2]}^{msh[3]}", f"^{msh[3]}"}
    named_senders = readme_names(r"--sender ([\w^]+)")
    assert named_senders, "the README has a recipe naming a sender"
    assert named_senders <= senders, named_senders - senders
