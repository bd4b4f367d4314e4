"""The route table: route configs bound to built component instances, ready to run.

Binding validates every step's options against its component's ``Options`` model, so a typo
in any route is reported, with file, line, route and key, before the hub takes a message.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from carehub.builtins.http_channel import LocalCleartext
from carehub.care.encounters import EncounterStateEnricher
from carehub.care.notify import Notifier, NotifyConfig
from carehub.care.roster import CareTeamEnricher
from carehub.components import Channel, Component, ComponentContext, Enricher, Translator
from carehub.config import _loc_text, explain_error
from carehub.errors import ConfigError
from carehub.plugins import FailureKind, PluginHost
from carehub.referrals.notices import ReferralNoticeConfig, ReferralNotifier
from carehub.routing.conditions import When
from carehub.routing.config import (
    ForwardConfig,
    LoadedRoute,
    RetryPolicy,
    RouteSource,
    StepConfig,
)
from carehub.store.failure_run import FailureRun

if TYPE_CHECKING:
    from carehub.store.store import MessageStore

log = logging.getLogger(__name__)

#: Seconds between the log's reminders that a component's tick() keeps failing.
TICK_REPORT_SECONDS = 60.0


@dataclass(slots=True)
class Destination:
    """A forward step's channel instance, its unique name and its retry policy."""

    name: str
    channel: Channel
    retry: RetryPolicy
    plugin: str | None = None  # the plugin that registered the channel
    #: The forward's allow_cleartext: sending in clear to this machine is accepted.
    allow_cleartext: bool = False
    #: The line its deliveries keep each patient's order in, and that its dead letters hold:
    #: its own name, or, for forwards that reach one receiving system, the line they share
    #: (see share_lines). Set by bind_routes.
    line: str = ""
    #: For a forward, the receiving system it reaches, as receiving_system() writes it.
    endpoint: str | None = None


@dataclass(slots=True)
class BoundStep:
    kind: str  # translate | enrich | filter | forward | notify
    label: str  # e.g. "translate v2-to-event", "forward webhook care-platform"
    component: Component | None = None
    condition: When | None = None
    destination: Destination | None = None
    notifier: Notifier | ReferralNotifier | None = None
    #: Where the step is written, as (steps, position, key), for errors about it.
    loc: tuple[Any, ...] = ()
    plugin: str | None = None  # the plugin that registered ``component``


@dataclass(slots=True)
class Route:
    name: str
    when: When
    steps: list[BoundStep]
    source: RouteSource
    description: str = ""


