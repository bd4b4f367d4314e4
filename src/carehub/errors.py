"""Errors a person can act on: each names the file, line or key that needs fixing."""

from __future__ import annotations


class CarehubError(Exception):
    """Base for errors reported to the user without a traceback."""


class ConfigError(CarehubError):
    """A configuration file or value is wrong; the message names the file, line and key."""
