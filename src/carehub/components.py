"""What plugins build: translators, enrichers and channels, each a named class with options.

A route step names a component and gives it options; carehub validates those options against
the component's ``Options`` model (unknown keys are errors) before anything starts, then builds
one instance per step and calls it for every message the route takes.

    class Uppercase(Translator):
        name = "uppercase-names"

        class Options(ComponentOptions):
            segment: str = "PID"

        def translate(self, work: Work) -> object:
            ...
"""

from __future__ import annotations

import ipaddress
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from carehub.config import without_password
from carehub.hl7.view import MessageView

if TYPE_CHECKING:
    import asyncio
    from datetime import datetime

    from carehub.events import CareEvent
    from carehub.store.store import MessageStore, StoredMessage


class ComponentOptions(BaseModel):
    """Base of every component's options: unknown keys are configuration errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(slots=True, frozen=True)
class JSONText:
    """A step output its component already holds as JSON text: recorded as it is, and decoded
    only where someone reads it (a dry run). A pydantic model's own encoder
    (``model_dump_json``) is several times faster than ``json.dumps`` of its dump, which took
    6% of the hub's event loop under bench/bench_routing.py."""

    text: str


@dataclass(slots=True)
class ComponentContext:
    """What a component may use beyond its options: where relative paths start, the data dir,
    and the store when the hub runs (None in dry runs: keep state in memory there)."""

    config_dir: Path
    data_dir: Path
    store: MessageStore | None = None
    #: State that steps of one kind share without a store (TrackingEnricher's memory tables).
    shared: dict[str, Any] = field(default_factory=dict)
    #: `routes check`: start() checks what it would set up (a folder it would create) without
    #: setting it up. The check may run as another user than serve (root, before an upgrade),
    #: and what it created would belong to that user.
    check_only: bool = False

    def path(self, value: str | Path) -> Path:
        """A path from a route file, relative to the config folder."""
        candidate = Path(value)
        return candidate if candidate.is_absolute() else self.config_dir / candidate


@dataclass(slots=True)
class Work:
    """One message on its way through one route; steps read and add to it in order."""

    message: StoredMessage
    route: str
    v2: str
    event: CareEvent | None = None
    data: dict[str, Any] = field(default_factory=dict)
    _view: MessageView | None = None
    _event_json: tuple[object, Any] | None = None
    _event_bytes: tuple[object, bytes] | None = None

    @property
    def view(self) -> MessageView:
        """The lazy field view of the current v2 text (rebuilt after a transform changes it)."""
        if self._view is None:
            self._view = MessageView(self.v2)
        return self._view

    def event_json(self) -> Any:
        """The care event as JSON-ready data, dumped once however many steps need it
        (the translate step's record, a webhook body, an archive file)."""
        if self.event is None:
            return None
        if self._event_json is None or self._event_json[0] is not self.event:
            from carehub.builtins.channels import event_json  # any event type, not only ours

            self._event_json = (self.event, event_json(self.event))
        return self._event_json[1]

    def event_json_bytes(self) -> bytes | None:
        """``event_json()`` as compact UTF-8 JSON, encoded once however many channels send it
        (a file and a webhook on one route each wrote the same 2 KB of JSON)."""
        if self.event is None:
            return None
        if self._event_bytes is None or self._event_bytes[0] is not self.event:
            dump_json = getattr(self.event, "model_dump_json", None)
            if callable(dump_json):
                # pydantic's own encoder writes the same bytes as json.dumps of
                # model_dump(mode="json") (checked on the 139 corpus messages), 6 us against 22.
                encoded = dump_json().encode("utf-8")
            else:
                from carehub.builtins.channels import compact_json

                encoded = compact_json(self.event_json())
            self._event_bytes = (self.event, encoded)
        return self._event_bytes[1]

    def replace_v2(self, text: str) -> None:
        self.v2 = text
        self._view = None


