"""carehub-pager: page the on-call clinician for a patient's unit when a route says so.

Each piece is the smallest useful example of one kind of carehub extension:

- ``on-call`` (an Enricher) reads the unit from PV1-3.1, looks up who is on call for it in a
  schedule file loaded once in ``start()``, and puts them in ``work.data["on_call"]``.
- ``pager`` (a Channel) renders a short page for that clinician and POSTs it to an HTTP paging
  gateway. Pages travel over networks and screens carehub does not control, so they carry the
  minimum necessary: the event kind, the unit and carehub's message id. The clinician looks the
  patient up in carehub or the EHR; the page never names or identifies the patient.
- ``carehub_message_failed`` (an observer) counts failed deliveries and
  ``carehub_run_step`` (a wrapper) times route steps, both into ``STATS`` for this process.
- ``carehub pager-status`` (a command) reports pager deliveries from the store, so it works
  from any shell, not only inside the process that sent them.

    routes:
      - name: admissions-page
        when: {type: ADT, events: [A01]}
        steps:
          - translate: v2-to-event
          - enrich: {use: on-call, schedule: on-call.yaml}
          - forward: {channel: pager, name: on-call-pager, url: "${PAGER_URL}",
                      token: "${PAGER_TOKEN}"}
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx
import yaml
from carehub import hookimpl
from carehub.builtins.http_channel import unprotected_http
from carehub.cli import hub_options
from carehub.components import (
    Channel,
    ComponentContext,
    ComponentOptions,
    DeliveryError,
    Enricher,
    Outgoing,
    Work,
)
from carehub.config import without_password
from carehub.errors import ConfigError
from carehub.events import event_kind
from carehub.hl7.view import NotHL7Error
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from carehub.config import HubConfig
    from carehub.store.outbox import DeliveryRecord
    from carehub.store.store import MessageStore

#: The schedule entry used for a unit the schedule does not list (e.g. the house supervisor).
ANY_UNIT = "*"
JSON_CONTENT_TYPE = "application/json"


# -- the on-call schedule ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OnCall:
    """Who answers pages for one unit."""

    unit: str
    name: str
    pager: str


class _Entry(BaseModel):
    """One schedule entry; unknown keys are errors, as in every carehub config file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    pager: str = Field(pattern=r"^\+?[0-9][0-9 -]{1,30}$")


def unit_key(unit: str) -> str:
    """Units compare without case or surrounding spaces: feeds disagree on both."""
    return unit.strip().upper()


def load_schedule(path: Path) -> dict[str, OnCall]:
    """Read a schedule: YAML ``UNIT: {name: ..., pager: ...}`` or CSV with columns
    ``unit,name,pager``. ``*`` is the entry for units not listed. Errors name file and entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the on-call schedule: {err.strerror}") from err
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        rows = _yaml_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        raise ConfigError(f"{path}: an on-call schedule is a .yaml, .yml or .csv file")
    schedule: dict[str, OnCall] = {}
    for where, unit, values in rows:
        try:
            entry = _Entry.model_validate(values)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in err.errors()
            )
            raise ConfigError(f"{where}: unit {unit!r}: {problems}") from None
        key = unit_key(unit)
        if not key:
            raise ConfigError(f"{where}: an entry has no unit")
        if key in schedule:
            raise ConfigError(f"{where}: unit {unit!r} is listed twice")
        schedule[key] = OnCall(key, entry.name.strip(), entry.pager.strip())
    if not schedule:
        raise ConfigError(f"{path}: the on-call schedule lists no units")
    return schedule


def _yaml_rows(path: Path, text: str) -> list[tuple[str, str, Any]]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {getattr(err, 'problem', err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the schedule is a mapping of unit -> {{name, pager}}")
    return [(str(path), str(unit), values) for unit, values in data.items()]


def _csv_rows(path: Path, text: str) -> list[tuple[str, str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = {"unit", "name", "pager"} - set(reader.fieldnames or [])
    if missing:
        raise ConfigError(f"{path}: the CSV header needs the columns unit,name,pager")
    rows = []
    for row in reader:
        unit = row.pop("unit") or ""
        values = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
        rows.append((f"{path}:{reader.line_num}", unit, values))
    return rows


def lookup(schedule: dict[str, OnCall], unit: str) -> OnCall | None:
    """The unit's own entry, else the ``*`` entry, else None."""
    return schedule.get(unit_key(unit)) or schedule.get(ANY_UNIT)


