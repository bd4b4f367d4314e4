"""Running one stored message through the route table.

Each route the message matches runs independently: its steps in the order written, each
step's output recorded. A step that raises ends that route (recorded as an error, the message
ends ``failed``) without touching the other routes; what the steps before it planned (forwards,
notices) is kept and sent, as a filter that stops a route keeps what came before it: each was
fixed when its step ran and owes nothing to the steps after it, so an archive copy placed first
is written whatever a later lookup does, and ``messages reprocess --undelivered`` after the fix
sends only the rest. One that raises :class:`StepProblem` has done its part and found
something an operator must see: it is recorded as an error (the message ends ``failed``,
saying why) and the route goes on. Forward steps do not send anything here: they fix the
exact bytes to send (``Channel.render``) and become deliveries, which the delivery workers
send with retries. That way a route's result commits in one transaction, and a crash never
leaves a message half-routed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from carehub.components import ComponentContext, JSONText, Outgoing, Work
from carehub.hl7.view import MessageView, NotHL7Error
from carehub.plugins import PluginHost
from carehub.routing.conditions import Check, StepFacts
from carehub.store.store import StoredMessage
from carehub.workqueue import patient_key

if TYPE_CHECKING:
    from carehub.routing.table import Route, RouteTable

log = logging.getLogger(__name__)

#: A step that takes this many seconds for one message is logged (Router._note_if_slow) ...
SLOW_STEP = 1.0
#: ... at most once in this many seconds per step.
SLOW_STEP_EVERY = 300
#: Routing a message costs time in proportion to its segments and field repetitions (each
#: is read, and up to events.MAX_DIAGNOSES DG1s become diagnoses and FHIR Conditions). A
#: message with more than this many is routed on a helper thread, never on the hub's event
#: loop (``fits_the_loop``): one of 20,000 segments, well under the size limit, held up every
#: listener's ACKs for seconds. Real messages have tens.
LOOP_MAX_PARTS = 200
#: ... and so is a message of more than this many bytes, whatever its shape.
LOOP_MAX_BYTES = 64 * 1024


@dataclass(slots=True)
class StepRecord:
    route: str
    position: int
    step: str
    outcome: str  # ok | filtered | error (stored as `cleared` once dealt with)
    #: The step's output (read it as ``output``); JSONText until someone reads it.
    _output: Any = None
    #: ``output`` as JSON, when the router already encoded it (see ``recordable``).
    output_json: str | None = None

    @property
    def output(self) -> Any:
        if isinstance(self._output, JSONText):
            self._output = json.loads(self._output.text)
        return self._output

    def encoded_output(self) -> str:
        """The output as stored: JSON, anything JSON cannot hold as its text."""
        if self.output_json is None:
            self.output_json = json.dumps(self.output, default=str)
        return self.output_json


@dataclass(slots=True)
class PlannedDelivery:
    route: str
    destination: str
    channel: str
    outgoing: Outgoing
    order_key: str
    max_attempts: int
    #: The line it keeps its patient's order in (Destination.line); empty: its destination's.
    line: str = ""
    #: Seconds of failing after which it is a dead letter (RetryPolicy.give_up_seconds).
    give_up_after: int = 0


@dataclass(slots=True)
class RouteResult:
    route: str
    matched: bool
    checks: list[Check]
    steps: list[StepRecord] = field(default_factory=list)
    deliveries: list[PlannedDelivery] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class RoutingResult:
    message_id: int
    run: int
    routes: list[RouteResult]

    @property
    def matched(self) -> list[RouteResult]:
        return [r for r in self.routes if r.matched]

    @property
    def steps(self) -> list[StepRecord]:
        return [s for r in self.routes for s in r.steps]

    @property
    def deliveries(self) -> list[PlannedDelivery]:
        return [d for r in self.routes for d in r.deliveries]

    @property
    def errors(self) -> list[str]:
        return [f"{r.route}: {r.error}" for r in self.routes if r.error]


def idempotency_key(message_id: int, run: int, destination: str, store_id: str = "") -> str:
    """Stable per (store, message, routing run, destination): a resend after a crash reuses
    it. Message ids start at 1 in every store, so the digest takes the store's own id too
    (``MessageStore.instance_id``; empty in dry runs): two hubs sending to one receiver never
    give two messages one key."""
    digest = hashlib.sha256(f"{store_id}/{destination}".encode()).hexdigest()[:12]
    return f"carehub-{message_id}-{run}-{digest}"


def store_id_of(context: ComponentContext) -> str:
    """The id of the store a component works with, for its keys ("" without one)."""
    return context.store.instance_id if context.store is not None else ""


def key_of_this_store(key: str, context: ComponentContext) -> str:
    """A key carehub makes from its own row ids (an overdue alert's, a digest's), made unique
    to the store as ``idempotency_key`` is: the store's id ends it."""
    store_id = store_id_of(context)
    return f"{key}-{store_id[:8]}" if store_id else key