@dataclass(slots=True)
class RouteTable:
    routes: list[Route] = field(default_factory=list)
    destinations: dict[str, Destination] = field(default_factory=dict)
    #: Names earlier versions gave forwards written without ``name:`` (ROUTE/CHANNEL-POSITION)
    #: -> the name they have now, so deliveries stored under the old name still go out.
    former_names: dict[str, str] = field(default_factory=dict)
    #: What start() found that will not stop routing but loses notices or sends patient
    #: data unprotected (logged as warnings; `routes check` prints them).
    start_warnings: list[str] = field(default_factory=list)
    #: Each line that several forwards share, by its name: those forwards (see share_lines).
    shared_lines: dict[str, list[Destination]] = field(default_factory=dict)
    #: Per step whose tick() fails: its run of failures, for the log (see _tick_one).
    _tick_runs: dict[str, FailureRun] = field(default_factory=dict, repr=False)

    def destination(self, name: str) -> Destination | None:
        """The destination a delivery was planned for, by its current or former name."""
        found = self.destinations.get(name)
        if found is None and name in self.former_names:
            found = self.destinations.get(self.former_names[name])
        return found

    def lines(self) -> dict[str, str]:
        """Each destination's line by its name, former names included (RouteTable.destination):
        what the outbox puts its waiting deliveries and dead letters in when routes load."""
        found = {name: d.line or name for name, d in self.destinations.items()}
        for former, current in self.former_names.items():
            if current in self.destinations:
                found[former] = found[current]
        return found

    def shared_line_text(self) -> list[str]:
        """One line per shared line, for `routes check` and the start's log: its name, the
        forwards in it and the receiving system they reach (no credentials)."""
        return [
            f"shared line {line}: {', '.join(d.name for d in forwards)} ({forwards[0].endpoint})"
            for line, forwards in sorted(self.shared_lines.items())
        ]

    def components(self) -> list[Component]:
        built: list[Component] = []
        for route in self.routes:
            for step in route.steps:
                if step.component is not None:
                    built.append(step.component)
                elif step.destination is not None:
                    built.append(step.destination.channel)
                elif step.notifier is not None:
                    built += [d.channel for d in step.notifier.destinations.values()]
        return built

    def steps_that_may_block(self) -> list[str]:
        """The translate and enrich steps whose component may wait on something outside
        carehub for each message (Component.may_block), as "route: step": while there are
        any, the worker routes on a helper thread rather than on the hub's event loop."""
        return [
            f"{route.name}: {step.label}"
            for route in self.routes
            for step in route.steps
            if step.component is not None and step.component.may_block()
        ]

    def notifiers(self) -> list[Notifier | ReferralNotifier]:
        return [s.notifier for r in self.routes for s in r.steps if s.notifier is not None]

    def attach_store(self, store: MessageStore) -> None:
        """Give every component the open store (the hub opens it after binding routes)."""
        for component in self.components():
            component.context.store = store

    def tick(self, now: datetime) -> None:
        """Run every component's and notifier's periodic work, each on its own: one that
        raises is logged naming its step and plugin (see _tick_one) and the others, the
        built-ins included, still do theirs."""
        for where, component in self._placed():
            self._tick_one(where, component, now)
        for route in self.routes:
            for position, step in enumerate(route.steps):
                if step.notifier is not None:
                    self._tick_one(
                        _step_where(route, position, step, step.label), step.notifier, now
                    )

    def _tick_one(
        self, where: str, ticking: Component | Notifier | ReferralNotifier, now: datetime
    ) -> None:
        """One tick, its failures logged as a run per step (first one at ERROR, then at most
        one line a TICK_REPORT_SECONDS with the count): the exception's type only, since its
        text can quote a message; the traceback at DEBUG."""
        run = self._tick_runs.get(where)
        try:
            ticking.tick(now)
        except Exception as err:
            if run is None:
                run = self._tick_runs[where] = FailureRun(
                    f"{where}: tick()",
                    "tried again at the next tick",
                    "tick(s)",
                    report_every=TICK_REPORT_SECONDS,
                    logger=log,
                    traceback=False,
                )
            log.debug("%s: tick() raised", where, exc_info=err)
            run.failed(FailureKind(type(err).__name__))
        else:
            if run is not None:
                run.succeeded()

    async def start(self) -> None:
        """Start every component; when one cannot start, close those already started (their
        sessions and files) before raising why, as a ConfigError naming the route file and
        line, the route and the step: after it, a ConfigError's own words (a missing roster
        file); for anything else, a bug or an unforeseen failure, the plugin and the error,
        with the traceback logged at DEBUG."""
        started: list[tuple[str, Component]] = []
        try:
            for where, component in self._placed():
                try:
                    await component.start()
                except ConfigError as err:
                    raise ConfigError(f"{where}: {err}") from err
                except Exception as err:
                    problem = f"{where} failed to start"
                    log.debug("%s", problem, exc_info=True)
                    raise ConfigError(f"{problem}: {_failure_text(err)}") from err
                started.append((where, component))
        except BaseException:
            for where, component in reversed(started):
                await _close_one(where, component)
            raise
        self.start_warnings = self._unreachable_recipients() + self._unprotected_destinations()
        for warning in self.start_warnings:
            log.warning("%s", warning)
        for shared in self.shared_line_text():
            log.info("%s: one receiving system, so one order per patient for them all", shared)

    def _unreachable_recipients(self) -> list[str]:
        """Routes whose roster or provider directory (read at start) reach someone by a
        channel the route's notify step lacks: those recipients would be suppressed on every
        notice, "no 'webhook' channel", found only by reading the notifications."""
        warnings: list[str] = []
        for route in self.routes:
            for step in route.steps:
                notifier = step.notifier
                if not isinstance(notifier, Notifier) or notifier.care_team is None:
                    continue
                for channel, named_in in sorted(notifier.care_team.channels_in_use().items()):
                    if channel not in notifier.destinations:
                        warnings.append(
                            f"{route.source.where(step.loc)}: route {route.name!r}: "
                            f"{named_in.name} reaches recipients by {channel!r}, but the "
                            f"notify step has no {channel!r} channel: they will never be told "
                            f"(add one under notify.channels, or change their channel)"
                        )
        return warnings

    def _unprotected_destinations(self) -> list[str]:
        """One line per destination that its channel says would be sent to in clear or
        without checking the server (Channel.unprotected_transport): on another machine, or
        on a port of this one any local account may bind (LocalCleartext), unless that
        destination's allow_cleartext accepts the latter."""
        accepted = {id(d.channel) for d in self.destinations.values() if d.allow_cleartext}
        return [
            f"{where}: {risk}"
            for where, component in self._placed()
            if isinstance(component, Channel)
            and (risk := component.unprotected_transport())
            and not (isinstance(risk, LocalCleartext) and id(component) in accepted)
        ]

    def _startables(self) -> list[tuple[Route, int, BoundStep, Component, str]]:
        """Each component with its route, step and a label naming it and its plugin."""
        found: list[tuple[Route, int, BoundStep, Component, str]] = []
        for route in self.routes:
            for position, step in enumerate(route.steps):
                if step.component is not None:
                    found.append(
                        (route, position, step, step.component, _named(step.label, step.plugin))
                    )
                elif step.destination is not None:
                    destination = step.destination
                    label = _named(step.label, destination.plugin)
                    found.append((route, position, step, destination.channel, label))
                elif step.notifier is not None:
                    for destination in step.notifier.destinations.values():
                        label = _named(
                            f"{step.label}, channel {destination.channel.name} {destination.name}",
                            destination.plugin,
                        )
                        found.append((route, position, step, destination.channel, label))
        return found

    def _placed(self) -> list[tuple[str, Component]]:
        """Each component with where it is: route file and line, route, step and plugin."""
        return [
            (_step_where(route, position, step, what), component)
            for route, position, step, component, what in self._startables()
        ]

    async def close(self) -> None:
        """Close every component, each on its own: one whose close() raises is logged and
        the others still close their sessions and files."""
        for where, component in self._placed():
            await _close_one(where, component)