# -- the enricher -----------------------------------------------------------------------------
class OnCallEnricher(Enricher):
    """Adds ``work.data["on_call"] = {"unit", "name", "pager"}`` for the unit in PV1-3.1 (None
    when neither the unit nor ``*`` is in the schedule). The schedule is read in ``start()``:
    enrich runs for every message, in order, and must not touch the disk."""

    name = "on-call"
    description = "look up the on-call clinician and pager for the patient's unit (PV1-3.1)"

    class Options(ComponentOptions):
        schedule: Path

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self.path = context.path(self.options.schedule)
        self.schedule: dict[str, OnCall] = {}

    async def start(self) -> None:
        self.schedule = load_schedule(self.path)

    def may_block(self) -> bool:
        """A lookup in the table start() loaded never waits: routing may stay on the hub's
        event loop (a plugin's step is otherwise taken to wait, and routed on a thread)."""
        return False

    def enrich(self, work: Work) -> dict[str, str | None]:
        unit = work.view.get("PV1-3.1").strip()
        found = lookup(self.schedule, unit)
        work.data["on_call"] = (
            {"unit": unit, "name": found.name, "pager": found.pager} if found else None
        )
        # The step output is stored with the message: the clinician, not the pager number.
        return {"unit": unit or None, "on_call": found.name if found else None}


# -- the channel ------------------------------------------------------------------------------
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._/-]")


def page_text(kind: str, unit: str, message_id: int) -> str:
    """The page: event kind, unit and carehub message id, nothing about the patient. The unit
    comes from the sender, so it is reduced to plain characters and kept short."""
    unit = _UNSAFE.sub("", unit).strip()[:16] or "unknown"
    return f"carehub: {kind.replace('_', ' ')} - unit {unit} - msg {message_id}"