def order_key(message: StoredMessage) -> str:
    """Deliveries to one destination go out in arrival order per patient."""
    return patient_key(message.patient_id, message.patient_authority, message.id)


def fits_the_loop(message: StoredMessage) -> bool:
    """Whether routing ``message`` is quick enough for the hub's event loop, where every
    listener answers its senders (see LOOP_MAX_PARTS). Counted on the stored bytes: a few
    scans in C, without decoding the text or splitting it."""
    raw = message.raw
    if len(raw) > LOOP_MAX_BYTES:
        return False
    header = raw.find(b"MSH", 0, 16)  # after a byte order mark or blank lines, if any
    repetition = raw[header + 5 : header + 6] if header >= 0 else b""
    parts = raw.count(b"\r") + raw.count(b"\n") + raw.count(repetition or b"~")
    return parts <= LOOP_MAX_PARTS


def recordable(value: Any) -> tuple[Any, str]:
    """A step output as it will be stored, and its JSON: the value itself when JSON can hold
    it, else its text. Encoding it once here spares encoding a care event twice per message
    (once to check it, once to store it); JSONText is already encoded."""
    if isinstance(value, JSONText):
        return value, value.text
    try:
        return value, json.dumps(value)
    except (TypeError, ValueError):
        text = str(value)
        return text, json.dumps(text)


class StepProblem(Exception):
    """Raised by a step that did what it could and found a problem an operator must see,
    which the route's other steps need not stop for (a referral message that belongs to no
    referral: the desk's file copy is still written). The step is recorded as an error with
    this text, so the message ends ``failed`` and says why; the steps after it run and their
    deliveries are kept. Whatever the step put in ``work.data`` stays for them."""


class RenderError(TypeError):
    """A channel's render() returned something the store cannot keep as a delivery."""


