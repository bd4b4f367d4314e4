"""The notify-referral step's plan() on the sample referral (feed 07) and its acceptance (feed
19): who is told, on which channel, and that the community organisation gets only the minimum
necessary. The last test sends a planned notice through the real email channel to aiosmtpd."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from pydantic import ValidationError

from carehub.builtins.event_translator import translate_v2_to_event
from carehub.builtins.messaging import EmailChannel, SmsChannel
from carehub.components import ComponentContext, Work
from carehub.errors import ConfigError
from carehub.hl7.view import MessageView
from carehub.referrals.notices import ReferralNoticeConfig, ReferralNotifier
from carehub.referrals.state import ReferralTracker
from carehub.routing.config import RetryPolicy
from carehub.routing.dryrun import preview_message
from carehub.routing.router import PlannedDelivery
from carehub.routing.table import Destination

ROOT = Path(__file__).resolve().parents[1]
FEEDS = ROOT / "config" / "feeds"
REFERRAL = next(FEEDS.glob("07-*.hl7")).read_bytes()
ACCEPTED = next(FEEDS.glob("19-*.hl7")).read_bytes()
ROUTE = "sdoh-referrals"
REFERRER_NPI = "1184629371"
REFERRER_EMAIL = "haddad@riverside-clinic.test"
FOODBANK_EMAIL = "intake@foodbank.test"
PATIENT_PHONE = "217 5550142"

PROVIDERS = f"""\
providers:
  "{REFERRER_NPI}":
    name: Dr Samir Haddad
    organization: Riverside Clinic
    kind: practitioner
    channel: email
    address: {REFERRER_EMAIL}
  "1962574103":
    name: Dr Robin Placeholder
    kind: practitioner
    channel: sms
    address: "+1-217-555-0168"
"""
SMS_PROVIDERS = f"""\
providers:
  "{REFERRER_NPI}": {{name: Dr Samir Haddad, channel: sms, address: "+1-217-555-0199"}}
