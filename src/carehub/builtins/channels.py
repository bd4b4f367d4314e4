"""carehub's built-in channels: ``file``, ``mllp`` and ``webhook``.

Each channel splits its work the way the delivery engine needs: ``render`` runs once, when the
message is routed, and fixes every byte that will be sent (so a retry a day later sends exactly
the same thing under the same idempotency key); ``send`` runs per attempt and only moves those
bytes, turning every failure into a ``DeliveryError`` that says whether retrying can help.
Secrets (Authorization values, HMAC keys) are applied in ``send`` and never recorded in the
rendered ``Outgoing``, which the store keeps.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import datetime as dt
import decimal
import enum
import hashlib
import hmac
import itertools
import json
import os
import re
import secrets
import ssl
import string
from pathlib import Path
from typing import Any, Literal, Self

import httpx
from pydantic import Field, field_validator, model_validator

from carehub.builtins.http_channel import (
    HttpChannel,
    cleartext_on_this_machine,
    finish_reading,
    http_url,
    read_some,
)
from carehub.care.model import Transition
from carehub.client import MLLPClient, NoAnswer, NoApplicationAck
from carehub.components import (
    Channel,
    ComponentContext,
    ComponentOptions,
    DeliveryError,
    Outgoing,
    SendNotStarted,
    Work,
    on_this_machine,
    worker_stopping,
)
from carehub.errors import ConfigError
from carehub.hl7.ack import read_ack
from carehub.hl7.charsets import UTF8_BOM, codec_for, decode_message, is_wide, same_charset
from carehub.hl7.view import NotHL7Error
from carehub.hookspecs import hookimpl
from carehub.intake.tls import client_context

V2_CONTENT_TYPE = "x-application/hl7-v2+er7"
JSON_CONTENT_TYPE = "application/json"


# -- shared helpers ---------------------------------------------------------------------------
def cr_segments(text: str) -> str:
    """The text with every segment ended by CR, as MLLP and HL7 files require.

    Translators and hand-written test data sometimes join segments with LF or CRLF; receivers
    split on CR only, so a stray LF would glue segments together. Field content is untouched
    (HL7 escapes line breaks inside fields), so this is not a re-serialisation."""
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return text if text.endswith("\r") else text + "\r"


def v2_bytes(work: Work, undeclared_codec: str | None = None) -> bytes:
    """The v2 message as the bytes to send.

    A message no step edited is sent as the sender sent it, byte for byte, when its segments
    already end with CR: a receiver then reads exactly what the hospital wrote, in the
    character set it wrote it in. Otherwise the text is encoded in the character set its
    MSH-18 declares, so the receiver, which decodes by MSH-18, reads it truthfully; when
    MSH-18 declares none (or one carehub does not know), in ``undeclared_codec`` if given (a
    receiver that reads undeclared messages in a set of its own), else in the one the message
    arrived in, but UTF-8 for one that came as UTF-16 or UTF-32 (over HTTP or the file drop):
    undeclared, a receiver cannot tell those apart from 8-bit text, and MLLP cannot frame
    them. A UTF-8 byte order mark is never sent: receivers read MSH at the first byte.
    Characters the codec cannot hold raise ValueError at routing time rather than being
    silently replaced in a clinical message."""
    declared = ""
    with contextlib.suppress(NotHL7Error):
        view = work.view
        declared = view.raw("MSH-18").split(view.separators.repetition, 1)[0].strip()
    arrived_in = work.message.charset or "utf-8"
    undeclared = undeclared_codec or ("utf-8" if is_wide(arrived_in) else arrived_in)
    codec = codec_for(declared, undeclared) or undeclared
    if _as_received(work) and same_charset(codec, arrived_in):
        return work.message.raw.removeprefix(UTF8_BOM)
    text = cr_segments(work.v2)
    try:
        return text.encode(codec)
    except UnicodeEncodeError as err:
        raise ValueError(
            f"message {work.message.id}: character {text[err.start]!r} cannot be encoded as "
            f"{codec} (MSH-18 {declared or 'empty'})"
        ) from err


def _as_received(work: Work) -> bool:
    """Whether the v2 text is the message as received (no step edited it) and its segments
    end with CR, so the received bytes can be sent as they are."""
    text = work.v2
    return "\n" not in text and text.endswith("\r") and text == work.message.text


def msh10(work: Work) -> str:
    """MSH-10 of the v2 text as it will be sent (after any transform), else the stored one."""
    with contextlib.suppress(NotHL7Error):
        return work.view.get("MSH-10").strip()
    return work.message.control_id or ""


def event_json(event: object | None) -> Any:
    """A JSON-ready form of a care event: pydantic models via ``model_dump(mode="json")``,
    dataclasses via ``asdict``; None stays None (the route had no translator that made one)."""
    if event is None:
        return None
    dump = getattr(event, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if dataclasses.is_dataclass(event) and not isinstance(event, type):
        return json.loads(json.dumps(dataclasses.asdict(event), default=_json_default))
    return json.loads(json.dumps(event, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def compact_json(value: Any) -> bytes:
    """Compact JSON: the json module's C encoder only runs without ``indent``, and an indented
    care event cost three times as long to write (171 against 60 us here)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return text.encode("utf-8")