class Component:
    """Base of all components. ``name`` is what routes refer to; ``Options`` validates config."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[ComponentOptions]] = ComponentOptions

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        self.options = options
        self.context = context

    def may_block(self) -> bool:
        """Whether handling one message may wait on something outside carehub: a lookup over
        the network, a slow disk. Routes with such a step are routed on a helper thread, never
        on the hub's event loop, where every listener answers its senders: a lookup that
        takes two seconds would otherwise hold up every ACK for two seconds. carehub's own
        components are quick unless they say otherwise; a plugin's is taken to block unless
        it overrides this to return False (it then runs on the loop, a little faster)."""
        return not type(self).__module__.startswith("carehub.")

    async def start(self) -> None:
        """Open connections or load files; called once before the first message."""

    async def close(self) -> None:
        """Release what start() opened."""

    def tick(self, now: datetime) -> None:
        """Periodic work (closing stale visits, overdue alerts, digests); the worker calls it
        about every ``worker.tick_interval`` seconds, never in dry runs."""


class Translator(Component):
    """Turns the message into another form (a care event, an edited v2 message, ...)."""

    kind = "translator"

    def translate(self, work: Work) -> Any:
        """Change ``work`` and return what to record as this step's output (JSON-ready).
        A plain ``def``: carehub uses what it returns without awaiting it."""
        raise NotImplementedError


class Enricher(Component):
    """Adds facts from outside the message (care team, directory entries, referral state)."""

    kind = "enricher"

    def enrich(self, work: Work) -> Any:
        """Add to ``work.data`` and return what to record as this step's output.

        Routing steps run one message at a time in arrival order, so keep this quick: load
        rosters and directories in ``start()``, not per message. A plain ``def``: carehub uses
        what it returns without awaiting it. A lookup here is allowed (see ``may_block``)."""
        raise NotImplementedError


class _Tracker(Protocol):
    engine: Any  # the store's engine, or None when the tracker keeps its tables in memory


TrackerT = TypeVar("TrackerT", bound=_Tracker)


class TrackingEnricher(Enricher, Generic[TrackerT]):
    """An enricher that keeps state between messages (visits, referrals): in the store when the
    hub runs, in memory in dry runs. The hub attaches the store after the routes are bound, so
    the tracker is built on first use and rebuilt when the store changes. The memory tables
    are shared by every step of the same name bound with one context, as the store's tables
    are (two routes that track visits see the same visits in a dry run too). Subclasses say
    how to make both, and what a message does."""

    #: Raised when the route has no translate step before this one.
    missing_event_error: ClassVar[type[Exception]] = ValueError

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        memory_key = self.memory_key()
        if memory_key not in context.shared:
            context.shared[memory_key] = self.new_memory()
        self._memory = context.shared[memory_key]
        self._tracker: TrackerT | None = None

    @classmethod
    def memory_key(cls) -> str:
        """Where ``ComponentContext.shared`` holds this kind of step's memory tables."""
        return f"{cls.kind}:{cls.name}:memory"

    def new_memory(self) -> Any:
        """The tables a dry run keeps state in."""
        raise NotImplementedError

    def new_tracker(self, engine: Any, memory: Any) -> TrackerT:
        """The tracker over the store's ``engine`` (None: over ``memory``)."""
        raise NotImplementedError

    @property
    def tracker(self) -> TrackerT:
        store = self.context.store
        engine = store.engine if store is not None else None
        if self._tracker is None or self._tracker.engine is not engine:
            self._tracker = self.new_tracker(engine, self._memory)
        return self._tracker

    def care_event(self, work: Work) -> CareEvent:
        """The message's care event, which this step cannot do without."""
        if work.event is None:
            raise self.missing_event_error(
                f"route {work.route!r}: {self.name} needs the care event; put a "
                "'v2-to-event' translate step before it"
            )
        return work.event


@dataclass(slots=True, frozen=True)
class Outgoing:
    """Exactly what a channel will send for one delivery, fixed when the message is routed so
    every retry sends the same bytes with the same idempotency key."""

    payload: bytes
    content_type: str
    idempotency_key: str
    metadata: dict[str, str] = field(default_factory=dict)


#: ``said`` left out: the channel has not said where the destination's words are.
_NOT_SAID: Any = object()


