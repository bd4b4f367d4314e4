"""Hub configuration: a YAML file validated by pydantic, with ${VAR} and ${VAR:-default}.

Errors name the file, the line and the key (``config/carehub.yaml:14: listeners.mllp[0].port:
Input should be less than or equal to 65535``), so the fix is obvious from the message alone.
"""

from __future__ import annotations

import codecs
import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import unquote_plus

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError
from yaml.constructor import SafeConstructor

from carehub.errors import ConfigError

ENV_DATA_DIR = "CAREHUB_DATA_DIR"
ENV_CONFIG = "CAREHUB_CONFIG"
ENV_HTTP_TOKENS = "CAREHUB_HTTP_TOKENS"
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
#: A dropped file is read whole: a nightly batch of 100,000 ADT messages is about 260 MB.
DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024
#: Seconds between heartbeats on broker connections (queue.heartbeat).
QUEUE_HEARTBEAT_SECONDS = 30
#: ${VAR} or ${VAR:-default}; the default may itself hold ${OTHER} references (one level).
_ENV_REFERENCE = re.compile(
    r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-((?:[^${}]|\$(?!\{)|\$\{[^{}]*\})*))?\}"
)
#: What is left of a ${...} carehub does not expand (unclosed, a name it cannot hold, a shell
#: form like ${VAR-x}), or a shell-style $NAME. A $ after a backslash is a regex's literal $.
_STRAY_REFERENCE = re.compile(r"(?<!\\)\$(\{|[A-Za-z_][A-Za-z0-9_]*)")
#: How environment variables are named: a $NAME of this form is taken for one even when it
#: is not set. Other names ($process-message, a FHIR operation in a URL) are left as text
#: unless a variable of that name is set.
_VARIABLE_STYLE = re.compile(r"[A-Z_][A-Z0-9_]*")