# -- file -------------------------------------------------------------------------------------
_FILENAME_FIELDS = frozenset({"idempotency_key", "message_id", "route", "control_id", "ext"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _safe(value: object) -> str:
    """A template value made safe for a file name: MSH-10 comes from the sender and could hold
    '/' or '..', which must never steer a write outside the directory."""
    return _UNSAFE.sub("_", str(value))


def render_filename(
    template: str, key: str, message_id: int, route: str, control_id: str, ext: str
) -> str:
    """The file name for one delivery; every text value passes through ``_safe``."""
    try:
        return template.format(
            idempotency_key=_safe(key),
            message_id=message_id,
            route=_safe(route),
            control_id=_safe(control_id),
            ext=ext,
        )
    except (ValueError, IndexError, KeyError) as err:
        raise ValueError(f"bad filename template {template!r}: {err}") from err


class FileChannel(Channel):
    """Writes each delivery to its own file in a folder, for systems that pick up files.

    The file name is fixed at routing time from ``filename`` (fields: ``idempotency_key``,
    ``message_id``, ``route``, ``control_id``, ``ext``; values are reduced to letters, digits,
    ``.``, ``_`` and ``-``), so a retry after a crash overwrites the same file instead of adding
    a second copy. Each write goes to a hidden temp file in the same folder
    (``.<name>.<tag>-<n>.tmp``, unique to this process), then is renamed over the target: a
    reader sees the whole file or none of it. A crash mid-write can leave such a temp file
    behind; pickers should ignore dot files.

    ``fsync`` (default: follow the store) flushes the file and its folder to disk before the
    delivery counts as done. With ``store.durability: power`` it does, so a delivery the store
    records survives a power cut; with ``process`` it does not, since the store's own record of
    the delivery would not survive one either (a redelivery after a power cut rewrites the same
    file name), and each fsync waits for a filesystem journal commit.

    ``writer`` says where the writes run. ``auto`` (the default) writes on the event loop when
    fsync is off and the folder is on a local disk (ext4, xfs, btrfs, tmpfs, ...): such a write
    only copies into the page cache, and handing it to a helper thread cost more than the
    write (each of its four system calls hands Python's lock back and forth with the loop:
    bench/bench_routing.py used 754-767 against 813-869 us of CPU a message). With fsync, or
    on a network or unknown filesystem, where one write can stall, writes go to a helper
    thread, so a stalled share never holds up intake or other destinations. ``loop`` and
    ``thread`` force one or the other.

    ``body: v2`` writes the v2 message, ext ``.hl7``: the bytes received when no step edited
    it, else the text with CR segment ends in the character set its MSH-18 declares (when it
    declares none, the one it arrived in). ``body: event`` writes the care event as
    JSON (ext ``.json``); without an event it writes ``{"message_id", "route", "control_id",
    "v2"}`` so the file is still useful.
    """

    name = "file"
    description = "write each message to its own file in a folder (atomic, one file per delivery)"
    # Writes are batched; a per-destination limit of 32 held the folder to 32 files per batch
    # round trip (348 files/s against 774 webhook POSTs/s in bench/bench_routing.py --quick).
    limit_per_destination = False

    class Options(ComponentOptions):
        directory: Path = Field(
            description="folder to write into (created if missing), relative to the config folder"
        )
        body: Literal["v2", "event"] = Field(
            "v2", description="v2: the message as routed (.hl7); event: the care event as JSON"
        )
        filename: str = Field(
            "{idempotency_key}{ext}",
            description="file name template: {idempotency_key}, {message_id}, {route}, "
            "{control_id}, {ext}",
        )
        fsync: bool | None = Field(
            None,
            description="flush each file to disk before it counts as delivered; "
            "unset: when store.durability is power",
        )
        writer: Literal["auto", "loop", "thread"] = Field(
            "auto",
            description="where writes run: auto (the event loop for local disks without fsync, "
            "else a helper thread), loop or thread",
        )

        @field_validator("filename")
        @classmethod
        def _check_template(cls, value: str) -> str:
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
            except ValueError as err:
                raise ValueError(f"bad filename template {value!r}: {err}") from err
            unknown = names - _FILENAME_FIELDS
            if unknown:
                raise ValueError(
                    f"unknown field(s) {sorted(unknown)} in filename template; "
                    f"use {sorted(_FILENAME_FIELDS)}"
                )
            if "/" in value or "\\" in value:
                raise ValueError("filename must be a plain file name (no folders)")
            sample = render_filename(value, "key", 1, "route", "MSG1", ".hl7")
            if sample in ("", ".", ".."):
                raise ValueError(f"filename template {value!r} makes an empty name")
            return value

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self.directory = context.path(self.options.directory)
        #: (file name, payload, done) waiting for the next batch write
        self._queued: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._write_on_loop = False  # decided in start(), once the folder exists

    async def start(self) -> None:
        if self.context.check_only:
            _check_writable(self.directory)
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"file channel: cannot create {self.directory}: {err}") from err
        _check_writable(self.directory)
        writer = self.options.writer
        self._write_on_loop = writer == "loop" or (
            writer == "auto" and not self._fsync() and is_local_filesystem(self.directory)
        )

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        if self.options.body == "v2":
            payload, content_type, ext = v2_bytes(work), V2_CONTENT_TYPE, ".hl7"
        else:
            body = work.event_json_bytes()
            if body is None:
                body = compact_json(
                    {
                        "message_id": work.message.id,
                        "route": work.route,
                        "control_id": msh10(work),
                        "v2": cr_segments(work.v2),
                    }
                )
            payload, content_type, ext = body + b"\n", JSON_CONTENT_TYPE, ".json"
        filename = render_filename(
            self.options.filename,
            idempotency_key,
            work.message.id,
            work.route,
            msh10(work),
            ext,
        )
        return Outgoing(payload, content_type, idempotency_key, {"filename": filename})

    async def send(self, outgoing: Outgoing) -> str:
        """Queue the write and wait for it. Every write queued in one loop iteration goes to a
        helper thread as one batch: a thread hand-off per file cost more than the write (and
        with fsync on, the folder is synced once for the batch)."""
        filename = outgoing.metadata["filename"]
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._write_queued)
        self._queued.append((filename, outgoing.payload, written))
        try:
            await written
        except OSError as err:  # disk full, permissions, folder removed: may clear up
            raise DeliveryError(
                f"cannot write {self.directory / filename}: {err}", said=None
            ) from err
        return f"wrote {filename}"

    def _write_queued(self) -> None:
        batch, self._queued = self._queued, []
        files = [(filename, payload) for filename, payload, _ in batch]

        def settle(errors: list[OSError | None] | list[BaseException | None]) -> None:
            for (_, _, written), error in zip(batch, errors, strict=True):
                if written.done():  # its delivery was cancelled meanwhile
                    continue
                if error is None:
                    written.set_result(None)
                else:
                    written.set_exception(error)

        if self._write_on_loop:
            settle(_write_files(self.directory, files, self._fsync()))
            return

        def settle_thread(done: asyncio.Future[list[OSError | None]]) -> None:
            if done.cancelled():
                settle([OSError("the write was cancelled")] * len(batch))
            elif done.exception() is not None:
                settle([done.exception()] * len(batch))
            else:
                settle(done.result())

        writing = asyncio.ensure_future(
            asyncio.to_thread(_write_files, self.directory, files, self._fsync())
        )
        writing.add_done_callback(settle_thread)

    def _fsync(self) -> bool:
        if self.options.fsync is not None:
            return self.options.fsync
        store = self.context.store
        return store is not None and store.durability == "power"