class PagerChannel(Channel):
    """POSTs ``{"to": pager, "text": page}`` as JSON to a paging gateway.

    Needs the ``on-call`` enricher earlier in the route; without an on-call clinician, render
    raises and the route is recorded as failed (a page must not vanish silently). The token is
    added in ``send()`` as ``Authorization: Bearer``, never stored with the rendered delivery;
    ``Idempotency-Key`` is the same on every retry so the gateway can drop repeats.

    Outcome: 2xx -> receipt "HTTP <code>"; 408, 425, 429, 5xx, timeouts and network errors ->
    retryable; other answers -> not retryable (a refused page will not get better by repeating).

    Whatever this channel says about its URL (option errors, DeliveryErrors) goes through
    ``without_password``: a gateway URL may carry a credential (``?api_key=``), and what is
    said ends up in logs, `carehub status` and tickets.
    """

    name = "pager"
    description = "page the on-call clinician via an HTTP paging gateway (no patient details)"

    RETRYABLE_STATUS = frozenset({408, 425, 429})

    class Options(ComponentOptions):
        url: str
        token: str | None = None
        timeout: float = Field(10.0, gt=0)

        @field_validator("url")
        @classmethod
        def _http_url(cls, value: str) -> str:
            try:
                url = httpx.URL(value)
            except (httpx.InvalidURL, TypeError) as err:
                raise ValueError(without_password(f"bad url {value!r}: {err}")) from err
            if url.scheme not in ("http", "https") or not url.host:
                shown = without_password(repr(value))
                raise ValueError(f"url must be http:// or https:// with a host, got {shown}")
            return value

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self._client: httpx.AsyncClient | None = None

    def unprotected_transport(self) -> str | None:
        """Pages name a unit and an event, not a patient, but still travel: plain http:// (to
        another machine, or to a port of this one any account may bind) is warned about at
        start, as carehub's own HTTP channels do."""
        return unprotected_http(self.options.url)

    async def start(self) -> None:
        """One client, so one connection pool, for every page this channel sends."""
        self._client = httpx.AsyncClient(
            timeout=self.options.timeout,
            follow_redirects=False,
            headers={"User-Agent": "carehub-pager"},
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        on_call = work.data.get("on_call")
        unit = ""
        with contextlib.suppress(NotHL7Error):
            unit = work.view.get("PV1-3.1").strip()
        if not on_call:
            raise ValueError(
                f"no on-call clinician for unit {unit or '(none)'!r}: add the on-call enricher "
                f"before this forward, and the unit or a '*' entry to its schedule"
            )
        body = {"to": on_call["pager"], "text": page_text(_kind(work), unit, work.message.id)}
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return Outgoing(payload, JSON_CONTENT_TYPE, idempotency_key)

    async def send(self, outgoing: Outgoing) -> str:
        if self._client is None:
            raise RuntimeError("PagerChannel.send() before start()")
        url = self.options.url
        shown = without_password(url)  # what the errors below say of it
        headers = {
            "Content-Type": outgoing.content_type,
            "Idempotency-Key": outgoing.idempotency_key,
        }
        if self.options.token:
            headers["Authorization"] = f"Bearer {self.options.token}"
        # The text of each DeliveryError is this channel's own account (logged whole);
        # what the gateway answered goes in `said=`, kept with the attempt and never logged,
        # since a gateway may quote what it refused. `said=None`: the gateway said nothing.
        try:
            response = await self._client.post(url, content=outgoing.payload, headers=headers)
        except httpx.TimeoutException as err:
            raise DeliveryError(
                f"POST {shown}: no answer within {self.options.timeout:g} s ({type(err).__name__})",
                said=None,
            ) from err
        except httpx.TransportError as err:
            # httpx's own words may quote the URL too.
            reason = without_password(f"{type(err).__name__}: {err}")
            raise DeliveryError(f"POST {shown}: {reason}", said=None) from err
        status = response.status_code
        if 200 <= status < 300:
            return f"HTTP {status}"
        excerpt = " ".join(response.text.split())[:200]
        retryable = status in self.RETRYABLE_STATUS or status >= 500
        raise DeliveryError(
            f"POST {shown}: HTTP {status}", retryable=retryable, said=excerpt or None
        )


def _kind(work: Work) -> str:
    """The care event's kind when a translator made one, else classified from MSH-9/PV1-2."""
    kind = getattr(work.event, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    message = work.message
    try:
        patient_class = work.view.get("PV1-2")
    except NotHL7Error:
        patient_class = ""
    return event_kind(message.message_type or "", message.trigger_event or "", patient_class)


# -- counters for this process ----------------------------------------------------------------
@dataclass(slots=True)
class StepTiming:
    count: int = 0
    total: float = 0.0
    slowest: float = 0.0


@dataclass(slots=True)
class PagerStats:
    """Failures and step timings seen by this process. Observers and steps run on the worker
    thread while readers may be elsewhere, hence the lock."""

    failures: Counter[str] = field(default_factory=Counter)  # by channel
    dead: Counter[str] = field(default_factory=Counter)  # failures that went to dead letters
    steps: dict[str, StepTiming] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def failed(self, channel: str, final: bool) -> None:
        with self._lock:
            self.failures[channel] += 1
            if final:
                self.dead[channel] += 1

    def timed(self, step: str, seconds: float) -> None:
        with self._lock:
            timing = self.steps.setdefault(step, StepTiming())
            timing.count += 1
            timing.total += seconds
            timing.slowest = max(timing.slowest, seconds)

    def reset(self) -> None:
        with self._lock:
            self.failures.clear()
            self.dead.clear()
            self.steps.clear()


STATS = PagerStats()


# -- the command ------------------------------------------------------------------------------
def pager_deliveries(
    store: MessageStore, limit: int
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """(count by status, newest dead letters) of deliveries through the pager channel."""
    from carehub.store.schema import deliveries as table
    from sqlalchemy import func, select

    pager = table.c.channel == PagerChannel.name
    with store.engine.connect() as conn:
        counts = {
            status: count
            for status, count in conn.execute(
                select(table.c.status, func.count()).where(pager).group_by(table.c.status)
            )
        }
        dead = [
            dict(row._mapping)
            for row in conn.execute(
                select(
                    table.c.id,
                    table.c.message_id,
                    table.c.destination,
                    table.c.attempts,
                    table.c.last_error,
                )
                .where(pager, table.c.status == "dead")
                .order_by(table.c.id.desc())
                .limit(limit)
            )
        ]
    return counts, dead


@click.command("pager-status")
@hub_options
@click.option(
    "--schedule",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also list who each unit pages, from this schedule file.",
)
@click.option("--limit", type=int, default=5, show_default=True, help="Dead letters to show.")
def pager_status(config: HubConfig, data_dir: Path, schedule: Path | None, limit: int) -> None:
    """Pager deliveries in the store by status, and the newest that gave up, with why."""
    from carehub.hub import open_store

    store = open_store(config, data_dir)
    try:
        counts, dead = pager_deliveries(store, limit)
    finally:
        store.close()
    if counts:
        summary = ", ".join(f"{status} {counts[status]}" for status in sorted(counts))
        click.echo(f"pager deliveries: {summary}")
    else:
        click.echo("pager deliveries: none")
    for row in dead:
        click.echo(
            f"  dead #{row['id']} message {row['message_id']} to {row['destination']} after "
            f"{row['attempts']} attempt(s): {without_password(row['last_error'] or '')}"
        )
    if schedule is not None:
        for unit, on_call in sorted(load_schedule(schedule).items()):
            click.echo(f"on call {unit}: {on_call.name} (pager {on_call.pager})")


# -- hooks ------------------------------------------------------------------------------------
@hookimpl
def carehub_register_enrichers(register: Callable[[type[Enricher]], None]) -> None:
    register(OnCallEnricher)


@hookimpl
def carehub_register_channels(register: Callable[[type[Channel]], None]) -> None:
    register(PagerChannel)


@hookimpl
def carehub_register_commands(register: Callable[[click.Command], None]) -> None:
    register(pager_status)


@hookimpl
def carehub_message_failed(delivery: DeliveryRecord, error: str, final: bool) -> None:
    """Count it; an observer must be quick, so nothing here waits on I/O."""
    STATS.failed(delivery.channel, final)


@hookimpl(wrapper=True)
def carehub_run_step(work: Work, step: str, run: Callable[[], Any]) -> Generator[None, Any, Any]:
    """Time the step, whether it returns or raises; the result passes through untouched."""
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        STATS.timed(step, time.perf_counter() - started)