class DeliveryError(Exception):
    """A send that failed. ``retryable=False`` sends the delivery straight to the dead letters
    (the destination refused it for good, e.g. HTTP 400 or an AR acknowledgment).

    ``message`` is the channel's own account of the failure: where it sent, and what went
    wrong (no answer in time, connection refused, TLS failed, HTTP 503, AR). ``said`` is what
    the destination answered (an HTTP body, an ACK's ERR text): it may quote the message (a
    patient's name, an MRN), so it is kept with the attempt in the store and never written to
    the log. Giving ``said`` (None when the destination said nothing) declares that the
    destination's words are there and not in ``message``, so the log shows ``message`` whole;
    from a channel that leaves ``said`` out, the log takes only the words before the first
    ': ' of ``message`` (its answer may follow them).

    ``retry_after`` is how many seconds the destination asked carehub to wait before trying
    again (HTTP ``Retry-After``): the next attempt comes no sooner, up to the destination's
    ``retry.max_delay``.

    Both texts pass through carehub.config.without_password: a channel's error names its URL,
    which may carry a password or a ``?access_token=``, and what is said here is logged and
    kept in the store."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        said: str | None = _NOT_SAID,
        retry_after: float | None = None,
    ) -> None:
        self.own_words_only = said is not _NOT_SAID
        said = None if said is _NOT_SAID or said is None else without_password(said)
        message = without_password(message)
        super().__init__(f"{message}: {said}" if said else message)
        self.retryable = retryable
        self.message = message
        self.said: str | None = said
        self.retry_after = retry_after

    @property
    def loggable(self) -> str:
        """What of this failure the log may say (see the class docstring)."""
        if self.own_words_only:
            return self.message
        return self.message.split(": ", 1)[0]


class NothingToSend(Exception):
    """Raised by a channel's send() (or by what it calls) that finds nothing to send for this
    delivery: a resend its receiver already has, a cancel of a notification it never had, a
    Task the organisation has already closed. The delivery is settled as ``skipped`` with
    ``reason`` as its receipt; nothing went out. It is not a failure: no retry, no dead
    letter, and the patient's later deliveries go on. ``reason`` is kept in the store, not
    logged; like a receipt it must not quote the message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SendNotStarted(Exception):
    """Raised by a channel's send() that gives up before saying anything to the destination
    because the worker is stopping (see ``worker_stopping``): the worker hands the delivery
    back unsent, no attempt counted, for the next start or another worker."""


#: The stop of the worker that runs the current send (set once it begins to stop). A channel
#: whose sends wait for their turn (one connection, one message at a time) stops waiting when
#: it is set and raises SendNotStarted, rather than keep the delivery until the stop's grace
#: runs out.
worker_stopping: ContextVar[asyncio.Event | None] = ContextVar("worker_stopping", default=None)


def on_this_machine(host: str) -> bool:
    """Whether ``host`` names this machine only (a loopback address, ``localhost``): what is
    sent to it, or taken by a listener bound to it, never crosses the network."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Channel(Component):
    """Forwards a routed message to a destination (file, MLLP, webhook, email, ...)."""

    kind = "channel"
    #: The worker sends at most ``worker.per_destination`` deliveries at a time to one
    #: destination, so a receiving system is not flooded and a slow one cannot take every
    #: send slot. A channel that writes on this host, with no receiving system to protect,
    #: sets this False and is bounded by the worker's overall concurrency only.
    limit_per_destination: ClassVar[bool] = True

    def unprotected_transport(self) -> str | None:
        """How what this channel sends could be read or altered on its way (sent in clear, or
        to a server whose certificate is not checked), naming the option that makes it so;
        None when it is protected. A destination on this machine (see on_this_machine) sent
        to in clear is said too when any local account may bind its port, since whoever does
        while the receiver is not listening gets what is sent: see
        carehub.builtins.http_channel.cleartext_on_this_machine, whose answer the
        destination's ``allow_cleartext: true`` silences. Routes' start logs one WARNING per
        destination that says so, and `routes check` prints it: patient data must not go
        unprotected without a word. A channel that sends over the network says; the default
        says nothing."""
        return None

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        """Build what will be sent; called once, at routing time, and recorded in the store.
        A plain ``def`` returning an Outgoing with a bytes payload and str-to-str metadata."""
        raise NotImplementedError

    async def send(self, outgoing: Outgoing) -> str:
        """Send it; return a short str receipt ("HTTP 202", "AA") or raise DeliveryError
        (NothingToSend when there turns out to be nothing to send).
        An ``async def``: the worker awaits it on its event loop, beside every other send."""
        raise NotImplementedError
