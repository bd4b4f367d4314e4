"""carehub.testing.local_config takes its settings as a config file gives them: paths as
``str`` (``plugins_dir="plugins"``, ``source="carehub.yaml"``) as the other helpers do, each
setting checked, so a plugin's test suite can write them the way it writes the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from carehub.plugins import ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR
from carehub.testing import HubThread, local_config, make_adt, mllp_exchange, run_routes
from tests.test_plugins import TRANSLATOR_PLUGIN, hub_config, plugins_dir

ROUTES = """
    routes:
      - name: r
        steps:
          - translate: lower-control-id
          - forward: {channel: file, directory: out}
"""


@pytest.fixture(autouse=True)
def clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_ALLOW, ENV_BLOCK, ENV_PLUGINS_DIR):
        monkeypatch.delenv(name, raising=False)


def test_local_config_takes_str_paths_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = hub_config(tmp_path / "hub", ROUTES).parent
    plugins_dir(folder / "plugins", lowercase=TRANSLATOR_PLUGIN)
    monkeypatch.chdir(folder)

    settings = local_config(
        worker=True, routes=["routes/*.yaml"], source="carehub.yaml", plugins_dir="plugins"
    )
    assert settings.source == folder / "carehub.yaml"
    assert settings.plugins_dir == folder / "plugins"

    result = run_routes(make_adt("STR1"), settings, tmp_path / "dry")
    assert result.errors == [] and result.steps[0].output == "str1"
    with HubThread(settings, tmp_path / "data") as hub:
        mllp_exchange(hub.mllp_address, [make_adt("STR2").encode()])
        (delivery,) = hub.wait_for_deliveries(1, timeout=15)
    assert delivery.status == "delivered"
    assert [p.suffix for p in (folder / "out").iterdir()] == [".hl7"]


def test_a_misspelt_setting_is_an_error_naming_it() -> None:
    with pytest.raises(ValidationError, match="plugins_dri"):
        local_config(plugins_dri="plugins")
    with pytest.raises(ValidationError, match="log_level"):
        local_config(log_level="LOUD")
