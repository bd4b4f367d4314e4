"""Registers the care-transition components: the encounter-state, care-team and
follow-up-clock enrichers, the email and sms channels, and the `encounters` and `followups`
commands."""

from __future__ import annotations

from collections.abc import Callable

import click

from carehub.components import Channel, Enricher
from carehub.hookspecs import hookimpl


@hookimpl
def carehub_register_enrichers(register: Callable[[type[Enricher]], None]) -> None:
    from carehub.care.encounters import EncounterStateEnricher
    from carehub.care.followup import FollowupEnricher
    from carehub.care.roster import CareTeamEnricher

    register(EncounterStateEnricher)
    register(CareTeamEnricher)
    register(FollowupEnricher)


@hookimpl
def carehub_register_channels(register: Callable[[type[Channel]], None]) -> None:
    from carehub.builtins.messaging import EmailChannel, SmsChannel

    register(EmailChannel)
    register(SmsChannel)


@hookimpl
def carehub_register_commands(register: Callable[[click.Command], None]) -> None:
    from carehub.care.encounters_cli import encounters
    from carehub.care.followup import followups

    register(encounters)
    register(followups)