async def _close_one(where: str, component: Component) -> None:
    """Close one component; a failure is logged at ERROR naming its step and plugin with
    the exception's type only (its text can quote a message), the traceback at DEBUG."""
    try:
        await component.close()
    except Exception as err:
        log.error("%s: close() failed (%s)", where, type(err).__name__)
        log.debug("%s: close() raised", where, exc_info=err)


def _step_where(route: Route, position: int, step: BoundStep, what: str) -> str:
    """``FILE:LINE: route 'NAME': steps[N] (WHAT)``, as start()'s errors name a step."""
    return f"{route.source.where(step.loc)}: route {route.name!r}: steps[{position}] ({what})"


def _failure_text(err: BaseException) -> str:
    """``TypeName: text`` of a component's unforeseen failure, on one line."""
    reason = " ".join(str(err).split())
    return f"{type(err).__name__}{f': {reason}' if reason else ''}"


_TRANSITION_LATER = (
    "transition is what an encounter-state step finds, known only after one: test it in a "
    "filter step placed after `enrich: encounter-state`"
)
_OPT_OUT_LATER = (
    "opted_out is what a care-team step finds, known only after one: test it in a filter step "
    "placed after `enrich: care-team`"
)


def bind_routes(
    loaded: list[LoadedRoute], host: PluginHost, context: ComponentContext
) -> RouteTable:
    """Build every enabled route's components; raises ConfigError naming the exact place."""
    table = RouteTable()
    for item in loaded:
        config = item.config
        if not config.enabled:
            continue
        unnamed = _unnamed_forwards(config.steps, item.source, config.name)
        if config.when.uses_transition() or config.when.uses_opt_out():
            later = _TRANSITION_LATER if config.when.uses_transition() else _OPT_OUT_LATER
            where = item.source.where(("when",))
            raise ConfigError(f"{where}: route {config.name!r}: when: {later}")
        steps: list[BoundStep] = []
        for position, step in enumerate(config.steps):
            loc: tuple[Any, ...] = ("steps", position, step.kind)
            kind = step.kind
            if kind == "filter":
                assert step.filter is not None
                tracked = any(isinstance(s.component, EncounterStateEnricher) for s in steps)
                if step.filter.uses_transition() and not tracked:
                    raise ConfigError(
                        f"{item.source.where(loc)}: route {config.name!r}: steps[{position}]: "
                        f"filter: {_TRANSITION_LATER}"
                    )
                teamed = any(isinstance(s.component, CareTeamEnricher) for s in steps)
                if step.filter.uses_opt_out() and not teamed:
                    raise ConfigError(
                        f"{item.source.where(loc)}: route {config.name!r}: steps[{position}]: "
                        f"filter: {_OPT_OUT_LATER}"
                    )
                steps.append(BoundStep("filter", "filter", condition=step.filter))
                continue
            if kind in ("notify", "notify-referral"):
                bind = _bind_notify if kind == "notify" else _bind_referral_notify
                settings = step.notify if kind == "notify" else step.notify_referral
                notifier = bind(
                    settings or {}, config.name, position, host, context, item.source, loc
                )
                if isinstance(notifier, Notifier):
                    notifier.care_team = next(
                        (s.component for s in steps if isinstance(s.component, CareTeamEnricher)),
                        None,
                    )
                for destination in notifier.destinations.values():
                    if destination.name in table.destinations:
                        raise ConfigError(
                            f"{item.source.where(loc)}: route {config.name!r}: destination "
                            f"{destination.name!r} is used twice"
                        )
                    table.destinations[destination.name] = destination
                steps.append(BoundStep(kind, kind, notifier=notifier, loc=loc))
                continue
            if kind == "forward":
                destination = _bind_forward(
                    step.forward or {},
                    config.name,
                    position,
                    host,
                    context,
                    item.source,
                    loc,
                    default_name=unnamed.get(position),
                )
                if destination.name in table.destinations:
                    raise ConfigError(
                        f"{item.source.where(loc)}: route {config.name!r}: destination "
                        f"{destination.name!r} is used twice; give forwards distinct names"
                    )
                table.destinations[destination.name] = destination
                if position in unnamed:
                    channel = (step.forward or {}).get("channel")
                    table.former_names[f"{config.name}/{channel}-{position}"] = destination.name
                steps.append(
                    BoundStep(
                        "forward",
                        f"forward {destination.channel.name} {destination.name}",
                        destination=destination,
                        loc=loc,
                    )
                )
                continue
            try:
                name, options = step.component()
            except ValueError as err:
                raise ConfigError(
                    f"{item.source.where(loc)}: route {config.name!r}: {err}"
                ) from None
            registry: dict[str, type[Translator]] | dict[str, type[Enricher]]
            registry = host.enrichers if kind == "enrich" else host.translators
            base_kind = "enricher" if kind == "enrich" else "translator"
            component_class = registry.get(name)
            if component_class is None:
                known = ", ".join(sorted(registry)) or "none"
                raise ConfigError(
                    f"{item.source.where(loc)}: route {config.name!r}: steps[{position}]: "
                    f"no {base_kind} named {name!r} (registered: {known}{host.missing_note()})"
                )
            label = f"{kind} {name}" if kind in ("translate", "enrich") else kind
            plugin = host.owner(component_class.kind, name)
            what = f"steps[{position}] ({_named(label, plugin)})"
            component = _build(
                component_class, options, context, item.source, config.name, loc, what
            )
            steps.append(
                BoundStep(
                    "enrich" if kind == "enrich" else "translate",
                    label,
                    component,
                    loc=loc,
                    plugin=plugin,
                )
            )
        table.routes.append(Route(config.name, config.when, steps, item.source, config.description))
    table.shared_lines = share_lines(table.routes)
    return table