def check_outgoing(outgoing: object, channel: str, plugin: str | None) -> None:
    """Refuse what a render() returned unless the store can keep it as it is and every retry
    can send it: bytes payload, text content type and key, text-to-text metadata. Caught
    here it fails this route for this message, like a render() that raises; caught later it
    broke the whole routing batch (other patients' messages with it), the claims of its
    retries and the views that show it."""
    named = f"channel {channel!r}" + (f" (plugin {plugin!r})" if plugin else "")
    if not isinstance(outgoing, Outgoing):
        raise RenderError(
            f"{named}: render() returned a {type(outgoing).__name__}, not a "
            "carehub.components.Outgoing"
        )
    payload = outgoing.payload
    if not isinstance(payload, bytes):
        hint = "encode it to bytes" if isinstance(payload, str) else "it must be bytes"
        raise RenderError(f"{named}: render() returned a {type(payload).__name__} payload; {hint}")
    for what in ("content_type", "idempotency_key"):
        value = getattr(outgoing, what)
        if not isinstance(value, str):
            raise RenderError(
                f"{named}: render() returned a {type(value).__name__} {what}, not a str"
            )
    metadata = outgoing.metadata
    if not isinstance(metadata, dict):
        raise RenderError(
            f"{named}: render() returned {type(metadata).__name__} metadata, not a dict of str"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            wrong, which = (key, "key") if not isinstance(key, str) else (value, "value")
            raise RenderError(
                f"{named}: render() returned metadata whose {which} "
                + (f"for {key!r} " if which == "value" else "")
                + f"is a {type(wrong).__name__}, not a str; turn it into text"
            )


class Router:
    def __init__(self, table: RouteTable, host: PluginHost) -> None:
        self.table = table
        self.host = host
        #: Steps that may wait per message (RouteTable.steps_that_may_block): the worker
        #: routes on a helper thread while there are any.
        self.steps_that_may_block = table.steps_that_may_block()
        #: When each slow step was last logged, so a lookup service that answers slowly
        #: all day is one line every SLOW_STEP_EVERY seconds, not one per message.
        self._slow_logged: dict[str, float] = {}

    def _note_if_slow(self, route: str, position: int, label: str, started: float) -> None:
        """A step that takes SLOW_STEP seconds or more for one message holds up every message
        behind it (routing is in arrival order): say so, naming the step, so an operator
        finds the lookup to fix rather than a queue that grows for no visible reason."""
        now = time.monotonic()
        took = now - started
        where = f"{route}/{position}"
        if took < SLOW_STEP or now - self._slow_logged.get(where, float("-inf")) < SLOW_STEP_EVERY:
            return
        self._slow_logged[where] = now
        log.warning(
            "route %s step %d (%s) took %.1f s for one message; the messages behind it wait "
            "(said at most every %d s per step)",
            route,
            position,
            label,
            took,
            SLOW_STEP_EVERY,
        )

    def route(self, message: StoredMessage, run: int = 1, explain: bool = False) -> RoutingResult:
        """Run every route; ``explain`` also records why unmatched routes did not match
        (dry runs want it; live routing skips the work)."""
        text = message.text
        try:
            view = MessageView(text)
        except NotHL7Error:
            return RoutingResult(message.id, run, [])
        results = [
            self._run_route(route, message, text, view, run, explain) for route in self.table.routes
        ]
        return RoutingResult(message.id, run, results)

    def _run_route(
        self,
        route: Route,
        message: StoredMessage,
        text: str,
        view: MessageView,
        run: int,
        explain: bool,
    ) -> RouteResult:
        try:
            matched = route.when.matches(view)
            checks = route.when.explain(view) if explain else []
        except Exception as err:  # a condition that cannot be read fails its route only
            log.warning("route %s: its when failed: %s", route.name, type(err).__name__)
            log.debug("route %s when traceback", route.name, exc_info=True)
            return RouteResult(route.name, True, [], error=f"when: {type(err).__name__}: {err}")
        if not matched:
            return RouteResult(route.name, False, checks)
        result = RouteResult(route.name, True, checks)
        # Every route starts from the same text, so they share its view (split once).
        work = Work(message=message, route=route.name, v2=text, _view=view)
        for position, step in enumerate(route.steps):
            try:
                if step.kind == "filter":
                    assert step.condition is not None
                    checks = step.condition.explain(work.view, _facts(work))
                    failed = [c for c in checks if not c.passed]
                    if failed:
                        reason = "; ".join(
                            f"{c.what} = {c.value!r}, wanted {c.expected}" for c in failed
                        )
                        result.steps.append(
                            StepRecord(route.name, position, step.label, "filtered", reason)
                        )
                        break
                    result.steps.append(
                        StepRecord(route.name, position, step.label, "ok", "passed")
                    )
                elif step.kind in ("notify", "notify-referral"):
                    assert step.notifier is not None
                    planned, decisions = step.notifier.plan(work, run)
                    result.deliveries.extend(planned)
                    result.steps.append(
                        StepRecord(route.name, position, step.label, "ok", decisions)
                    )
                elif step.kind == "forward":
                    assert step.destination is not None
                    destination = step.destination
                    store_id = store_id_of(destination.channel.context)
                    key = idempotency_key(message.id, run, destination.name, store_id)
                    outgoing = destination.channel.render(work, key)
                    check_outgoing(outgoing, destination.channel.name, destination.plugin)
                    result.deliveries.append(
                        PlannedDelivery(
                            route.name,
                            destination.name,
                            destination.channel.name,
                            outgoing,
                            order_key(message),
                            destination.retry.max_attempts,
                            destination.line,
                            destination.retry.give_up_seconds,
                        )
                    )
                    summary = {
                        "destination": destination.name,
                        "idempotency_key": key,
                        "content_type": outgoing.content_type,
                        "bytes": len(outgoing.payload),
                    }
                    result.steps.append(StepRecord(route.name, position, step.label, "ok", summary))
                else:
                    started = time.monotonic()
                    output = self.host.run_step(work, step.label, _runner(step, work))
                    self._note_if_slow(route.name, position, step.label, started)
                    value, encoded = recordable(output)
                    result.steps.append(
                        StepRecord(route.name, position, step.label, "ok", value, encoded)
                    )
            except StepProblem as problem:
                log.warning(
                    "route %s step %d (%s) found a problem; the route goes on",
                    route.name,
                    position,
                    step.label,
                )
                error = f"step {position} ({step.label}): {problem}"
                result.error = f"{result.error}; {error}" if result.error else error
                result.steps.append(StepRecord(route.name, position, step.label, "error", error))
            except Exception as err:  # a broken step ends its route, never the hub
                # The error's text can quote the message: WARNING gets its type, and the
                # traceback (for a plugin author to find the line) goes to DEBUG only.
                log.warning(
                    "route %s step %d (%s) failed: %s",
                    route.name,
                    position,
                    step.label,
                    type(err).__name__,
                )
                log.debug(
                    "route %s step %d (%s) traceback",
                    route.name,
                    position,
                    step.label,
                    exc_info=True,
                )
                result.error = f"step {position} ({step.label}): {type(err).__name__}: {err}"
                result.steps.append(
                    StepRecord(route.name, position, step.label, "error", result.error)
                )
                # The deliveries planned before it stay: their step records say they were
                # planned, and they are sent (see the module doc).
                break
        return result


def _facts(work: Work) -> StepFacts:
    """What earlier steps found, for a filter step: what an encounter-state step found this
    message did (Transition.kind), and whether a care-team step found the patient opted out."""
    team = work.data.get("care_team")
    return StepFacts(
        transition=getattr(work.data.get("encounter"), "kind", None),
        opted_out=getattr(team, "opted_out", None),
    )


def _runner(step: Any, work: Work) -> Any:
    component = step.component
    if step.kind == "enrich":
        return lambda: component.enrich(work)
    return lambda: component.translate(work)