#: Filesystems on a local disk or in memory: a write without fsync lands in the page cache.
LOCAL_FILESYSTEMS = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "tmpfs", "overlay", "jfs", "reiserfs"}
)


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path`` (its mount in /proc/mounts), None unknown."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        target = str(path.resolve())
    except OSError:
        return None
    best, fstype = "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")  # /proc/mounts writes a space as \040
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, fstype = mount, parts[2]
    return fstype


def is_local_filesystem(path: Path) -> bool:
    """Whether ``path`` is on a local filesystem. Anything else (NFS, SMB, FUSE, or no
    /proc/mounts to read) counts as not local."""
    return filesystem_type(path) in LOCAL_FILESYSTEMS


def _write_files(
    directory: Path, files: list[tuple[str, bytes]], fsync: bool
) -> list[OSError | None]:
    """Write each file atomically; one error per file (None when written). With ``fsync``,
    each file is synced before its rename, and the folder once after all the renames."""
    errors: list[OSError | None] = []
    for filename, payload in files:
        try:
            _write_atomically(directory, filename, payload, fsync)
            errors.append(None)
        except OSError as err:
            errors.append(err)
    if fsync and any(error is None for error in errors):
        _fsync_directory(directory)
    return errors


#: Temp names are unique per process run without a call for random bytes per file (a system
#: call on the writer thread): a tag drawn once, then a counter.
_TEMP_TAG = secrets.token_hex(4)
_temp_numbers = itertools.count()