def share_lines(routes: list[Route]) -> dict[str, list[Destination]]:
    """Put the forwards that reach one receiving system (receiving_system) in one line, named
    after the first of their names, and return those lines with their forwards. A patient's
    order and a dead letter's hold are the receiver's concern, not the route's: two routes
    that split a feed by event (A01/A03 on one, A08 on the other) and forward to the same EHR
    must not let the A08 reach it before the A01 it updates. The line is found from the
    routes as they are, so it needs no setting, and every process that loads these routes
    names it alike. Notify steps' channels keep their own line: each notice goes to a
    person, through a relay or gateway that is not the receiver."""
    by_system: dict[str, list[Destination]] = {}
    for route in routes:
        for step in route.steps:
            destination = step.destination
            if step.kind != "forward" or destination is None:
                continue
            destination.endpoint = receiving_system(destination.channel)
            if destination.endpoint is not None:
                by_system.setdefault(destination.endpoint, []).append(destination)
    shared: dict[str, list[Destination]] = {}
    for forwards in by_system.values():
        if len(forwards) < 2:
            continue
        forwards = sorted(forwards, key=lambda d: d.name)
        for destination in forwards:
            destination.line = forwards[0].name
        shared[forwards[0].name] = forwards
    return shared


#: The port a URL without one reaches, by scheme.
_DEFAULT_PORTS = {"http": 80, "https": 443}


