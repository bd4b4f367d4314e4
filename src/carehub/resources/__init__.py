"""Community resources: match a patient's social needs to services in an Open Referral HSDS
directory (a local export or an HSDS 3.0 API), ranked with the reasons a coordinator needs.

- :mod:`carehub.resources.hsds` -- the HSDS data model, ``LocalDirectory`` and ``ApiDirectory``;
- :mod:`carehub.resources.matching` -- the need crosswalk, postal code distances, the ranking
  rule and the ``community-resources`` enricher;
- :mod:`carehub.resources.cli` -- ``carehub resources search``.

This module is also a carehub plugin: its hooks register the enricher and the command, with the
imports inside the hooks so loading plugins stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable

import click

from carehub.components import Enricher
from carehub.hookspecs import hookimpl


@hookimpl
def carehub_register_enrichers(register: Callable[[type[Enricher]], None]) -> None:
    from carehub.resources.matching import CommunityResourcesEnricher

    register(CommunityResourcesEnricher)


@hookimpl
def carehub_register_commands(register: Callable[[click.Command], None]) -> None:
    from carehub.resources.cli import resources

    register(resources)
