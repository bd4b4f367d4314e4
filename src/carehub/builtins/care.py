"""Registers the care-coordination components: the encounter-state, care-team,
follow-up-clock and referral-state enrichers, and the `encounters`, `followups` and
`referrals` commands. (The email and sms channels they notify through are in
carehub.builtins.messaging.)"""

from __future__ import annotations

from collections.abc import Callable

import click

from carehub.components import Enricher
from carehub.hookspecs import hookimpl


@hookimpl
def carehub_register_enrichers(register: Callable[[type[Enricher]], None]) -> None:
    from carehub.care.encounters import EncounterStateEnricher
    from carehub.care.followup import FollowupEnricher
    from carehub.care.roster import CareTeamEnricher
    from carehub.referrals.state import ReferralStateEnricher

    register(EncounterStateEnricher)
    register(CareTeamEnricher)
    register(FollowupEnricher)
    register(ReferralStateEnricher)


@hookimpl
def carehub_register_commands(register: Callable[[click.Command], None]) -> None:
    from carehub.care.encounters_cli import encounters
    from carehub.care.followup import followups
    from carehub.referrals.cli import referrals

    register(encounters)
    register(followups)
    register(referrals)