def receiving_system(channel: Channel) -> str | None:
    """The receiving system a forward's channel reaches, as one text that two forwards to it
    share: the channel's name and its address, ``mllp 127.0.0.1:22600``, ``webhook
    https://ehr.example.org:443/adt``, ``file /srv/out/adt``. Read from the options the
    built-in channels (and plugins alike) name it by: ``url`` or ``base_url`` (scheme and
    host in lower case, the default port written out, no trailing slash; credentials, query
    and fragment left out, as they name who sends, not where), ``host`` with ``port``, or
    ``directory`` (from the config folder). None for email and SMS, whose server only passes
    notices on to people, and for a channel with none of these options. A name is not
    resolved: ``localhost`` and ``127.0.0.1`` are two systems here."""
    if channel.name in RetryPolicy.CONTINUE_BY_DEFAULT:
        return None
    options = channel.options
    for key in ("url", "base_url"):
        value = getattr(options, key, None)
        if isinstance(value, str) and value.strip():
            return f"{channel.name} {_url_address(value.strip())}"
    host, port = getattr(options, "host", None), getattr(options, "port", None)
    if isinstance(host, str) and host.strip() and isinstance(port, int):
        host = host.strip().lower().rstrip(".")
        return f"{channel.name} {f'[{host}]' if ':' in host else host}:{port}"
    directory = getattr(options, "directory", None)
    if isinstance(directory, (str, Path)) and str(directory):
        return f"{channel.name} {os.path.abspath(channel.context.path(directory))}"
    return None


