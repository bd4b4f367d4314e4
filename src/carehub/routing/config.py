"""Route files: YAML under config/routes/, validated by pydantic before anything starts.

    routes:
      - name: discharges-to-care-platform
        when: {type: ADT, events: [A03], patient_class: [I, E]}
        steps:
          - translate: v2-to-event
          - filter: {fields: {PV1-36: {not: "20"}}}      # not expired
          - forward: {channel: webhook, url: "${CARE_PLATFORM_URL}", retry: {max_attempts: 10}}
          - forward: {channel: file, directory: ../outbox/discharges}

Step kinds: ``translate`` and ``enrich`` name a registered component (``translate: NAME`` or
``translate: {use: NAME, ...options}``); ``transform`` and ``validate`` are the built-in
translators of those names; ``filter`` takes a condition like ``when`` and ends the route for
messages that fail it (both are carehub.routing.conditions: named conditions, ``fields`` by
terse path, ``[*]`` for any repetition, ``any``/``all``/``not`` lists that nest);
``forward`` names a ``channel`` plus that channel's options; ``notify`` tells a patient's care
team (see carehub.care.notify).
Errors name the file, the line, the route and the key.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from carehub.config import (
    ENV_DATA_DIR,
    HubConfig,
    UnsetVariable,
    _line_of,
    _loc_text,
    check_no_duplicate_keys,
    expand_tree,
    read_config_text,
    unknown_key_hint,
    where_in_config,
)
from carehub.errors import ConfigError
from carehub.routing.conditions import When
from carehub.timespans import parse_age

STEP_KINDS = (
    "translate",
    "enrich",
    "transform",
    "validate",
    "filter",
    "forward",
    "notify",
    "notify-referral",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: The longest give_up_after kept, in seconds: the store's 32-bit column (about 68 years).
MAX_SPAN = 2**31 - 1


class RetryPolicy(_Strict):
    """Exponential backoff with jitter: delay n = min(max_delay, initial * multiplier**(n-1)),
    then spread by +/- jitter so retries from many messages do not arrive in lockstep.

    A delivery that goes on failing becomes a dead letter when it reaches either limit
    written: ``max_attempts`` attempts, or ``give_up_after`` (a span: ``90s``, ``30m``,
    ``24h``, ``3d``, or seconds) since its first failed attempt. With neither written it is
    retried for DEFAULT_GIVE_UP_AFTER: a receiving system down for a maintenance window, or
    a night, gets its backlog when it comes back, as an interface engine's queue does, not a
    dead-letter queue for an operator to retry by hand. ``max_attempts`` written alone keeps
    its meaning (no time limit); ``0`` (or ``forever``) for both retries until the
    destination takes it, for a receiver where order matters more than time. A refusal for
    good (HTTP 400, an AR) still makes a dead letter at once, as repeating it would not
    change the answer.

    ``after_dead_letter`` is what a dead letter does to the later deliveries of its patient to
    its destination (its line): ``hold`` keeps them waiting until the dead letter is retried
    or discarded (``carehub dead-letters``), so the receiver never gets a newer message before
    an older one (an A03 before the A01 it discharges); ``continue`` lets them go on, for a
    receiver where order does not matter. Unset, the channel decides (CONTINUE_BY_DEFAULT)."""

    #: Channels whose dead letters let the line go on unless ``after_dead_letter: hold``: each
    #: notice is read by a person on its own, and a notify step's destination carries every
    #: care-team member of a patient in one line, so one bad address or number would otherwise
    #: stop that patient's later notices to everyone.
    CONTINUE_BY_DEFAULT: ClassVar[frozenset[str]] = frozenset({"email", "sms"})
    #: Seconds a delivery is retried, from its first failure, when no limit is written.
    DEFAULT_GIVE_UP_AFTER: ClassVar[int] = 86_400

    max_attempts: int = Field(
        0,
        description="attempts before a delivery that goes on failing is a dead letter; 0 (or "
        "forever): no count limit",
    )
    #: Seconds from the first failed attempt; None: not written (see give_up_seconds).
    give_up_after: int | None = Field(
        None,
        description="how long (90s, 30m, 24h, 3d, or seconds) a delivery is retried from its "
        "first failed attempt before it is a dead letter; forever (or 0): no time limit; "
        "unset: 24h, unless max_attempts is written, which is then the only limit",
    )
    initial_delay: float = Field(1.0, ge=0, description="seconds before the first retry")
    multiplier: float = Field(2.0, ge=1, description="each retry's delay over the one before")
    max_delay: float = Field(600.0, ge=0, description="the longest delay between two attempts")
    jitter: float = Field(
        0.2, ge=0, le=1, description="each delay spread by up to this fraction either way"
    )
    after_dead_letter: Literal["hold", "continue"] | None = Field(
        None,
        description="hold: a dead letter holds its patient's later deliveries to this "
        "destination; continue: they go on; unset: continue for email and sms, else hold",
    )

    @field_validator("max_attempts", mode="before")
    @classmethod
    def _forever(cls, value: Any) -> Any:
        """``forever`` reads better in a route file than 0, and means the same."""
        return 0 if isinstance(value, str) and value.strip().lower() == "forever" else value

    @field_validator("max_attempts")
    @classmethod
    def _not_negative(cls, value: int) -> int:
        """The error says what 0 means, as the next thing one would try."""
        if value < 0:
            raise ValueError("must be 1 or more, or 0 (or forever) to retry until it works")
        return value

    @field_validator("give_up_after", mode="before")
    @classmethod
    def _span(cls, value: Any) -> Any:
        """A span as the CLI's ages are written (``30m``, ``24h``, ``3d``), seconds, or
        ``forever``; the error shows the forms, as the next thing one would try."""
        forms = "use a span such as 90s, 30m, 24h or 3d, a number of seconds, or forever"
        if value is None or isinstance(value, bool):
            raise ValueError(forms)
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "forever":
                return 0
            span = parse_age(text)
            if span is None:
                raise ValueError(f"{value!r}: {forms}")
            return min(int(span.total_seconds()), MAX_SPAN)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 or more: 0 (or forever) gives up never")
        if isinstance(value, int):
            return min(value, MAX_SPAN)  # what the store's integer column holds (68 years)
        return value

    @property
    def give_up_seconds(self) -> int:
        """Seconds from a delivery's first failed attempt after which a failure makes it a
        dead letter; 0: no time limit. Unwritten, DEFAULT_GIVE_UP_AFTER unless
        ``max_attempts`` is written, which then is the only limit."""
        if self.give_up_after is not None:
            return self.give_up_after
        return 0 if "max_attempts" in self.model_fields_set else self.DEFAULT_GIVE_UP_AFTER

    @property
    def forever(self) -> bool:
        """Whether a delivery that goes on failing is never given up on."""
        return self.max_attempts == 0 and self.give_up_seconds == 0

    def holds_line(self, channel: str) -> bool:
        """Whether a dead letter to this destination (of ``channel``) holds its line."""
        if self.after_dead_letter is None:
            return channel not in self.CONTINUE_BY_DEFAULT
        return self.after_dead_letter == "hold"

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        # Capped before the power: a delivery retried forever reaches attempts where the
        # power alone would overflow a float.
        exponent = min(attempt - 1, 1024)
        try:
            grown = self.initial_delay * self.multiplier**exponent
        except OverflowError:
            grown = self.max_delay
        base = min(self.max_delay, grown)
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


#: What a step kind written with no value (``filter:``, YAML's null) is told, by field name.
_NULL_STEP = {
    "translate": "names its component: `translate: NAME` or `translate: {use: NAME, ...}`",
    "enrich": "names its component: `enrich: NAME` or `enrich: {use: NAME, ...}`",
    "transform": "needs its edits",
    "filter": "needs a condition, e.g. {type: ADT} or {fields: {PV1-2: I}}",
    "forward": "needs its channel and that channel's options, e.g. {channel: file, directory: out}",
    "notify": "needs its settings, at least `channels:`",
    "notify_referral": "needs its settings, at least `channels:`",
}


class StepConfig(_Strict):
    """Exactly one of the step kinds, with its settings."""

    translate: str | dict[str, Any] | None = None
    enrich: str | dict[str, Any] | None = None
    transform: dict[str, Any] | None = None
    validate_: dict[str, Any] | None = Field(None, alias="validate")
    filter: When | None = None
    forward: dict[str, Any] | None = None
    notify: dict[str, Any] | None = None
    notify_referral: dict[str, Any] | None = Field(None, alias="notify-referral")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError(f"a step is a mapping with one of: {', '.join(STEP_KINDS)}")
        kinds = [k for k in value if k in STEP_KINDS]
        unknown = [k for k in value if k not in STEP_KINDS]
        if unknown:
            raise ValueError(
                f"unknown step kind {unknown[0]!r}; expected one of: {', '.join(STEP_KINDS)}"
            )
        if len(kinds) != 1:
            raise ValueError(f"a step has exactly one kind; this one has {kinds}")
        if value.get("validate") is None and "validate" in value:
            value = {"validate": {}}
        return value

    @field_validator(
        "translate",
        "enrich",
        "transform",
        "filter",
        "forward",
        "notify",
        "notify_referral",
        mode="before",
    )
    @classmethod
    def _written_out(cls, value: Any, info: ValidationInfo) -> Any:
        """A kind written with nothing after it (``filter:``) is YAML's null, which would
        otherwise read as the kind left out: a step of no kind at all."""
        if value is None:
            raise ValueError(_NULL_STEP[info.field_name or ""])
        return value

    @field_validator("filter")
    @classmethod
    def _filter_tests_something(cls, condition: When | None) -> When | None:
        """An empty condition holds for every message, so such a filter ends no route."""
        if condition is not None and condition.is_empty():
            raise ValueError(
                "is empty, and an empty condition holds for every message; give it a "
                "condition (e.g. {type: ADT}) or remove the step"
            )
        return condition

    @property
    def kind(self) -> str:
        for kind in STEP_KINDS:
            attribute = {"validate": "validate_", "notify-referral": "notify_referral"}.get(
                kind, kind
            )
            if getattr(self, attribute) is not None:
                return kind
        raise AssertionError("validated step without a kind")

    def component(self) -> tuple[str, dict[str, Any]]:
        """(component name, options) for translate/enrich/transform/validate steps."""
        kind = self.kind
        if kind in ("transform", "validate"):
            settings = self.transform if kind == "transform" else self.validate_
            return kind, dict(settings or {})
        value = self.translate if kind == "translate" else self.enrich
        if isinstance(value, str):
            return value, {}
        options = dict(value or {})
        name = options.pop("use", None)
        if not isinstance(name, str):
            raise ValueError(f"{kind}: name the component with 'use:'")
        return name, options


class ForwardConfig(_Strict):
    """The forward settings carehub itself reads; the rest are the channel's own options.
    A notify step's channels take them too (``name`` and ``retry`` are the step's)."""

    channel: str = Field(description="the registered channel that sends")
    name: str | None = Field(
        None,
        description="the destination's name within its route (ROUTE/NAME), under which its "
        "deliveries and their retries are kept; unset: the channel's name, for a route's only "
        "forward to that channel",
    )
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy, description="how often and how long a failed send is tried"
    )
    allow_cleartext: bool = Field(
        False,
        description="true: the site's word that this destination's receiver on this machine "
        "always holds its port (a mail relay, a TLS sidecar), so sending to it in clear is not "
        "warned about at start; a destination on another machine is warned about whatever it "
        "says",
    )


class RouteConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    enabled: bool = True
    when: When = Field(default_factory=When)
    steps: list[StepConfig] = Field(min_length=1)


class RoutesFile(_Strict):
    routes: list[RouteConfig] = Field(default_factory=list)


@dataclass(slots=True)
class RouteSource:
    """Where a route was written, so later errors can point at the file and line."""

    file: Path
    index: int
    node: yaml.Node | None

    def where(self, loc: tuple[Any, ...] = ()) -> str:
        line = _line_of(self.node, ("routes", self.index, *loc))
        return f"{self.file}{f':{line}' if line else ''}"


@dataclass(slots=True)
class LoadedRoute:
    config: RouteConfig
    source: RouteSource


def load_route_files(paths: list[Path], data_dir: Path | None = None) -> list[LoadedRoute]:
    """Read and validate route files; route names must be unique across all of them.

    ``${CAREHUB_DATA_DIR}`` in a route file is the data dir the hub runs with (--data-dir,
    $CAREHUB_DATA_DIR or the config's), so a file forward can write beside the store
    whichever data dir that is."""
    known = {ENV_DATA_DIR: str(data_dir)} if data_dir is not None else None
    loaded: list[LoadedRoute] = []
    seen: dict[str, LoadedRoute] = {}
    for path in paths:
        text = read_config_text(path, "the routes file")
        try:
            node = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            hint = _bracket_hint(text, mark.line) if mark else ""
            raise ConfigError(
                f"{path}{line}: not valid YAML: {getattr(err, 'problem', err)}{hint}"
            ) from err
        check_no_duplicate_keys(node, path)
        try:
            data = expand_tree(data, known=known)
        except UnsetVariable as err:
            line = _line_of(node, err.loc)
            raise ConfigError(f"{path}{f':{line}' if line else ''}: {err}") from None
        try:
            parsed = RoutesFile.model_validate(data)
        except ValidationError as err:
            raise ConfigError(_describe(err, path, node, data)) from None
        if not isinstance(data, dict) or "routes" not in data:
            # An empty file is most likely one caught half written, or emptied by mistake:
            # loading it would drop every route it held without a word. `routes: []` says
            # there are none on purpose.
            raise ConfigError(
                f"{path}: holds no routes (no `routes:` key); write `routes: []` if that is "
                "meant, give a route `enabled: false` to turn it off, or move the file out of "
                "the hub config's `routes:` globs"
            )
        for index, route in enumerate(parsed.routes):
            item = LoadedRoute(route, RouteSource(path, index, node))
            if route.name in seen:
                other = seen[route.name].source
                raise ConfigError(
                    f"{item.source.where(('name',))}: route {route.name!r} is already defined "
                    f"at {other.where(('name',))}"
                )
            seen[route.name] = item
            loaded.append(item)
    return loaded


# A terse path with a [n] or [*] (PID-3[*].4, NTE[2]) written inside a YAML flow collection.
_BRACKETED_PATH = re.compile(r"[{\[,]\s*[A-Z][A-Z0-9]{2}(?:\[[\d*]+\])?(?:-\d+)?\[")


def _bracket_hint(text: str, line: int) -> str:
    """YAML reads ``[`` inside ``{...}`` or ``[...]`` as the start of a list, so an unquoted
    ``{PID-3[*].4: SSA}`` fails with a message about aliases or flow mappings that does not
    say why; name the fix when the failing line holds such a path."""
    lines = text.splitlines()
    if 0 <= line < len(lines) and _BRACKETED_PATH.search(lines[line]):
        return (
            '; a path with [ ] inside { } or [ ] must be quoted, e.g. {"PID-3[*].4": SSA} '
            "(or written in block style, one key per line)"
        )
    return ""


def _describe(err: ValidationError, path: Path, node: yaml.Node | None, data: Any) -> str:
    problems = []
    for error in err.errors():
        loc = tuple(part for part in error["loc"] if part != "[key]")  # pydantic's key marker
        line = _line_of(node, loc, at_key=error["type"] == "extra_forbidden")
        where = f"{path}{f':{line}' if line else ''}"
        route = ""
        if len(loc) >= 2 and loc[0] == "routes" and isinstance(loc[1], int):
            try:
                route = f"route {data['routes'][loc[1]].get('name', '#' + str(loc[1]))!r}: "
            except (KeyError, IndexError, TypeError, AttributeError):
                route = f"route #{loc[1]}: "
            loc = loc[2:]
        hint = unknown_key_hint(RoutesFile, error)
        problems.append(f"{where}: {route}{_loc_text(loc) or '(route)'}: {error['msg']}{hint}")
    return "\n".join(problems)


def route_files(config_dir: Path, patterns: list[str]) -> list[Path]:
    """The route files named by glob patterns relative to the config folder, sorted."""
    found: list[Path] = []
    for pattern in patterns:
        base = Path(pattern)
        if base.is_absolute():
            found += sorted(Path(base.anchor).glob(str(base.relative_to(base.anchor))))
        else:
            found += sorted(config_dir.glob(pattern))
    return list(dict.fromkeys(found))


def configured_route_files(config: HubConfig, config_dir: Path) -> list[Path]:
    """The route files the config's ``routes:`` names, each entry written there checked to
    name at least one: a misspelt file name or pattern would leave the hub answering AA and
    routing nothing, without a word. ``routes: []`` is how a config says it has none on
    purpose. The default (``routes/*.yaml``, for a config that leaves ``routes:`` out) may
    match nothing: such a config never asked for route files."""
    if "routes" in config.model_fields_set:
        for index, pattern in enumerate(config.routes):
            is_glob = any(c in pattern for c in "*?[")
            found = (
                route_files(config_dir, [pattern]) if is_glob else (config_dir / pattern).is_file()
            )
            if found:
                continue
            where = where_in_config(config, "routes", index)
            if not is_glob:
                raise ConfigError(f"{where}: no routes file {config_dir / pattern}")
            raise ConfigError(
                f"{where}: {pattern!r} matches no file in {config_dir}; write `routes: []` for "
                "a hub with no routes"
            )
    return route_files(config_dir, config.routes)
