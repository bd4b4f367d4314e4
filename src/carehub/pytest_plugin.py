"""carehub's pytest plugin (the ``pytest11`` entry point ``carehub``): the ``carehub_routes``
fixture for route tests in a project's own suite.

    def test_discharge_goes_to_the_care_platform(carehub_routes):
        result = carehub_routes("tests/messages/discharge.hl7")
        assert result.matched[0].route == "admissions-discharges"
        assert result.deliveries[0].destination == "admissions-discharges/care-platform"

The config comes from ``--carehub-config``, the ``carehub_config`` ini option, or
config/carehub.yaml in the rootdir. pytest loads this module in every run of any environment
carehub is installed in, so it imports nothing of carehub until the fixture is used: the hub,
its store and web stack take most of a second to import.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from carehub.routing.router import RoutingResult


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("carehub")
    group.addoption("--carehub-config", default=None, help="carehub config for carehub_routes")
    parser.addini("carehub_config", "carehub config file for the carehub_routes fixture")


@pytest.fixture
def carehub_routes(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[str | bytes | Path], RoutingResult]:
    """A function that dry-runs a message (text, bytes, or a file path relative to the
    rootdir) through the project's carehub routes."""
    from carehub.testing import run_routes

    rootpath = Path(request.config.rootpath)
    option = request.config.getoption("--carehub-config") or request.config.getini("carehub_config")
    config_path = Path(option) if option else rootpath / "config" / "carehub.yaml"
    if not config_path.is_absolute():
        config_path = rootpath / config_path

    def run(message: str | bytes | Path) -> RoutingResult:
        if isinstance(message, str) and not message.lstrip().startswith(("MSH", "\ufeffMSH")):
            message = Path(message)
            if not message.is_absolute():
                message = rootpath / message
        return run_routes(message, config_path, tmp_path / "carehub-data")

    return run


__all__ = ["carehub_routes", "pytest_addoption"]