def _url_address(url: str) -> str:
    """``url`` as receiving_system compares it (see there); as written when it does not
    parse, so only the same text matches it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = port or _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{host}{f':{port}' if port else ''}{parts.path.rstrip('/')}"


def _bind_forward(
    settings: dict[str, Any],
    route: str,
    position: int,
    host: PluginHost,
    context: ComponentContext,
    source: RouteSource,
    loc: tuple[Any, ...],
    *,
    default_name: str | None = None,
) -> Destination:
    """Bind a forward to its channel; the destination is ROUTE/NAME after its ``name:``, or
    ``default_name`` (the channel's name, for a route's only forward to that channel)."""
    own = {k: v for k, v in settings.items() if k in ForwardConfig.model_fields}
    rest = {k: v for k, v in settings.items() if k not in ForwardConfig.model_fields}
    try:
        forward = ForwardConfig.model_validate(own)
    except ValidationError as err:
        raise ConfigError(_errors(err, source, route, loc)) from None
    channel_class = host.channels.get(forward.channel)
    if channel_class is None:
        known = ", ".join(sorted(host.channels)) or "none"
        raise ConfigError(
            f"{source.where((*loc, 'channel'))}: route {route!r}: steps[{position}]: "
            f"no channel named {forward.channel!r} (registered: {known}{host.missing_note()})"
        )
    name = forward.name or default_name
    if name is None:  # _unnamed_forwards made sure every forward has one
        raise ConfigError(f"{source.where(loc)}: route {route!r}: steps[{position}]: no name")
    destination = f"{route}/{name}"
    plugin = host.owner(Channel.kind, forward.channel)
    # As start() names it: a forward step, or one channel of a notify step.
    label = f"forward {forward.channel} {destination}"
    if loc[2] != "forward":
        label = f"{loc[2]}, channel {forward.channel} {destination}"
    what = f"steps[{position}] ({_named(label, plugin)})"
    channel = _build(channel_class, rest, context, source, route, loc, what)
    assert isinstance(channel, Channel)
    return Destination(
        destination, channel, forward.retry, plugin, forward.allow_cleartext, line=destination
    )


def _unnamed_forwards(steps: list[StepConfig], source: RouteSource, route: str) -> dict[int, str]:
    """The destination name of each forward step written without ``name:``: its channel's,
    when it is the route's only forward to that channel. A name taken from the step's
    position would change when a step is added before it, and the deliveries waiting for a
    retry would then go to the dead letters as "no longer configured". Several forwards to
    one channel must each be named: a ConfigError names the first without one."""
    forwards = {
        position: step.forward
        for position, step in enumerate(steps)
        if step.kind == "forward" and isinstance(step.forward, dict)
    }
    per_channel = Counter(
        f.get("channel") for f in forwards.values() if isinstance(f.get("channel"), str)
    )
    defaults: dict[int, str] = {}
    for position, forward in forwards.items():
        channel = forward.get("channel")
        if forward.get("name") is not None or not isinstance(channel, str):
            continue  # a name, or a channel ForwardConfig will refuse
        if per_channel[channel] > 1:
            raise ConfigError(
                f"{source.where(('steps', position, 'forward'))}: route {route!r}: "
                f"steps[{position}].forward.name: this route has {per_channel[channel]} "
                f"forwards to channel {channel!r}; give each a name (its destination is "
                f"{route}/NAME, the name its deliveries and their retries are kept under)"
            )
        defaults[position] = channel
    return defaults


def _named(label: str, plugin: str | None) -> str:
    return f"{label}, plugin {plugin!r}" if plugin else label


def _bind_notify(
    settings: dict[str, Any],
    route: str,
    position: int,
    host: PluginHost,
    context: ComponentContext,
    source: RouteSource,
    loc: tuple[Any, ...],
) -> Notifier:
    try:
        config = NotifyConfig.model_validate(settings)
    except ValidationError as err:
        raise ConfigError(_errors(err, source, route, loc)) from None
    destinations = {}
    for key, channel_settings in config.channels.items():
        forward = {
            "name": f"notify-{key}",
            "retry": config.retry.model_dump(exclude_unset=True),
            **channel_settings,
        }
        destinations[key] = _bind_forward(
            forward, route, position, host, context, source, (*loc, "channels", key)
        )
    try:
        return Notifier(route, config, destinations, context)
    except ConfigError as err:
        raise _in_step(err, source, route, position, loc) from err


def _bind_referral_notify(
    settings: dict[str, Any],
    route: str,
    position: int,
    host: PluginHost,
    context: ComponentContext,
    source: RouteSource,
    loc: tuple[Any, ...],
) -> ReferralNotifier:
    try:
        config = ReferralNoticeConfig.model_validate(settings)
    except ValidationError as err:
        raise ConfigError(_errors(err, source, route, loc)) from None
    destinations = {
        key: _bind_forward(
            {
                "name": f"notify-referral-{key}",
                "retry": config.retry.model_dump(exclude_unset=True),
                **channel,
            },
            route,
            position,
            host,
            context,
            source,
            (*loc, "channels", key),
        )
        for key, channel in config.channels.items()
    }
    try:
        return ReferralNotifier(route, config, destinations, context)
    except ConfigError as err:
        raise _in_step(err, source, route, position, loc) from err


def _in_step(
    err: ConfigError, source: RouteSource, route: str, position: int, loc: tuple[Any, ...]
) -> ConfigError:
    """A notify step's own ConfigError (a missing templates folder or directory file),
    prefixed as start() prefixes a component's: route file and line, route and step."""
    return ConfigError(
        f"{source.where(loc)}: route {route!r}: steps[{position}] ({loc[-1]}): {err}"
    )


