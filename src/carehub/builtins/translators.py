"""Registers the built-in translators: v2-to-event, transform and validate."""

from __future__ import annotations

from collections.abc import Callable

from carehub.components import Translator
from carehub.hookspecs import hookimpl


@hookimpl
def carehub_register_translators(register: Callable[[type[Translator]], None]) -> None:
    from carehub.builtins.event_translator import V2ToEvent
    from carehub.builtins.transform import Transform
    from carehub.builtins.validate import Validate

    for translator in (V2ToEvent, Transform, Validate):
        register(translator)