def _write_atomically(directory: Path, filename: str, payload: bytes, fsync: bool) -> None:
    target = directory / filename
    temp = directory / f".{filename}.{_TEMP_TAG}-{next(_temp_numbers)}.tmp"
    # os.open with 0o666 honours the umask (mkstemp would force 0600 and hide the file from a
    # picker running as another user in the same group).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _check_writable(directory: Path) -> None:
    """Refuse at start, naming the folder, a folder this process cannot write files into
    (or, before it exists, whose nearest existing parent it cannot create it in): every
    delivery would otherwise fail at send time while the hub reports itself ready."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"file channel: {existing} is not a folder, so {directory} cannot be one")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "write files in" if existing == directory else f"create {directory} in"
        raise ConfigError(
            f"file channel: this process (uid {os.getuid()}) cannot {what} {existing}: "
            "give the user carehub runs as that right, or choose another directory"
        )


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); not possible, and not needed, on Windows."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- MLLP -------------------------------------------------------------------------------------
class MLLPChannel(Channel):
    """Forwards the v2 message over MLLP (optionally TLS) and waits for its ACK.

    What is sent is the bytes received when no step edited the message, else ``work.v2`` as
    routed (never re-serialised) with CR segment ends, encoded as its MSH-18 declares (when
    it declares nothing, in ``encoding`` if set, else in the character set it arrived in).
    MSH-10 is forwarded unchanged: it is what the receiver deduplicates on, so a retry after a
    lost ACK is not stored twice there; it is recorded as ``metadata["control_id"]``.

    One persistent connection per channel; sends are serialised with a lock because MLLP is
    strictly one answer per message. The connection is dropped after any failure (a late ACK
    must never be read as the answer to the next message) and reopened on the next send. If a
    reused connection turns out to have been closed by the peer while idle, the message is sent
    once more on a fresh connection within the same attempt.

    Answers: AA/CA -> receipt "AA"; AE/CE -> retried (``error_ack: dead_letter`` for a
    receiver whose AE means "fix the message"); AR/CR -> a dead letter at once (``reject_ack:
    retry`` for a receiver that answers AR while it is down, as HL7 v2 describes AR); no
    answer, timeout, refused connection, TLS failure, an answer that is not an ACK, or an ACK
    whose MSA-2 is not the MSH-10 sent -> retried.
    """

    name = "mllp"
    description = "forward the v2 message over MLLP (TLS optional) and check the ACK"

    class Options(ComponentOptions):
        host: str = Field(description="receiver's host name or address")
        port: int = Field(ge=1, le=65535, description="receiver's MLLP port")
        tls: bool = Field(False, description="connect with TLS")
        ca: Path | None = Field(
            None, description="CA file to trust instead of the system's (TLS only)"
        )
        cert: Path | None = Field(None, description="client certificate file (TLS only)")
        key: Path | None = Field(None, description="client certificate's key file (with cert)")
        timeout: float = Field(
            30.0, gt=0, description="seconds to connect, and to wait for the ACK"
        )
        encoding: str | None = Field(
            None,
            description="character set for messages whose MSH-18 declares none, for a receiver "
            "that reads those in another than they arrived in (unset: sent as they arrived)",
        )
        error_ack: Literal["retry", "dead_letter"] = Field(
            "retry",
            description="what an AE (or CE) answer makes of the delivery: retry (as the "
            "retry settings allow), or dead_letter at once, for a receiver whose AE means the "
            "message must be fixed before it can take it",
        )
        reject_ack: Literal["dead_letter", "retry"] = Field(
            "dead_letter",
            description="what an AR (or CR) answer makes of the delivery: dead_letter at once, "
            "or retry, for a receiver that answers AR while it is down or busy (HL7 v2's AR: "
            "rejected for a reason unrelated to the message)",
        )

        @field_validator("encoding")
        @classmethod
        def _known_codec(cls, value: str | None) -> str | None:
            if value is None:
                return value
            try:
                codecs.lookup(value)
            except LookupError as err:
                raise ValueError(f"unknown character set {value!r}") from err
            return value

        @model_validator(mode="after")
        def _tls_files(self) -> Self:
            if not self.tls and (self.ca or self.cert or self.key):
                raise ValueError("ca/cert/key are TLS settings: set tls: true to use them")
            if self.key and not self.cert:
                raise ValueError("key needs cert (the client certificate it belongs to)")
            return self

    options: Options

    def __init__(self, options: ComponentOptions, context: ComponentContext) -> None:
        super().__init__(options, context)
        self._ssl: ssl.SSLContext | None = None
        self._client: MLLPClient | None = None
        self._lock = asyncio.Lock()

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.options.port}"

    def unprotected_transport(self) -> str | None:
        if self.options.tls:
            return None
        if on_this_machine(self.options.host):
            return cleartext_on_this_machine(
                f"{self.address} over MLLP in clear (no tls: true)",
                self.options.port,
                "set tls: true",
            )
        return (
            f"sends patient data to {self.address} over MLLP in clear (no tls: true): anyone "
            "on the network between can read it; set tls: true"
        )

    async def start(self) -> None:
        """Load TLS files now so a bad path is a start-up error; connect on first send, so a
        destination that is down does not stop the hub from starting."""
        if self.options.tls:
            o = self.options

            def resolve(p: Path | None) -> Path | None:
                return self.context.path(p) if p else None

            try:
                self._ssl = client_context(resolve(o.ca), resolve(o.cert), resolve(o.key))
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(
                    f"mllp channel {self.address}: cannot load TLS files: {err}"
                ) from err

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        metadata = {"control_id": msh10(work), "destination": self.address}
        payload = v2_bytes(work, self.options.encoding)
        return Outgoing(payload, V2_CONTENT_TYPE, idempotency_key, metadata)

    async def send(self, outgoing: Outgoing) -> str:
        await self._take_turn()
        try:
            answer = await self._exchange(outgoing.payload)
            return await self._judge(answer, outgoing.metadata.get("control_id", ""))
        finally:
            self._lock.release()

    async def _take_turn(self) -> None:
        """Wait for the connection (one message at a time). If the worker begins to stop
        first, the send gives up unsent (SendNotStarted) rather than wait behind the sends
        before it until the stop's grace runs out."""
        stopping = worker_stopping.get()
        if stopping is None or not self._lock.locked():
            await self._lock.acquire()
        elif not await self._turn_unless(stopping):
            raise SendNotStarted(f"mllp channel {self.address}: the worker is stopping")
        if stopping is not None and stopping.is_set():
            self._lock.release()
            raise SendNotStarted(f"mllp channel {self.address}: the worker is stopping")

    async def _turn_unless(self, stopping: asyncio.Event) -> bool:
        """Wait for the lock or the stop, whichever comes first: True with the lock held."""
        turn = asyncio.ensure_future(self._lock.acquire())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait((turn, stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (the send was cut off) while waiting
            self._give_up(turn)
            raise
        finally:
            stop.cancel()
        if stopping.is_set():
            self._give_up(turn)
            return False
        return True

    def _give_up(self, turn: asyncio.Future[bool]) -> None:
        """Let go of a turn being waited for, or release it if it came meanwhile."""
        if not turn.done():
            turn.cancel()  # asyncio.Lock passes a turn it gave a cancelled waiter on
        elif not turn.cancelled():
            self._lock.release()

    async def _exchange(self, payload: bytes) -> bytes:
        reused = self._client is not None
        try:
            return await self._send_once(payload)
        except asyncio.CancelledError:
            # Cancelled mid-exchange (shutdown): the ACK may still arrive, and must not be
            # read later as the answer to another message, so the connection goes too.
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(client.close())
            raise
        except (NoAnswer, OSError, TimeoutError) as err:
            await self._drop()
            if reused and _peer_closed(err):
                try:  # the peer had closed the idle connection: one more go on a fresh one
                    return await self._send_once(payload)
                except (NoAnswer, OSError, TimeoutError) as again:
                    await self._drop()
                    raise self._transport_error(again) from again
            raise self._transport_error(err) from err

    async def _send_once(self, payload: bytes) -> bytes:
        if self._client is None:
            client = MLLPClient(
                self.options.host,
                self.options.port,
                ssl_context=self._ssl,
                timeout=self.options.timeout,
            )
            await client.connect()
            self._client = client
        try:
            return await self._client.send(payload)
        except NoApplicationAck as err:
            # Committed by the receiver (CA), its application ACK not (yet) sent: delivered,
            # as a CA alone is. The connection goes, so that a late application ACK is not
            # read as the next message's answer; resending would deliver it twice.
            await self._drop()
            return err.accept

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _transport_error(self, err: BaseException) -> DeliveryError:
        if isinstance(err, TimeoutError):
            text = f"no connection to {self.address} within {self.options.timeout:g} s"
        elif isinstance(err, NoAnswer):
            text = str(err)
        else:
            text = f"cannot reach {self.address}: {err.__class__.__name__}: {err}"
        return DeliveryError(text, retryable=True, said=None)

    async def _judge(self, answer: bytes, control_id: str) -> str:
        """Receipt for a good ACK, else the DeliveryError it calls for (runs under the lock)."""
        text = decode_message(answer, self.options.encoding or "utf-8").text
        try:
            code, echoed, reason = read_ack(text)
        except NotHL7Error:
            await self._drop()
            raise DeliveryError(
                f"{self.address} answered with something that is not an HL7 ACK",
                said=repr(_excerpt(text)),
            ) from None
        code = code.strip().upper()
        if echoed.strip() != control_id:
            # Out of step with the peer: whatever we read next could answer something else.
            # Control IDs are what the peer said (some senders fill them with an MRN).
            await self._drop()
            raise DeliveryError(
                f"{self.address} acknowledged another MSH-10 than the one sent",
                said=f"{echoed!r}, not {control_id!r}",
            )
        # The ERR text is the peer's own words, and engines quote what they refuse in it.
        said = reason or None
        if code in ("AA", "CA"):
            return "AA"
        if code in ("AR", "CR"):
            raise DeliveryError(
                f"{self.address} rejected the message ({code})",
                retryable=self.options.reject_ack == "retry",
                said=said,
            )
        if code in ("AE", "CE"):
            raise DeliveryError(
                f"{self.address} answered {code}",
                retryable=self.options.error_ack == "retry",
                said=said,
            )
        raise DeliveryError(
            f"{self.address} answered an unknown acknowledgment code",
            said=f"MSA-1 {code[:8]!r}" + (f"; {reason}" if reason else ""),
        )


def _peer_closed(err: BaseException) -> bool:
    """True when the peer hung up rather than being slow or unreachable."""
    if isinstance(err, NoAnswer):
        return not isinstance(err.__cause__, TimeoutError)
    return isinstance(err, ConnectionResetError | BrokenPipeError | ConnectionAbortedError)


def _excerpt(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- webhook ----------------------------------------------------------------------------------
#: The shortest ``hmac_secret`` a webhook takes: a shorter key can be guessed.
MIN_HMAC_SECRET = 16
#: Placeholders sample files use for a secret: anyone who read the sample knows them.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "change_me", "secret"})


class WebhookChannel(HttpChannel):
    """POSTs each delivery as JSON to an HTTP(S) endpoint.

    Body (``Content-Type: application/json``, UTF-8, fixed at routing time)::

        {
          "message_id": 42,               # carehub's id for the received message
          "route": "adt-to-care-team",
          "idempotency_key": "...",        # same as the Idempotency-Key header
          "message_type": "ADT",           # MSH-9.1 as received
          "trigger_event": "A01",          # MSH-9.2, else EVN-1, as received
          "control_id": "MSG00001",        # MSH-10 of the message as routed
          "event": {...} | null,           # the care event, null when the route made none
          "transition": {...},             # only after an encounter-state step: what the
                                           # message did to its visit ("kind", "state", and
                                           # for "updated" the facts "changed")
          "v2": "MSH|^~\\\\&|..."          # only with body: v2 (CR segment ends)
        }

    Headers: ``Idempotency-Key`` and ``X-Carehub-Delivery`` (both the delivery's key; the same
    on every retry, so the receiver can drop repeats), ``Authorization: <auth_header>`` when
    set, ``X-Carehub-Signature: sha256=<hex>`` (HMAC-SHA256 of the exact body bytes with
    ``hmac_secret``) when set, plus any ``headers``. Secrets are added per request, never
    stored with the rendered delivery.

    Outcome: 2xx -> receipt "HTTP <code>"; 408, 425, 429, 5xx, timeouts and network errors ->
    retryable; 3xx, other 4xx, 501 and 505 -> not retryable (the request will not get better by
    repeating it), with the status and up to 200 characters of the response body.
    """

    name = "webhook"
    description = "POST each message as JSON to an HTTP endpoint (idempotency key, HMAC)"

    class Options(ComponentOptions):
        url: str = Field(description="http(s) URL to POST to")
        body: Literal["event", "v2"] = Field(
            "event", description="event: the care event only; v2: the v2 text too"
        )
        headers: dict[str, str] = Field(
            default_factory=dict, description="extra request headers (carehub's own win)"
        )
        auth_header: str | None = Field(
            None, description="Authorization header value, e.g. Bearer ${TOKEN}; never stored"
        )
        hmac_secret: str | None = Field(
            None,
            description="key for the X-Carehub-Signature HMAC-SHA256 of the body (at least "
            f"{MIN_HMAC_SECRET} characters)",
        )
        timeout: float = Field(10.0, gt=0, description="seconds for the whole request")
        verify_tls: bool = Field(True, description="check the server's TLS certificate")

        _url = field_validator("url")(http_url)

        @field_validator("hmac_secret")
        @classmethod
        def _secret_nobody_else_knows(cls, value: str | None) -> str | None:
            """A signature proves the sender only with a key nobody else knows: a placeholder
            left in (an unset variable's default) or a key short enough to guess lets anyone
            sign what the receiver will trust. The value itself is never quoted."""
            if value is None:
                return None
            if value.strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError(
                    f"the key is the placeholder {value.strip()!r}, which anyone who read the "
                    "sample knows (a variable left unset?): set the receiver's own key of at "
                    f"least {MIN_HMAC_SECRET} characters"
                )
            if len(value) < MIN_HMAC_SECRET:
                raise ValueError(
                    f"the key is shorter than {MIN_HMAC_SECRET} characters, easy to guess (a "
                    "variable set to nothing?): set the receiver's own key of at least "
                    f"{MIN_HMAC_SECRET} characters, or remove hmac_secret to send unsigned"
                )
            return value

    options: Options

    def render(self, work: Work, idempotency_key: str) -> Outgoing:
        message = work.message
        head = compact_json(
            {
                "message_id": message.id,
                "route": work.route,
                "idempotency_key": idempotency_key,
                "message_type": message.message_type,
                "trigger_event": message.trigger_event,
                "control_id": msh10(work),
            }
        )
        # The event's JSON is spliced in as encoded once for every channel of the route; the
        # bytes are the same as encoding the whole document.
        parts = [head[:-1], b',"event":', work.event_json_bytes() or b"null"]
        transition = work.data.get("encounter")
        if isinstance(transition, Transition):
            # A receiver cannot tell from the event alone whether an A08 changed anything.
            parts += [b',"transition":', compact_json(transition.for_receiver())]
        if self.options.body == "v2":
            parts += [b',"v2":', compact_json(cr_segments(work.v2))]
        return Outgoing(b"".join([*parts, b"}"]), JSON_CONTENT_TYPE, idempotency_key, {})

    def headers_for(self, outgoing: Outgoing) -> dict[str, str]:
        """The request headers: configured ones first, carehub's own win on a clash."""
        headers = dict(self.options.headers)
        headers["Content-Type"] = outgoing.content_type
        headers["Idempotency-Key"] = outgoing.idempotency_key
        headers["X-Carehub-Delivery"] = outgoing.idempotency_key
        if self.options.auth_header:
            headers["Authorization"] = self.options.auth_header
        if self.options.hmac_secret:
            headers["X-Carehub-Signature"] = "sha256=" + sign(
                self.options.hmac_secret, outgoing.payload
            )
        return headers

    async def send(self, outgoing: Outgoing) -> str:
        url = self.options.url
        try:
            async with self.request(
                "POST", url, outgoing.payload, self.headers_for(outgoing)
            ) as response:
                status = response.status_code
                if 200 <= status < 300:
                    await finish_reading(response)
                    return f"HTTP {status}"
                excerpt = _excerpt(await read_some(response))
        except (httpx.TimeoutException, httpx.TransportError) as err:
            raise self.unreached("POST", url, err) from err
        raise self.refused("POST", url, response, said=excerpt or None)


def sign(secret: str, payload: bytes) -> str:
    """Hex HMAC-SHA256 of the body, as sent in ``X-Carehub-Signature: sha256=<hex>``.

    A receiver checks it with ``hmac.compare_digest(sign(secret, raw_body), given)``."""
    return hmac.new(secret.encode("utf-8"), payload, hashlib.sha256).hexdigest()


# -- registration -----------------------------------------------------------------------------
@hookimpl
def carehub_register_channels(register: Any) -> None:
    """The built-in forwarding channels, registered like any plugin's."""
    from carehub.care.fhir_notifications import FhirNotificationChannel
    from carehub.referrals.fhir import FhirReferralChannel

    register(FileChannel)
    register(MLLPChannel)
    register(WebhookChannel)
    register(FhirReferralChannel)
    register(FhirNotificationChannel)
