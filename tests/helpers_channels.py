"""Shared by the channel tests: a routed message as a channel receives it, a channel built from
options as a route step would build it, and one send run on its own event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from carehub.components import Channel, ComponentContext, DeliveryError, Outgoing, Work
from carehub.hl7.view import MessageView
from carehub.store.store import StoredMessage

T = TypeVar("T")


def stored(text: str, message_id: int = 7) -> StoredMessage:
    """A StoredMessage as the store would hand it back for ``text``."""
    view = MessageView(text)
    raw = text.encode()
    now = datetime.now(UTC)
    return StoredMessage(
        id=message_id,
        received_at=now,
        transport="mllp",
        listener="test",
        peer="127.0.0.1:1",
        raw=raw,
        size=len(raw),
        charset="utf-8",
        sending_application=view.get("MSH-3"),
        sending_facility=view.get("MSH-4"),
        receiving_application=view.get("MSH-5"),
        receiving_facility=view.get("MSH-6"),
        message_type=view.get("MSH-9.1") or None,
        trigger_event=view.get("MSH-9.2") or None,
        structure=view.get("MSH-9.3") or None,
        control_id=view.get("MSH-10") or None,
        version=view.get("MSH-12") or None,
        patient_id="P0001",
        patient_authority="HOSP",
        ack_code="AA",
        status="received",
        status_at=now,
        detail=None,
    )


def work_for(text: str, *, route: str = "to-dest", message_id: int = 7, event: Any = None) -> Work:
    """A Work as routing hands it to a channel, for the synthetic message ``text``."""
    return Work(message=stored(text, message_id), route=route, v2=text, event=event)


def context(tmp_path: Path) -> ComponentContext:
    return ComponentContext(config_dir=tmp_path / "config", data_dir=tmp_path / "data")


def build(cls: type[Channel], tmp_path: Path, **options: Any) -> Any:
    """Validate options exactly as a route step would, then build the channel."""
    return cls(cls.Options(**options), context(tmp_path))


def run_with(channel: Channel, body: Callable[[], Awaitable[T]]) -> T:
    """start(), run ``body``, close(), all on one fresh event loop."""

    async def main() -> T:
        await channel.start()
        try:
            return await body()
        finally:
            await channel.close()

    return asyncio.run(main())


async def outcome(channel: Channel, outgoing: Outgoing) -> str | DeliveryError:
    """The receipt, or the DeliveryError the attempt raised."""
    try:
        return await channel.send(outgoing)
    except DeliveryError as err:
        return err
