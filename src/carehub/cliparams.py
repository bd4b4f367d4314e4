"""Option and argument types the commands share, so that every command checks the same ranges.

A port past 65535, an id past what the store can hold or a limit of -1 is then a usage error
that names the option (exit 2), not a traceback from deep inside a socket or SQLite call.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import click

from carehub.timespans import parse_age

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


#: The longest age that still has a calendar date behind it for any command to compare with.
_LONGEST_AGE = timedelta(days=36_500)


class AgeType(click.ParamType):
    """A span of time back from now, written as an age: 30m, 2h, 7d."""

    name = "age"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        age = parse_age(str(value))
        if age is None:
            self.fail(f"{value!r}: use an age such as 90s, 30m, 2h or 7d", param, ctx)
        if not age or age > _LONGEST_AGE:
            self.fail(f"{value!r}: must be more than nothing and at most 36500d", param, ctx)
        return age


AGE = AgeType()


def parse_moment(value: str | None, option: str = "--since", zone: tzinfo = UTC) -> datetime | None:
    """A moment given as an ISO date/time or an age back from now, in UTC; a time without an
    offset is read in ``zone`` (UTC unless the command works in a site's zone). Errors name
    ``option``."""
    if not value:
        return None
    try:
        age = parse_age(value)
        if age is not None:
            return datetime.now(UTC) - age
        parsed = datetime.fromisoformat(value)
        # In UTC now, as the store compares: a time at the calendar's edge fails here, by name.
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=zone)).astimezone(UTC)
    except ValueError as err:
        raise click.BadParameter(
            f"{value!r}: use an ISO date/time (2026-11-25T08:00) or an age (30m, 2h, 7d)",
            param_hint=f"'{option}'",
        ) from err
    except OverflowError as err:
        raise click.BadParameter(
            f"{value!r} reaches past the calendar's range", param_hint=f"'{option}'"
        ) from err


def moment(_ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Option callback: ``--since``/``--until`` read by parse_moment, naming the option."""
    return parse_moment(value, param.opts[0])
