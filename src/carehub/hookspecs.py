"""The hooks carehub calls. A plugin implements any of them with ``@hookimpl``:

    from carehub import hookimpl

    @hookimpl
    def carehub_register_channels(register):
        register(PagerChannel)

Registration hooks (``carehub_register_translators``, ``_enrichers``, ``_channels``,
``_commands``) run once at start-up; one that raises (or registers a component that breaks
the contract) fails its own plugin's loading only. Observer hooks
(``carehub_message_received``, ``_routed``, ``_delivered``, ``_skipped``, ``_failed``) run
for every message or delivery and must be quick; an observer that raises is logged and never
affects the message. ``carehub_run_step`` wraps every translate and enrich step. Every hook
is a plain ``def`` (carehub calls them without awaiting: an ``async def`` one is refused at
load). Every hook is documented in docs/hooks/ with its arguments, when it is called, an
example and the release it appeared in (HOOK_VERSIONS below).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
import pluggy

if TYPE_CHECKING:
    from carehub.components import Channel, Enricher, Translator, Work
    from carehub.store.outbox import DeliveryRecord
    from carehub.store.store import StoredMessage

hookspec = pluggy.HookspecMarker("carehub")
hookimpl = pluggy.HookimplMarker("carehub")


# -- registration (once, at start-up) ---------------------------------------------------------
@hookspec
def carehub_register_translators(register: Callable[[type[Translator]], None]) -> None:
    """Register Translator classes, e.g. ``register(V2ToEvent)``."""


@hookspec
def carehub_register_enrichers(register: Callable[[type[Enricher]], None]) -> None:
    """Register Enricher classes, e.g. ``register(CareTeamEnricher)``."""


@hookspec
def carehub_register_channels(register: Callable[[type[Channel]], None]) -> None:
    """Register Channel classes (forwarders), e.g. ``register(WebhookChannel)``."""


@hookspec
def carehub_register_commands(register: Callable[[click.Command], None]) -> None:
    """Register click commands that appear under ``carehub``, e.g. ``register(my_report)``."""


# -- observers (every message; must be quick; exceptions are logged, never propagated) ---------
@hookspec
def carehub_message_received(message: StoredMessage) -> None:
    """A message was stored and acknowledged AA and is about to be routed."""


@hookspec
def carehub_message_routed(message: StoredMessage, routes: list[str]) -> None:
    """A message went through routing; ``routes`` names the routes it matched (may be empty)."""


@hookspec
def carehub_message_delivered(delivery: DeliveryRecord) -> None:
    """A delivery reached its destination; ``delivery.receipt`` says how it was accepted."""


@hookspec
def carehub_message_skipped(delivery: DeliveryRecord) -> None:
    """A channel found nothing to send for a delivery (it raised ``NothingToSend``): settled
    as ``skipped``, with the channel's reason in ``delivery.receipt``."""


@hookspec
def carehub_message_failed(delivery: DeliveryRecord, error: str, final: bool) -> None:
    """A delivery attempt failed; ``final`` is True when it went to the dead letters."""


# -- tracing (one wrapper around every step) --------------------------------------------------
@hookspec(firstresult=True)
def carehub_run_step(work: Work, step: str, run: Callable[[], Any]) -> Any:
    """Runs one translate or enrich step (filters and forwards are carehub's own bookkeeping).
    carehub's implementation calls ``run()``; a plugin wraps it with
    ``@hookimpl(wrapper=True)`` to time or trace steps (a plain ``@hookimpl`` is refused at
    load: what it returned would replace every step's output):

        @hookimpl(wrapper=True)
        def carehub_run_step(work, step, run):
            started = time.perf_counter()
            try:
                return (yield)
            finally:
                record(step, time.perf_counter() - started)
    """


#: The carehub release each hook first appeared in. Within a release series hooks and their
#: arguments are only ever added, never removed or renamed; a plugin that implements a hook
#: newer than the oldest carehub it supports marks it ``@hookimpl(optionalhook=True)``, which
#: an older carehub skips instead of refusing the plugin (docs/plugins.md, "Versions").
HOOK_VERSIONS: dict[str, str] = {
    "carehub_register_translators": "0.1.0",
    "carehub_register_enrichers": "0.1.0",
    "carehub_register_channels": "0.1.0",
    "carehub_register_commands": "0.1.0",
    "carehub_message_received": "0.1.0",
    "carehub_message_routed": "0.1.0",
    "carehub_message_delivered": "0.1.0",
    "carehub_message_skipped": "0.3.0",
    "carehub_message_failed": "0.1.0",
    "carehub_run_step": "0.1.0",
}


__all__ = ["HOOK_VERSIONS", "hookimpl", "hookspec"]
