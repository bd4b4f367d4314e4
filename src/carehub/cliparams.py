"""Option and argument types the commands share, so that every command checks the same ranges.

A port past 65535, an id past what the store can hold or a limit of -1 is then a usage error
that names the option (exit 2), not a traceback from deep inside a socket or SQLite call.
"""

from __future__ import annotations

from typing import Any

import click

#: A TCP port; 0 lets the system pick a free one.
PORT = click.IntRange(0, 65_535)
#: A row id in the store: SQLite and PostgreSQL both hold 64-bit integers.
ROW_ID = click.IntRange(1, 2**63 - 1)
#: How many rows a listing shows.
LIMIT = click.IntRange(1, 1_000_000)
#: Seconds to wait for an answer: more than nothing, at most a day.
TIMEOUT = click.FloatRange(min=0, min_open=True, max=86_400)
#: An age in days for retention: at most a century.
DAYS = click.IntRange(0, 36_500)


class MessageStatusChoice(click.ParamType):
    """One of the store's message statuses, checked when used: importing the store (and
    SQLAlchemy) up front would slow every command's start."""

    name = "status"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from carehub.store.schema import MessageStatus

        choices = [status.value for status in MessageStatus]
        if value in choices:
            return str(value)
        self.fail(f"{value!r} is not one of {', '.join(choices)}", param, ctx)


MESSAGE_STATUS = MessageStatusChoice()
