"""carehub's own implementation of carehub_run_step: run the step. Wrappers go around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carehub.components import Work
from carehub.hookspecs import hookimpl


@hookimpl
def carehub_run_step(work: Work, step: str, run: Callable[[], Any]) -> Any:
    return run()
