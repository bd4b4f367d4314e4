"""Registers the care-transition components: the encounter-state, care-team and
follow-up-clock enrichers, and the `encounters` and `followups` commands. (The email and sms
channels they notify through are in carehub.builtins.messaging.)"""

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

    register(EncounterStateEnricher)
    register(CareTeamEnricher)
    register(FollowupEnricher)


@hookimpl
def carehub_register_commands(register: Callable[[click.Command], None]) -> None:
    from carehub.care.encounters_cli import encounters
    from carehub.care.followup import followups

    register(encounters)
    register(followups)