"""

FOOD = {"category": "food", "label": "Food insecurity", "evidence": ["Z59.41"]}
HOUSING = {"category": "housing", "label": "Housing instability", "evidence": ["Z59.811"]}


def _match(**extra: Any) -> dict[str, Any]:
    return {
        "rank": 1,
        "score": 9.5,
        "service_id": "svc-scfb-pantry",
        "service": "Emergency Food Pantry",
        "organization": "Springfield Community Food Bank",
        "organization_id": "org-scfb",
        "needs": ["food"],
        "phone": "217-555-0100",
        "url": "https://foodbank.example.org",
        "reasons": ["serves food (FOOD-PANTRY)"],
        **extra,
    }


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def context(tmp_path: Path) -> ComponentContext:
    (tmp_path / "providers.yaml").write_text(PROVIDERS, encoding="utf-8")
    (tmp_path / "sms-providers.yaml").write_text(SMS_PROVIDERS, encoding="utf-8")
    return ComponentContext(config_dir=tmp_path, data_dir=tmp_path)


def _destinations(
    context: ComponentContext, smtp_port: int = 25, *channels: str
) -> dict[str, Destination]:
    built: dict[str, Destination] = {}
    for key in channels or ("email", "sms"):
        if key == "email":
            options = EmailChannel.Options.model_validate(
                {
                    "host": "127.0.0.1",
                    "port": smtp_port,
                    "starttls": False,
                    "sender": "referrals@carehub.test",
                }
            )
            channel: Any = EmailChannel(options, context)
        else:
            options = SmsChannel.Options.model_validate({"url": "http://127.0.0.1:9/sms"})
            channel = SmsChannel(options, context)
        built[key] = Destination(f"{ROUTE}/notify-referral-{key}", channel, RetryPolicy())
    return built


def _notifier(
    context: ComponentContext,
    *,
    channels: tuple[str, ...] = ("email", "sms"),
    smtp_port: int = 25,
    **settings: Any,
) -> ReferralNotifier:
    config = ReferralNoticeConfig.model_validate(
        {
            "channels": {key: {"channel": key} for key in channels},
            "providers": "providers.yaml",
            **settings,
        }
    )
    return ReferralNotifier(ROUTE, config, _destinations(context, smtp_port, *channels), context)


def _work(
    tracker: ReferralTracker, raw: bytes, message_id: int, resources: dict[str, Any] | None = None
) -> Work:
    """A Work as the route has it after translate, referral-state (in memory) and, for a new
    referral, community-resources (given by hand)."""
    message = preview_message(raw, message_id)
    work = Work(message=message, route=ROUTE, v2=message.text)
    work.event = translate_v2_to_event(MessageView(message.text))
    work.data["referral"] = tracker.apply_message(work.event, message.id, identity=message.identity)
    if resources is not None:
        work.data["community_resources"] = resources
    return work


def _with_phone(raw: bytes) -> bytes:
    """Feed 07 with a home phone in PID-13 (the sample has none)."""
    return raw.replace(b"62704^USA", b"62704^USA||^PRN^PH^^^217^5550142")


@pytest.fixture
def tracker() -> ReferralTracker:
    return ReferralTracker(None)


def _body(delivery: PlannedDelivery) -> str:
    return delivery.outgoing.payload.decode("utf-8")


# -- the community organisation: a new referral ----------------------------------------------


def test_new_referral_goes_to_the_top_match_email_with_minimum_necessary(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    resources = {"needs": [FOOD, HOUSING], "matches": [_match(email=FOODBANK_EMAIL)]}
    work = _work(tracker, _with_phone(REFERRAL), 1, resources)
    planned, decisions = _notifier(context).plan(work, 1)

    assert [d["role"] for d in decisions] == ["organization"]  # the referrer is not told yet
    assert len(planned) == 1
    delivery = planned[0]
    meta = delivery.outgoing.metadata
    assert meta["to"] == FOODBANK_EMAIL
    assert meta["subject"] == "New referral RGH-R-2026-0042 from Dr Samir Haddad"
    assert meta["reply_to"] == REFERRER_EMAIL  # the CBO answers the referrer directly
    assert delivery.destination == f"{ROUTE}/notify-referral-email"
    assert delivery.channel == "email"
    assert delivery.order_key == "RGH|RG100234"
    assert decisions[0]["status"] == "queued"
    assert decisions[0]["delivery_key"] == delivery.outgoing.idempotency_key

    body = _body(delivery)
    for expected in (
        "Springfield Community Food Bank",
        "Referral: RGH-R-2026-0042",
        "Patient: Amara Okafor",
        "Date of birth: 1958-03-12",
        f"Phone: {PATIENT_PHONE}",
        "Needs: Food insecurity\n",
        "Consent: NOT STATED. The referral does not say that the patient agreed",
        f"Referrer contact: Dr Samir Haddad, Riverside Clinic ({REFERRER_EMAIL})",
    ):
        assert expected in body, expected
    # A food bank is told only of the need it serves (minimum necessary).
    assert "Housing instability" not in body


def test_new_referral_body_carries_no_codes_or_clinical_data(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    resources = {"needs": [FOOD, HOUSING], "matches": [_match(email=FOODBANK_EMAIL)]}
    work = _work(tracker, REFERRAL, 1, resources)
    planned, _ = _notifier(context).plan(work, 1)
    text = _body(planned[0]) + planned[0].outgoing.metadata["subject"]

    assert "Z59" not in text  # no ICD-10 codes, even those the need was found from
    assert "I10" not in text
    assert "with risk of homelessness" not in text  # the diagnosis text, not the category
    assert "after discharge" not in text  # RF1-10 free-text reason: may be clinical
    assert "RG100234" not in text  # no MRN
    assert "Birch Lane" not in text  # no home address
    assert "Phone: not given" in text  # the sample has no PID-13


@pytest.mark.parametrize("key", ["org-scfb", "springfield community food bank", "svc-scfb-pantry"])
def test_fallback_address_by_organisation_id_or_name(
    context: ComponentContext, tracker: ReferralTracker, key: str
) -> None:
    resources = {"needs": [FOOD], "matches": [_match()]}  # HSDS gave no email
    work = _work(tracker, REFERRAL, 1, resources)
    planned, decisions = _notifier(context, organizations={key: FOODBANK_EMAIL}).plan(work, 1)

    assert [p.outgoing.metadata["to"] for p in planned] == [FOODBANK_EMAIL]
    assert decisions[0]["recipient"] == "org:org-scfb"


def test_no_address_for_the_organisation_is_suppressed_with_the_reason(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    work = _work(tracker, REFERRAL, 1, {"needs": [FOOD], "matches": [_match()]})
    planned, decisions = _notifier(context, organizations={"other": "x@other.test"}).plan(work, 1)

    assert planned == []
    assert decisions[0]["status"] == "suppressed"
    assert "no email for Springfield Community Food Bank" in decisions[0]["reason"]


def test_without_matches_the_referred_to_party_is_the_organisation(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    work = _work(tracker, REFERRAL, 1, {"needs": [], "matches": []})
    notifier = _notifier(context, organizations={"Springfield Community Food Bank": FOODBANK_EMAIL})
    planned, _ = notifier.plan(work, 1)

    assert [p.outgoing.metadata["to"] for p in planned] == [FOODBANK_EMAIL]
    assert "Needs: not stated" in _body(planned[0])


def test_a_higher_ranked_other_organisation_never_gets_the_referral(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    """As on the sample directory: another CBO outranks the one the referral names (RT)."""
    other = _match(
        organization="Comunidad Unida Springfield",
        organization_id="org-cus",
        email="intake@comunidad.test",
    )
    resources = {"needs": [FOOD, HOUSING], "matches": [other, _match(rank=2)]}
    work = _work(tracker, REFERRAL, 1, resources)
    notifier = _notifier(context, organizations={"org-scfb": FOODBANK_EMAIL})
    planned, decisions = notifier.plan(work, 1)

    assert [p.outgoing.metadata["to"] for p in planned] == [FOODBANK_EMAIL]
    assert decisions[0]["recipient"] == "org:org-scfb"
    assert "Comunidad" not in _body(planned[0])


def test_named_organisation_without_an_address_is_not_replaced_by_the_top_match(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    other = _match(organization="Comunidad Unida Springfield", email="intake@comunidad.test")
    work = _work(tracker, REFERRAL, 1, {"needs": [FOOD], "matches": [other]})
    planned, decisions = _notifier(context).plan(work, 1)

    assert planned == []
    assert decisions[0]["recipient"] == "org:Springfield Community Food Bank"
    assert decisions[0]["status"] == "suppressed"


def test_a_referral_naming_no_organisation_goes_to_the_top_match(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    no_rt = b"\r".join(line for line in REFERRAL.split(b"\r") if not line.startswith(b"PRD|RT"))
    resources = {"needs": [FOOD], "matches": [_match(email=FOODBANK_EMAIL), _match(rank=2)]}
    work = _work(tracker, no_rt, 1, resources)
    planned, _ = _notifier(context).plan(work, 1)

    assert [p.outgoing.metadata["to"] for p in planned] == [FOODBANK_EMAIL]


def test_a_resent_referral_is_not_sent_again(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    resources = {"needs": [FOOD], "matches": [_match(email=FOODBANK_EMAIL)]}
    notifier = _notifier(context)
    first, _ = notifier.plan(_work(tracker, REFERRAL, 1, resources), 1)
    # The same I12 again under a new control id: the tracker calls it a resend.
    resend = REFERRAL.replace(b"RGH-REF-7001", b"RGH-REF-7002")
    again, decisions = notifier.plan(_work(tracker, resend, 2, resources), 1)

    assert len(first) == 1
    assert again == [] and decisions == []


def test_tell_referrer_only_skips_the_organisation(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    work = _work(tracker, REFERRAL, 1, {"needs": [FOOD], "matches": [_match(email="a@b.test")]})
    planned, decisions = _notifier(context, tell=["referrer"]).plan(work, 1)
    assert planned == [] and decisions == []


# -- the referring provider: the answer --------------------------------------------------------


def test_acceptance_tells_the_referrer_by_the_directory_channel(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    notifier = _notifier(context, organizations={"org-scfb": FOODBANK_EMAIL})
    _work(tracker, REFERRAL, 1, {"needs": [FOOD], "matches": [_match()]})
    work = _work(tracker, ACCEPTED, 2)
    assert work.data["referral"].notify_referrer is True

    planned, decisions = notifier.plan(work, 1)

    assert [(d["recipient"], d["role"], d["status"]) for d in decisions] == [
        (f"npi:{REFERRER_NPI}", "referrer", "queued")
    ]
    (delivery,) = planned
    meta = delivery.outgoing.metadata
    assert meta["to"] == REFERRER_EMAIL
    assert meta["subject"] == "Referral RGH-R-2026-0042 accepted by Springfield Community Food Bank"
    assert meta["recipient_name"] == "Dr Samir Haddad"
    assert "reply_to" not in meta
    body = _body(delivery)
    assert "has accepted your referral RGH-R-2026-0042 for Amara Okafor (born 1958-03-12)" in body
    assert "Status: accepted (was sent)" in body
    assert "Intake appointment booked for Monday 10:00" in body  # the NTE from the food bank


def test_referrer_by_sms_gets_no_patient_details(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    notifier = _notifier(context, providers="sms-providers.yaml")
    _work(tracker, REFERRAL, 1)
    (delivery,), _ = notifier.plan(_work(tracker, ACCEPTED, 2), 1)

    assert delivery.channel == "sms"
    assert delivery.outgoing.metadata["to"] == "+1-217-555-0199"
    body = _body(delivery)
    assert "RGH-R-2026-0042 accepted by Springfield Community Food Bank" in body
    assert "Okafor" not in body and "1958" not in body


def test_no_referrer_notice_before_the_receiving_side_answers(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    work = _work(tracker, REFERRAL, 1, {"needs": [], "matches": []})
    assert work.data["referral"].notify_referrer is False
    _, decisions = _notifier(context, tell=["referrer"]).plan(work, 1)
    assert decisions == []


def test_an_answer_for_an_unknown_referral_tells_nobody(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    work = _work(tracker, ACCEPTED, 2)  # no I12 on file: refused by the tracker
    assert work.data["referral"].accepted is False
    assert _notifier(context).plan(work, 1) == ([], [])


def test_referrer_missing_from_the_directory_is_suppressed(
    context: ComponentContext, tracker: ReferralTracker, tmp_path: Path
) -> None:
    (tmp_path / "empty.yaml").write_text("providers: {}\n", encoding="utf-8")
    notifier = _notifier(context, providers="empty.yaml")
    _work(tracker, REFERRAL, 1)
    planned, decisions = notifier.plan(_work(tracker, ACCEPTED, 2), 1)

    assert planned == []
    assert decisions[0]["status"] == "suppressed"
    assert decisions[0]["reason"] == f"referring NPI {REFERRER_NPI} not in the provider directory"


def test_referrer_channel_not_on_the_step_is_suppressed(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    notifier = _notifier(context, channels=("email",), providers="sms-providers.yaml")
    _work(tracker, REFERRAL, 1)
    planned, decisions = notifier.plan(_work(tracker, ACCEPTED, 2), 1)

    assert planned == []
    assert decisions[0]["reason"] == "no 'sms' channel on the notify-referral step"


def test_delivery_keys_are_stable_per_message_run_and_recipient(
    context: ComponentContext, tracker: ReferralTracker
) -> None:
    notifier = _notifier(context)
    _work(tracker, REFERRAL, 1)
    work = _work(tracker, ACCEPTED, 2)
    first, _ = notifier.plan(work, 1)
    again, _ = notifier.plan(work, 1)  # re-planned after a crash: the outbox dedups the key
    rerun, _ = notifier.plan(work, 2)  # an operator's re-route is a new run

    assert first[0].outgoing.idempotency_key == again[0].outgoing.idempotency_key
    assert first[0].outgoing.idempotency_key != rerun[0].outgoing.idempotency_key
    assert first[0].outgoing.idempotency_key.startswith("carehub-2-1-")


# -- configuration -----------------------------------------------------------------------------


def test_plan_without_referral_state_is_an_error(context: ComponentContext) -> None:
    message = preview_message(REFERRAL, 1)
    work = Work(message=message, route=ROUTE, v2=message.text)
    with pytest.raises(ValueError, match="referral-state"):
        _notifier(context).plan(work, 1)


def test_config_rejects_unknown_keys_and_parties() -> None:
    with pytest.raises(ValidationError):
        ReferralNoticeConfig.model_validate({"channels": {"email": {}}, "recipients": []})
    with pytest.raises(ValidationError):
        ReferralNoticeConfig.model_validate({"channels": {"email": {}}, "tell": ["patient"]})


def test_missing_provider_directory_is_a_start_up_error(context: ComponentContext) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        _notifier(context, providers="nowhere.yaml")


# -- the real email channel ------------------------------------------------------------------


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, _Inbox]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inbox = _Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, inbox
    finally:
        controller.stop()


def test_organisation_notice_arrives_by_email(
    context: ComponentContext, tracker: ReferralTracker, smtp: tuple[int, _Inbox]
) -> None:
    port, inbox = smtp
    notifier = _notifier(context, channels=("email",), smtp_port=port)
    resources = {"needs": [FOOD], "matches": [_match(email=FOODBANK_EMAIL)]}
    (delivery,), _ = notifier.plan(_work(tracker, REFERRAL, 1, resources), 1)
    channel = notifier.destinations["email"].channel

    async def send() -> None:
        await channel.start()
        await channel.send(delivery.outgoing)

    asyncio.run(send())

    ((rcpts, message),) = inbox.messages
    assert rcpts == [FOODBANK_EMAIL]
    assert message["Subject"] == "New referral RGH-R-2026-0042 from Dr Samir Haddad"
    assert message["Reply-To"] == REFERRER_EMAIL
    text = message.get_content()
    assert "Consent: NOT STATED." in text and "agreed to this referral" not in text
    assert "Z59" not in text