def _build(
    component_class: type[Component],
    options: dict[str, Any],
    context: ComponentContext,
    source: RouteSource,
    route: str,
    loc: tuple[Any, ...],
    what: str,
) -> Component:
    """Validate a step's options and build its component. ``what`` names the step and the
    plugin (``steps[1] (enrich boom, plugin 'teams')``) for a failure that is not a
    ConfigError, a bug in the component's ``__init__``: one line, as start() reports one,
    with the traceback at DEBUG."""
    try:
        validated = component_class.Options.model_validate(options)
    except ValidationError as err:
        raise ConfigError(_errors(err, source, route, loc)) from None
    try:
        return component_class(validated, context)
    except ConfigError as err:  # a file it reads as it is built (a holidays file, say)
        raise ConfigError(f"{source.where(loc)}: route {route!r}: {_loc_text(loc)}: {err}") from err
    except Exception as err:
        problem = f"{source.where(loc)}: route {route!r}: {what} failed in __init__"
        log.debug("%s", problem, exc_info=True)
        raise ConfigError(f"{problem}: {_failure_text(err)}") from err


def _errors(err: ValidationError, source: RouteSource, route: str, loc: tuple[Any, ...]) -> str:
    lines = []
    for error in err.errors():
        full = (*loc, *error["loc"])
        shown, text = explain_error(source.node, error, full, ("routes", source.index))
        for where, message in _items_named(full, text):
            lines.append(f"{source.where(where)}: route {route!r}: {shown}: {message}")
    return "\n".join(lines)


_ITEM_PROBLEM = re.compile(r"(?:^|; )(?=(\w+)\[(\d+)\] )")


def _items_named(loc: tuple[Any, ...], message: str) -> list[tuple[tuple[Any, ...], str]]:
    """A list's validator names each bad item as ``edits[3] ...`` (one problem after another,
    joined by "; "), so each problem is told at its item's own line, not the list's."""
    text = message.removeprefix("Value error, ")
    starts = [m for m in _ITEM_PROBLEM.finditer(text) if loc and m.group(1) == loc[-1]]
    if not starts or starts[0].start() != 0:
        return [(loc, message)]
    found = []
    for at, match in enumerate(starts):
        end = starts[at + 1].start() if at + 1 < len(starts) else len(text)
        problem = text[match.end() : end]
        found.append(((*loc, int(match.group(2))), problem))
    return found