#: Variable names that hold secrets: an unset one is not to be given a default in the file.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|PRIVATE", re.IGNORECASE)
#: Keys whose value is where carehub sends (a destination's URL or host, the store's, the
#: broker's): an unset variable there is told to be set, not given a default, since a default
#: sends patient data to whatever listens at it. A ``host`` under ``listeners`` is where the
#: hub listens, not where it sends, and may have a default.
_ADDRESS_KEYS = frozenset({"url", "base_url", "api_url", "host"})
_LISTENING = "listeners"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _known_codec(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError as err:
        raise ValueError(f"unknown character set {value!r}") from err
    return value


class TLSConfig(_Strict):
    """Certificate and key for a listener's TLS (MLLP over TLS, HTTPS). With client_ca, every
    sender must present a certificate signed by it (mutual TLS); ``require_client_cert: false``
    beside it checks a certificate only when one is presented, and takes senders without one."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool | None = Field(
        None,
        description="unset: required when client_ca is given; false: optional (senders "
        "without a certificate are taken); true: required (needs client_ca)",
    )


#: The answer to a message the store could not take (a full disk, a lost database), which the
#: sender must send again. HL7 v2 gives AR for "rejected for a reason unrelated to content or
#: format" (system down) and AE for an error in the message; senders differ in which of the
#: two they resend, so a listener says which its senders resend. AE by default, as before.
NOT_STORED_ACK_DEFAULT = "AE"
NOT_STORED_ACK_HELP = (
    "the acknowledgment code of a message the store could not take (a full disk, a lost "
    "database), which the sender must send again: AE (the default), or AR, HL7's code for a "
    "message rejected for a reason unrelated to its content (system down); choose the one "
    "this listener's senders resend"
)


#: HL7 table 0103: what MSH-11.1 says a message is for.
ProcessingId = Literal["P", "T", "D"]
PROCESSING_IDS_HELP = (
    "the MSH-11 processing IDs (HL7 table 0103: P production, T training, D debugging) this "
    "listener takes; a message with another is answered AR (CR in enhanced mode) and stored "
    "as rejected, never routed, so that a test system pointed at a production port by "
    "mistake feeds nobody's care team (one with MSH-11 empty is refused, AE, as an empty "
    "MSH-10 is)"
)


def _processing_ids() -> list[ProcessingId]:
    return ["P"]


class MLLPListenerConfig(_Strict):
    name: str = "mllp"
    host: str = "0.0.0.0"
    port: int = Field(2575, ge=0, le=65535)
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    idle_timeout: float = Field(600.0, ge=0, description="seconds; 0 keeps idle connections")
    max_connections_per_peer: int = Field(
        64,
        ge=1,
        description="open connections one peer address may hold; past it the peer's longest "
        "idle connection is closed to make room (a sender that leaks connections cannot use "
        "up the hub's file descriptors)",
    )
    frame_timeout: float = Field(
        60.0,
        ge=0,
        description="seconds a frame may take from its start block to its end; past it the "
        "connection is closed, the frame unanswered (a peer sending a byte now and then "
        "cannot hold a connection for ever); 0: no limit",
    )
    default_charset: str = "utf-8"
    tls: TLSConfig | None = None
    enhanced_acks: bool = Field(
        False,
        description="honour enhanced-mode acknowledgment: a message with MSH-15 or MSH-16 "
        "valued is answered with an accept ACK (CA stored, CE refused or not stored, CR "
        "rejected), sent only when MSH-15 asks (AL always, NE never, ER on errors, SU on "
        "success), then, on the same connection, with an application ACK (AA/AE/AR) when "
        "MSH-16 asks in the same terms; off, every frame gets an original-mode AA/AE/AR",
    )
    not_stored_ack: Literal["AE", "AR"] = Field(
        NOT_STORED_ACK_DEFAULT,
        description=NOT_STORED_ACK_HELP,
    )
    processing_ids: list[ProcessingId] = Field(
        default_factory=_processing_ids, min_length=1, description=PROCESSING_IDS_HELP
    )

    _charset = field_validator("default_charset")(_known_codec)


class HTTPListenerConfig(_Strict):
    enabled: bool = True
    #: This machine only unless asked: HTTP intake without tokens takes posts from anyone who
    #: reaches the port (serve warns when it is opened wider without them).
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tokens: list[str] = Field(
        default_factory=list,
        description="bearer tokens; no tokens key (and no CAREHUB_HTTP_TOKENS) = open",
    )
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    default_charset: str = "utf-8"
    not_stored_ack: Literal["AE", "AR"] = Field(
        NOT_STORED_ACK_DEFAULT,
        description=NOT_STORED_ACK_HELP,
    )
    processing_ids: list[ProcessingId] = Field(
        default_factory=_processing_ids, min_length=1, description=PROCESSING_IDS_HELP
    )
    status_codes: Literal["hl7_over_http", "by_ack"] = Field(
        "hl7_over_http",
        description="hl7_over_http: the ACK of every stored message comes with 200, AE and AR "
        "too, as HL7 over HTTP has it (a sender that retries any status of 400 or more would "
        "resend a refused message forever); 503 not stored, 413 too large and 401 stay. "
        "by_ack: 422 with an AE, 400 with an AR",
    )
    api_docs: bool = Field(
        False,
        description="serve the API description at /docs, /redoc and /openapi.json, without "
        "a token; off, they are not served",
    )
    organization_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="community organisation name -> its bearer token for POST "
        "/referrals/{key}/status only: it may update only the referrals sent to it, its "
        "answers are recorded as its own, and it opens nothing else (not /hl7)",
    )
    #: HTTPS, as the MLLP listener's tls: without it, bearer tokens, messages and referral
    #: updates cross the network in clear (serve warns when it is bound beyond loopback).
    tls: TLSConfig | None = None
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request's line and headers, from when it "
        "connects (after the TLS handshake) or its previous answer is sent; past it the "
        "connection is closed",
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="seconds a request's body may take to arrive whole once its headers have; "
        "past it the connection is closed and nothing of the request is stored",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="open connections the listener holds; one more is closed at once (keep "
        "it well below the open-file limit, ulimit -n)",
    )
    max_connections_per_peer: int = Field(
        64,
        ge=1,
        description="open connections one peer address may hold; one more is closed at once",
    )

    _charset = field_validator("default_charset")(_known_codec)

    @field_validator("tokens")
    @classmethod
    def _no_empty_token(cls, tokens: list[str]) -> list[str]:
        """A token that came out empty (``${CAREHUB_HTTP_TOKEN}`` with the variable set to
        nothing) must not count as "no tokens": intake would be open to anyone."""
        for index, token in enumerate(tokens):
            if not token.strip():
                raise ValueError(
                    f"token {index + 1} of {len(tokens)} is empty (a variable it names may be "
                    "set to nothing); an empty token would let anyone in: give it a value or "
                    "remove it"
                )
        return tokens

    @model_validator(mode="after")
    def _organization_tokens_are_their_own(self) -> HTTPListenerConfig:
        """Each organisation's token must be non-empty and its alone: a token shared with
        intake would let a community organisation post HL7 into the hospital's feed, and one
        shared by two organisations would let each answer for the other."""
        seen: dict[str, str] = {}
        for name, token in self.organization_tokens.items():
            if not name.strip():
                raise ValueError("organization_tokens: an organisation name is empty")
            if not token.strip():
                raise ValueError(
                    f"organization_tokens: the token of {name!r} is empty (a variable it names "
                    "may be set to nothing): give it a value or remove the entry"
                )
            if token in self.tokens:
                raise ValueError(
                    f"organization_tokens: the token of {name!r} is also an intake token "
                    "(listeners.http.tokens), which would let it post HL7: give it its own"
                )
            if token in seen:
                raise ValueError(
                    f"organization_tokens: {seen[token]!r} and {name!r} have the same token, "
                    "so each could answer for the other: give each its own"
                )
            seen[token] = name
        return self


class FileDropConfig(_Strict):
    name: str = "files"
    directory: Path
    processed_dir: Path | None = None
    error_dir: Path | None = None
    poll_interval: float = Field(1.0, gt=0)
    settle_seconds: float = Field(1.0, ge=0, description="a file must be unchanged this long")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=1024)
    max_file_bytes: int = Field(
        DEFAULT_MAX_FILE_BYTES,
        ge=1024,
        description="a larger file is not read (it is moved to error/ with the reason): a "
        "file is read whole, so this bounds the memory one dropped file can take",
    )
    default_charset: str = "utf-8"
    processing_ids: list[ProcessingId] = Field(
        default_factory=_processing_ids, min_length=1, description=PROCESSING_IDS_HELP
    )

    _charset = field_validator("default_charset")(_known_codec)


class ListenersConfig(_Strict):
    mllp: list[MLLPListenerConfig] = Field(default_factory=lambda: [MLLPListenerConfig()])
    http: HTTPListenerConfig = Field(default_factory=HTTPListenerConfig)
    files: list[FileDropConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_are_unique(self) -> ListenersConfig:
        """Each stored message records the listener it came by, and the metrics count by it:
        two listeners of one name could not be told apart."""
        seen: set[str] = set()
        for listener in [*self.mllp, *self.files]:
            if listener.name in seen:
                raise ValueError(f"two listeners are named {listener.name!r}; names must differ")
            seen.add(listener.name)
        return self


class StoreConfig(_Strict):
    url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in the data dir")
    durability: Literal["process", "power"] = "process"

    @field_validator("url")
    @classmethod
    def _empty_means_default(cls, value: str | None) -> str | None:
        return value or None


class QueueConfig(_Strict):
    """The work queue between intake and routing workers (kombu)."""

    url: str = Field("memory://", description="memory:// in-process, or amqp://user:pw@host//")
    #: Queues that patients are spread over; each is consumed by one worker at a time. None:
    #: 8 on a broker, 1 in-process, where the one in-process worker consumes them all and
    #: more queues only split each commit group into more queue messages.
    partitions: int | None = Field(None, ge=1, le=1024)
    heartbeat: int = Field(
        QUEUE_HEARTBEAT_SECONDS,
        ge=1,
        le=3600,
        description="seconds between heartbeats on broker connections: one that goes silent "
        "without closing (a firewall dropping it, a hung broker) is noticed within about "
        "twice this and opened again",
    )

    @field_validator("url")
    @classmethod
    def _not_empty(cls, url: str) -> str:
        """An empty URL (``${CAREHUB_QUEUE_URL:-}`` with the variable unset) would be kombu's
        default, amqp://guest:guest@localhost//: another broker than the deployment's."""
        if not url.strip():
            raise ValueError(
                "empty (a variable it names may be set to nothing): give memory:// for the "
                "in-process queue or the broker's amqp://user:password@host:5672// URL"
            )
        return url

    def partition_count(self) -> int:
        if self.partitions is not None:
            return self.partitions
        return 1 if self.url.startswith("memory") else 8


class WorkerConfig(_Strict):
    """The routing and delivery worker that `carehub serve` runs in-process."""

    enabled: bool = True
    delivery_concurrency: int = Field(128, ge=1)
    per_destination: int = Field(32, ge=1, description="sends in flight to one destination")
    poll_interval: float = Field(0.5, gt=0, description="seconds between checks for retries")
    tick_interval: float = Field(30.0, gt=0, description="seconds between periodic jobs")
    lease_seconds: float = Field(
        60.0,
        ge=1,
        description="seconds a claimed delivery stays with its worker unless renewed; a "
        "worker renews its own every third of this, so the deliveries of one that dies "
        "mid-send go back in line within this time",
    )
    send_timeout: float = Field(
        300.0,
        gt=0,
        description="seconds one send may take before it counts as a failed attempt "
        "(a channel's own timeout normally ends it first)",
    )


class HubIdentity(_Strict):
    """How the hub names itself in ACKs when the sender left MSH-5/MSH-6 empty."""

    application: str = "CAREHUB"
    facility: str = ""


class HubConfig(_Strict):
    data_dir: Path | None = None
    hub: HubIdentity = Field(default_factory=HubIdentity)
    store: StoreConfig = Field(default_factory=StoreConfig)
    listeners: ListenersConfig = Field(default_factory=ListenersConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    routes: list[str] = Field(
        default_factory=lambda: ["routes/*.yaml"],
        description="route files: glob patterns relative to this file's folder",
    )
    plugins_dir: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    #: Where the file was read from; relative paths in it are taken from its folder.
    source: Path | None = Field(None, exclude=True)
    #: Settings a command-line option replaced, by key path (("listeners", "http", "port") ->
    #: "--http-port"), so an error about one names the option rather than the file.
    overridden: dict[tuple[str | int, ...], str] = Field(default_factory=dict, exclude=True)


def expand_env(value: str, where: str, known: Mapping[str, str] | None = None) -> str:
    """Replace ${VAR} and ${VAR:-default}; a missing variable without default is an error,
    and so is a reference carehub would leave as text (see unexpanded_reference).
    ``known``: values carehub itself supplies (CAREHUB_DATA_DIR in route files) for names
    the environment does not set."""
    stray = unexpanded_reference(value, known)
    if stray is not None:
        raise ConfigError(f"{where}: {stray}")

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if known and name in known:
            return known[name]
        if default is not None:
            return expand_env(default, where, known)
        if _SECRET_NAME.search(name):
            hint = "set it in the environment: a secret has no default"
        elif _is_address(where):
            hint = (
                "set it to the address of the system it names: an address has no default, "
                "so nothing is sent where nobody said"
            )
        else:
            hint = f"write ${{{name}:-default}} to give a default"
        raise ConfigError(f"{where}: environment variable {name} is not set ({hint})")

    return _ENV_REFERENCE.sub(replace, value)


def _is_address(where: str) -> bool:
    """Whether the key path ``where`` (listeners.http.host, routes[0].steps[2].forward.url)
    names where carehub sends."""
    return where.rsplit(".", 1)[-1] in _ADDRESS_KEYS and not where.startswith(_LISTENING)


def unexpanded_reference(value: str, known: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with a value written in a config or route file that still holds a
    variable reference after expansion, or None. carehub expands only ${NAME} and
    ${NAME:-default}: a shell habit ($EHR_HOST) or a ${ left open would otherwise stay as
    text, and a file forward would write patient data under a folder named
    $CAREHUB_DATA_DIR, an MLLP forward dial a host named so.

    Only the text written in the file is read (a variable's value may hold any $), and a $NAME
    is taken for a variable when NAME is written as variables are (upper case, digits, _) or
    names one that is set: a FHIR operation ($process-message) or a regex's $ stays text."""
    last = 0
    pieces: list[str] = []
    for match in _ENV_REFERENCE.finditer(value):
        pieces.append(value[last : match.start()])
        if match.group(2):
            inner = unexpanded_reference(match.group(2), known)
            if inner is not None:
                return inner
        last = match.end()
    pieces.append(value[last:])
    for piece in pieces:
        for stray in _STRAY_REFERENCE.finditer(piece):
            name = stray.group(1)
            if name == "{":
                written = piece[stray.start() :]
                shown = written if len(written) <= 40 else written[:40] + "..."
                return (
                    f"{shown!r} is not a reference carehub expands (a ${{ left open, or a "
                    "form other than ${NAME} and ${NAME:-default}): close it, e.g. "
                    "${EHR_HOST} or ${EHR_HOST:-ehr.example.org}"
                )
            if _VARIABLE_STYLE.fullmatch(name) or name in os.environ or (known and name in known):
                return (
                    f"${name} is not expanded: carehub expands only ${{NAME}}, so write "
                    f"${{{name}}} (a $ before a name meant as text, as in a password, is "
                    "given through a variable)"
                )
    return None


def referenced_environment(text: str) -> list[tuple[str, str | None]]:
    """Every environment variable ``text`` names in a ${VAR} (defaults included), sorted, with
    its value here (None when unset): what a file's meaning depends on beyond its bytes.
    ${CAREHUB_DATA_DIR} is left out: carehub supplies it from the data dir in use, which is
    the same for every process of one store however each was given it."""
    names: set[str] = set()
    pending = [text]
    while pending:
        for match in _ENV_REFERENCE.finditer(pending.pop()):
            names.add(match.group(1))
            if match.group(2):
                pending.append(match.group(2))
    names.discard(ENV_DATA_DIR)
    return [(name, os.environ.get(name)) for name in sorted(names)]


class UnsetVariable(ConfigError):
    """A value that cannot be expanded, at ``loc`` in the file's tree: a ${VAR} without a
    default whose variable is not set, or a reference carehub does not expand."""

    def __init__(self, loc: tuple[Any, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def expand_tree(
    node: Any, loc: tuple[Any, ...] = (), known: Mapping[str, str] | None = None
) -> Any:
    """Every string in a parsed YAML tree with its ${VAR}s replaced (UnsetVariable names the
    key path; the caller, which has the file and its YAML nodes, adds the file and line)."""
    if isinstance(node, str):
        try:
            return expand_env(node, _loc_text(loc), known)
        except ConfigError as err:
            raise UnsetVariable(loc, str(err)) from None
    if isinstance(node, list):
        return [expand_tree(v, (*loc, i), known) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: expand_tree(v, (*loc, k), known) for k, v in node.items()}
    return node


def _loc_text(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def check_no_duplicate_keys(node: yaml.Node | None, path: Path) -> None:
    """A key written twice in one mapping is an error naming its second line: YAML loaders
    keep the last one silently, so a second `routes:` or `port:` would quietly win."""
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            name = getattr(key, "value", None)
            if name in seen:
                line = key.start_mark.line + 1
                raise ConfigError(f"{path}:{line}: {name!r} is given twice in the same mapping")
            seen.add(name)
            check_no_duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            check_no_duplicate_keys(item, path)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...], at_key: bool = False) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of the nearest parent that exists.
    ``at_key``: the line of the key ``loc`` ends with rather than of its value, for an error
    about the key itself (a misspelt ``wehn:`` whose value is a block is on the line that
    says ``wehn``, not on its value's first line)."""
    line = node.start_mark.line + 1 if node is not None else None
    for index, part in enumerate(loc):
        key: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            pair = _entry(node, part)
            if pair is None:
                break
            key, node = pair
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
        else:
            break
        told = key if at_key and key is not None and index == len(loc) - 1 else node
        line = told.start_mark.line + 1
    return line


#: The tags YAML gives a plain (unquoted) scalar it reads as something other than text.
_NOT_TEXT_TAGS = {
    "tag:yaml.org,2002:int": "the number",
    "tag:yaml.org,2002:float": "the number",
    "tag:yaml.org,2002:bool": "",
}
#: The error type of a value that must be text and is not (see not_text).
NOT_TEXT = "not_text"


def yaml_value(node: yaml.Node) -> Any:
    """The Python value YAML makes of a node (``010`` -> 8, ``NO`` -> False), to find the
    entry of a key pydantic names by that value."""
    try:
        return SafeConstructor().construct_object(node, deep=True)
    except yaml.YAMLError:  # pragma: no cover - composed by the same YAML
        return node.value


def _entry(
    node: yaml.MappingNode, part: Any, input_value: Any = None
) -> tuple[yaml.Node, yaml.Node] | None:
    """(key node, value node) of the entry ``part`` names: the key written so, or one YAML
    read as a number or boolean equal to it (pydantic names the key 010 as 8, NO as 0);
    ``input_value``, when given, must be that very value (NO, not 0, for False)."""
    for key, value in node.value:
        if getattr(key, "value", None) == part and key.tag == "tag:yaml.org,2002:str":
            return key, value
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag not in _NOT_TEXT_TAGS:
            continue
        made = yaml_value(key)
        if made == part and (input_value is None or type(made) is type(input_value)):
            return key, value
    return None


def _written_nodes(
    node: yaml.Node | None, loc: tuple[Any, ...], input_value: Any = None
) -> list[yaml.Node | None]:
    """For each part of ``loc``, the YAML key node it named (None for a list index or a part
    not found); ``[key]`` (pydantic's mark for a mapping's key) names the key before it."""
    found: list[yaml.Node | None] = []
    for index, part in enumerate(loc):
        named_key = index + 1 < len(loc) and loc[index + 1] == "[key]"
        if isinstance(node, yaml.MappingNode) and part != "[key]":
            pair = _entry(node, part, input_value if named_key else None)
            found.append(pair[0] if pair else None)
            node = pair[1] if pair else None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            found.append(None)
            node = node.value[part] if part < len(node.value) else None
        else:
            found.append(None)
            node = None
    found.append(node)  # the value at loc itself
    return found


def yaml_reading(node: yaml.Node | None) -> str | None:
    """What YAML made of ``node`` ("the number 8", "false") when it is a plain scalar read as
    no text (an unquoted 010, NO), for an error to name what was written beside it; else None."""
    if not isinstance(node, yaml.ScalarNode) or node.style or node.tag not in _NOT_TEXT_TAGS:
        return None
    made = yaml_value(node)
    kind = _NOT_TEXT_TAGS[node.tag]
    return f"{kind} {made!r}" if kind else str(made).lower()


def not_text(value: Any) -> PydanticCustomError:
    """The error for a value that must be text (a code, a field's value) and that YAML read
    as a number or a boolean. It never offers the number YAML made as the fix (an unquoted 01
    is 1, 010 the octal 8): the file's loader, which has the YAML, names what was written."""
    made = "true/false" if isinstance(value, bool) else f"the number {value!r}"
    return PydanticCustomError(
        NOT_TEXT,
        f"is not text: YAML read it as {made} (an unquoted 01 is the number 1, 010 the octal "
        "number 8, NO false); quote it as the message writes it, e.g. '01'",
    )


def explain_error(
    node: yaml.Node | None, error: ErrorDetails, loc: tuple[Any, ...], at: tuple[Any, ...] = ()
) -> tuple[str, str]:
    """(key path, message) of one validation error at ``loc``, whose YAML node is at
    ``(*at, *loc)`` under ``node``. A key or value that must be text and that YAML read as a
    number or a boolean is named as written, with the fix: ``tables.locations.010: YAML read
    the key 010 as the number 8; quote it as written: '010'``, not ``locations[8].[key]``."""
    message = error["msg"]
    if error["type"] not in ("string_type", NOT_TEXT) or isinstance(error["input"], str):
        return _loc_text(loc), message
    nodes = _written_nodes(node, (*at, *loc), error["input"])[len(at) :]
    keys, value = nodes[:-1], nodes[-1]
    is_key = bool(loc) and loc[-1] == "[key]"
    written = keys[-2] if is_key and len(keys) >= 2 else value
    made = yaml_reading(written)
    if made is None or written is None:
        return _loc_text(loc), message
    text = str(written.value)
    shown: list[Any] = []
    for part, key in zip(loc, keys, strict=True):
        if part == "[key]":
            continue
        shown.append(str(key.value) if key is not None and yaml_reading(key) else part)
    what = "the key " if is_key else ""
    message = f"YAML read {what}{text} as {made}, not text; quote it as written: '{text}'"
    return _loc_text(tuple(shown)), message


def unknown_key_hint(model: type[BaseModel], error: ErrorDetails) -> str:
    """The suggestion ("; did you mean `when`?") for a key ``model`` does not know at the
    error's place (a misspelt ``wehn``, ``listener``) when a known key there is close; "" for
    any other error, or when no known key is close."""
    loc = tuple(part for part in error["loc"] if part != "[key]")
    if error["type"] != "extra_forbidden" or not loc or not isinstance(loc[-1], str):
        return ""
    known = _keys_at(model, loc[:-1])
    close = difflib.get_close_matches(loc[-1], known, n=1)
    return f"; did you mean `{close[0]}`?" if close else ""


def _keys_at(annotation: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys the model reached from ``annotation`` along ``loc`` takes, as written in a
    file (aliases: ``events``, ``any``); none when ``loc`` leads elsewhere."""
    for part in loc:
        annotation = _inner(annotation, part)
        if annotation is None:
            return []
    models = [a for a in _alternatives(annotation) if _is_model(a)]
    if len(models) != 1:
        return []
    return [field.alias or name for name, field in models[0].model_fields.items()]


def _inner(annotation: Any, part: Any) -> Any:
    """The type ``part`` of a value of type ``annotation`` has: a model's field, a list's item,
    a mapping's value; None when it has none or it is not one type."""
    found = []
    for option in _alternatives(annotation):
        origin = get_origin(option)
        if _is_model(option) and isinstance(part, str):
            for name, field in option.model_fields.items():
                if part in (name, field.alias):
                    found.append(field.annotation)
        elif origin in (list, tuple) and isinstance(part, int):
            found.append(get_args(option)[0])
        elif origin is dict and get_args(option):
            found.append(get_args(option)[1])
    return found[0] if len(found) == 1 else None


def _alternatives(annotation: Any) -> list[Any]:
    """The types a union (``X | None``) or Annotated[X, ...] stands for, None left out."""
    if get_origin(annotation) is Annotated:
        return _alternatives(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [a for option in get_args(annotation) for a in _alternatives(option)]
    return [] if annotation is type(None) else [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def read_config_text(path: Path, what: str, encoding: str = "utf-8") -> str:
    """The text of a file the configuration names (the config itself, routes, rosters, tables),
    or a ConfigError naming the file: why it cannot be read, or the line of the first byte that
    is not text in ``encoding``."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror or err}") from err
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"{path}:{line}: {what} is not {encoding.upper()} text "
            f"(byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


#: The password of a URL's userinfo (``//user:password@``): up to the last @ of the authority,
#: so a password holding an @ of its own is hidden whole.
_URL_PASSWORD = re.compile(r"(//[^:/?#@\s]*:)[^/?#\s]*@")
#: Words that make a query parameter's value a credential wherever they appear in its name,
#: case and ``_``/``-`` ignored: ``auth_token``, ``client_secret``, ``apiToken``, Vonage's
#: ``api_secret``, libpq's ``password``, ``X-Amz-Signature``, ``jsessionid``. A name
#: holding one of them by chance (``monkey``) is masked too: a value hidden for nothing costs
#: less than a credential in a log or a ticket.
SECRET_QUERY_WORDS = (
    "token",
    "secret",
    "key",
    "pass",  # password, passwd, passphrase, pass
    "pwd",
    "auth",
    "signature",
    "sig",
    "credential",
    "session",
)
#: Whole parameter names whose values are credentials too: OAuth's authorization ``code``,
#: and ``pw``/``p``/``pin``, too short to look for inside other names.
SECRET_QUERY_NAMES = frozenset({"code", "pw", "p", "pin"})
#: ``name=value`` after ``?``, ``&``, ``;`` (and ``#``, where OAuth puts an access token).
#: The value stops before a quote, whitespace, or a ``:``, ``,``, ``)`` or ``]`` that ends
#: it ("POST http://h/x?token=abc: ConnectError" keeps its ": ").
_QUERY_PARAMETER = re.compile(
    r"(?P<head>[?&;#](?P<name>[^=&;#?/\s'\"]+)=)"
    r"(?P<value>[^&;#\s'\"]*?)(?=[&;#\s'\"]|[:,)\]]*(?:\s|$)|$)"
)


def secret_query_parameter(name: str) -> bool:
    """Whether a URL query parameter called ``name`` (percent-encoded or not) carries a
    credential: see SECRET_QUERY_WORDS and SECRET_QUERY_NAMES."""
    plain = unquote_plus(name).lower().replace("_", "").replace("-", "")
    return plain in SECRET_QUERY_NAMES or any(word in plain for word in SECRET_QUERY_WORDS)


def _mask_query_value(match: re.Match[str]) -> str:
    if not match.group("value") or not secret_query_parameter(match.group("name")):
        return match.group(0)
    return f"{match.group('head')}***"


def without_password(text: str) -> str:
    """A URL, or a text quoting URLs (an error, a log line), as it may be printed or logged:
    a userinfo password and the values of query parameters named like credentials (see
    SECRET_QUERY_WORDS) replaced by ***. Channel, store and broker URLs carry credentials
    this way, and what is printed ends up in logs and tickets: every place that shows such
    a URL, or an error that may quote one, passes it through here."""
    masked = _URL_PASSWORD.sub(r"\1***@", text)
    return _QUERY_PARAMETER.sub(_mask_query_value, masked)


def where_in_config(config: HubConfig, *key: str | int) -> str:
    """``file:line: key.path`` for a setting found wrong after loading (a store that will not
    open, say), as load_config's own errors name it; just the key path without a file."""
    dotted = _loc_text(key)
    if key in config.overridden:
        return f"{config.overridden[key]}, in place of {dotted}"
    if config.source is None:
        return dotted
    try:
        tree = yaml.compose(config.source.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # ValueError: no longer UTF-8 text
        return f"{config.source}: {dotted}"
    if not isinstance(tree, yaml.MappingNode) or _entry(tree, key[0]) is None:
        # Not written in the file at all: its first line would point at something else.
        return f"{config.source}: {dotted} (not set there: the default)"
    return f"{config.source}:{_line_of(tree, key)}: {dotted}"


def load_config(path: Path | None) -> HubConfig:
    """Read and validate a config file; None gives the built-in defaults."""
    if path is None:
        config = HubConfig()
        http_tokens(config)  # refuses an empty $CAREHUB_HTTP_TOKENS
        return config
    text = read_config_text(path, "the config file")
    try:
        tree = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(err, 'problem', err)}") from err
    check_no_duplicate_keys(tree, path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    try:
        data = expand_tree(data)
    except UnsetVariable as err:
        line = _line_of(tree, err.loc)
        raise ConfigError(f"{path}{f':{line}' if line else ''}: {err}") from None
    try:
        config = HubConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            loc = tuple(error["loc"])
            line = _line_of(tree, loc, at_key=error["type"] == "extra_forbidden")
            shown, message = explain_error(tree, error, loc)
            hint = unknown_key_hint(HubConfig, error)
            problems.append(f"{path}{f':{line}' if line else ''}: {shown}: {message}{hint}")
        raise ConfigError("\n".join(problems)) from None
    config.source = path.resolve()
    http_tokens(config)  # an empty $CAREHUB_HTTP_TOKENS is refused with the file's own errors
    return resolve_paths(config, path.resolve().parent)


def resolve_paths(config: HubConfig, base: Path) -> HubConfig:
    """The config's relative paths taken from ``base``, the folder of the file it came from."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    config.data_dir = fix(config.data_dir)
    config.plugins_dir = fix(config.plugins_dir)
    for tls in [listener.tls for listener in config.listeners.mllp] + [config.listeners.http.tls]:
        if tls:
            tls.cert = fix(tls.cert)  # type: ignore[assignment]
            tls.key = fix(tls.key)  # type: ignore[assignment]
            tls.client_ca = fix(tls.client_ca)
    for drop in config.listeners.files:
        drop.directory = fix(drop.directory)  # type: ignore[assignment]
        drop.processed_dir = fix(drop.processed_dir)
        drop.error_dir = fix(drop.error_dir)
    return config


def resolve_data_dir(config: HubConfig, override: Path | None) -> Path:
    """--data-dir, then $CAREHUB_DATA_DIR, then the config's data_dir, then ./data."""
    if override is not None:
        return override.resolve()
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).resolve()
    if config.data_dir is not None:
        return config.data_dir.resolve()
    return Path("data").resolve()


def http_tokens(config: HubConfig) -> list[str]:
    """Bearer tokens from the config and from $CAREHUB_HTTP_TOKENS (comma-separated).

    The variable set but empty, or with an empty entry, is a ConfigError: dropping the empty
    entry could leave no token at all, and no token means intake takes posts from anyone."""
    tokens = list(config.listeners.http.tokens)
    if ENV_HTTP_TOKENS in os.environ:
        from_env = [t.strip() for t in os.environ[ENV_HTTP_TOKENS].split(",")]
        if not all(from_env):
            raise ConfigError(
                f"{ENV_HTTP_TOKENS} is set but holds an empty token (it is empty, or has an "
                "empty entry between commas); an empty token would let anyone in: give it "
                "comma-separated tokens, or unset it"
            )
        tokens += from_env
    _check_organization_tokens(config, tokens)
    return tokens


def _check_organization_tokens(config: HubConfig, intake_tokens: list[str]) -> None:
    """Organisation tokens mean organisations outside the hospital reach the HTTP port, so
    intake must have tokens of its own (without, /hl7, /metrics and /health's details answer
    anyone), and none of them may be an organisation's, from the config (checked as it is
    read) or from $CAREHUB_HTTP_TOKENS (checked here)."""
    organizations = config.listeners.http.organization_tokens
    if not organizations:
        return
    where = where_in_config(config, "listeners", "http", "organization_tokens")
    if not intake_tokens:
        raise ConfigError(
            f"{where}: organisations have tokens but intake has none (listeners.http.tokens "
            f"or ${ENV_HTTP_TOKENS}): /hl7, /metrics and /health's details would answer "
            "anyone who reaches the port, the organisations included: give intake its own token"
        )
    for name, token in organizations.items():
        if token in intake_tokens:
            raise ConfigError(
                f"{where}: the token of {name!r} is also an intake token (${ENV_HTTP_TOKENS}), "
                "which would let it post HL7: give it its own"
            )
