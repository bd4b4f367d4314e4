"""load_config and resolve_data_dir: errors that name file, line and key; ${VAR} expansion;
relative paths; the shipped sample config; data dir precedence."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from carehub.config import ENV_CONFIG, ENV_DATA_DIR, HubConfig, load_config, resolve_data_dir
from carehub.errors import ConfigError
from carehub.routing.config import load_route_files

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = PROJECT_ROOT / "config" / "carehub.yaml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CAREHUB_* settings leak in from the developer's shell."""
    for name in (ENV_DATA_DIR, ENV_CONFIG, "CAREHUB_STORE_URL", "CAREHUB_FACILITY"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str, name: str = "hub.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


# -- errors name file, line and key ----------------------------------------------------------
def test_out_of_range_port_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "hub:\n  application: X\nlisteners:\n  mllp:\n    - name: adt\n      port: 70000\n",
    )
    message = config_error(path)
    assert message.startswith(f"{path}:6: listeners.mllp[0].port:"), message
    assert "65535" in message


def test_unknown_key_names_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listeners:\n"
        "  mllp:\n"
        "    - name: adt\n"
        "      port: 2575\n"
        "    - name: second\n"
        "      prot: 2576\n",
    )
    message = config_error(path)
    assert message.startswith(f"{path}:6: listeners.mllp[1].prot:"), message
    assert "not permitted" in message or "extra" in message.lower()


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: INFO\nlisteneres: {}\n")
    assert config_error(path).startswith(f"{path}:2: listeneres:")


def test_wrong_type_names_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "store:\n  durability: process\nlisteners:\n  http:\n    enabled: true\n    port: eighty\n",
    )
    message = config_error(path)
    assert message.startswith(f"{path}:6: listeners.http.port:"), message
    assert "integer" in message


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "store:\n  durability: disk\nlog_level: LOUD\n",
    )
    lines = config_error(path).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:2: store.durability:")
    assert lines[1].startswith(f"{path}:3: log_level:")


def test_unknown_charset_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  http:\n    default_charset: klingon-8\n")
    message = config_error(path)
    assert message.startswith(f"{path}:3: listeners.http.default_charset:")
    assert "klingon-8" in message


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "hub:\n  application: CAREHUB\n   facility: X\n")
    message = config_error(path)
    assert re.match(rf"{re.escape(str(path))}:3: not valid YAML", message), message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    assert config_error(path).startswith(f"{path}: ")


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    message = config_error(path)
    assert str(path) in message and "cannot read" in message


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.listeners.mllp[0].port == 2575
    assert config.store.durability == "process"


# -- ${VAR} expansion --------------------------------------------------------------------------
def test_env_expansion_with_and_without_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CH_TEST_FACILITY", "RIVERSIDE")
    monkeypatch.delenv("CH_TEST_UNSET", raising=False)
    path = write(
        tmp_path,
        "hub:\n"
        "  application: APP_${CH_TEST_FACILITY}\n"
        "  facility: ${CH_TEST_FACILITY}\n"
        "store:\n"
        "  url: ${CH_TEST_UNSET:-}\n"
        "listeners:\n"
        "  mllp:\n"
        "    - port: ${CH_TEST_UNSET:-2600}\n"
        "      name: ${CH_TEST_UNSET:-adt}\n",
    )
    config = load_config(path)
    assert config.hub.application == "APP_RIVERSIDE"
    assert config.hub.facility == "RIVERSIDE"
    assert config.store.url is None  # empty default means the SQLite default
    assert config.listeners.mllp[0].port == 2600
    assert config.listeners.mllp[0].name == "adt"


def test_an_unset_variable_is_named_with_its_file_line_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the hub config and in a routes file alike: file:line: key path, then the variable."""
    monkeypatch.delenv("CH_TEST_UNSET", raising=False)
    path = write(tmp_path, "hub:\n  application: X\n  facility: ${CH_TEST_UNSET}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(
        f"{path}:3: hub.facility: environment variable CH_TEST_UNSET is not set"
    )

    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: out\n"
        "    steps:\n"
        "      - forward: {channel: webhook, name: hook, url: '${CH_TEST_UNSET}'}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as raised:
        load_route_files([routes])
    assert str(raised.value).startswith(
        f"{routes}:4: routes[0].steps[0].forward.url: environment variable CH_TEST_UNSET"
    )


def test_a_key_given_twice_is_named_with_its_second_line(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys without a word; carehub refuses the file."""
    path = write(tmp_path, "hub:\n  application: A\nlisteners: {}\nhub:\n  application: B\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: 'hub' is given twice"):
        load_config(path)
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n  - name: a\n    when: {type: ADT}\n    when: {type: ORU}\n    steps: []\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(routes))}:4: 'when' is given twice"):
        load_route_files([routes])


def test_two_listeners_of_one_name_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "listeners:\n  mllp:\n    - {name: adt, port: 0}\n"
        "  files:\n    - {name: adt, directory: inbox}\n",
    )
    with pytest.raises(ConfigError, match="two listeners are named 'adt'"):
        load_config(path)


def test_set_variable_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CH_TEST_PORT", "2700")
    path = write(tmp_path, "listeners:\n  mllp:\n    - port: ${CH_TEST_PORT:-2600}\n")
    assert load_config(path).listeners.mllp[0].port == 2700


def test_missing_variable_names_file_key_and_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CH_TEST_MISSING", raising=False)
    path = write(
        tmp_path,
        "listeners:\n  mllp:\n    - name: adt\n    - name: ${CH_TEST_MISSING}\n",
    )
    message = config_error(path)
    assert message.startswith(f"{path}:4: listeners.mllp[1].name: "), message
    assert "CH_TEST_MISSING" in message
    assert "${CH_TEST_MISSING:-default}" in message


def test_expanded_value_is_still_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CH_TEST_PORT", "99999")
    path = write(tmp_path, "listeners:\n  http:\n    port: ${CH_TEST_PORT}\n")
    assert config_error(path).startswith(f"{path}:3: listeners.http.port:")


# -- relative paths -----------------------------------------------------------------------------
def test_relative_paths_are_taken_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc" / "carehub"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # must not matter
    path = write(
        folder,
        "data_dir: ../data\n"
        "listeners:\n"
        "  mllp:\n"
        "    - name: secure\n"
        "      tls:\n"
        "        cert: certs/hub.pem\n"
        "        key: /abs/hub-key.pem\n"
        "        client_ca: certs/ca.pem\n"
        "  files:\n"
        "    - directory: inbox\n"
        "      processed_dir: done\n",
    )
    config = load_config(path)
    assert config.source == path.resolve()
    assert config.data_dir is not None
    assert config.data_dir.resolve() == (tmp_path / "etc" / "data").resolve()
    tls = config.listeners.mllp[0].tls
    assert tls is not None
    assert tls.cert == folder.resolve() / "certs" / "hub.pem"
    assert tls.key == Path("/abs/hub-key.pem")
    assert tls.client_ca == folder.resolve() / "certs" / "ca.pem"
    drop = config.listeners.files[0]
    assert drop.directory == folder.resolve() / "inbox"
    assert drop.processed_dir == folder.resolve() / "done"
    assert drop.error_dir is None


# -- the shipped config ---------------------------------------------------------------------------
def test_shipped_sample_config_loads() -> None:
    config = load_config(SAMPLE_CONFIG)
    assert config.hub.application == "CAREHUB"
    assert config.hub.facility == "CAREHUB"
    assert config.store.url is None
    assert config.store.durability == "process"
    assert [(m.name, m.port) for m in config.listeners.mllp] == [("adt", 2575)]
    assert config.listeners.http.enabled and config.listeners.http.port == 8080
    assert config.listeners.files == []


def test_shipped_sample_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREHUB_FACILITY", "LAKEVIEW")
    monkeypatch.setenv("CAREHUB_STORE_URL", "postgresql+psycopg://hub@db/carehub")
    config = load_config(SAMPLE_CONFIG)
    assert config.hub.facility == "LAKEVIEW"
    assert config.store.url == "postgresql+psycopg://hub@db/carehub"


def test_no_config_file_gives_defaults() -> None:
    assert load_config(None) == HubConfig()


# -- data dir precedence: --data-dir > $CAREHUB_DATA_DIR > config > ./data ------------------------
def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "data_dir: from-config\n")
    config = load_config(path)
    env_dir = tmp_path / "from-env"
    flag_dir = tmp_path / "from-flag"

    assert resolve_data_dir(HubConfig(), None) == tmp_path.resolve() / "data"
    assert resolve_data_dir(config, None) == tmp_path.resolve() / "from-config"
    monkeypatch.setenv(ENV_DATA_DIR, str(env_dir))
    assert resolve_data_dir(config, None) == env_dir.resolve()
    assert resolve_data_dir(HubConfig(), None) == env_dir.resolve()
    assert resolve_data_dir(config, flag_dir) == flag_dir.resolve()
    monkeypatch.setenv(ENV_DATA_DIR, "")  # empty is the same as unset
    assert resolve_data_dir(config, None) == tmp_path.resolve() / "from-config"


def test_relative_data_dir_flag_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(HubConfig(), Path("here")) == tmp_path.resolve() / "here"


@pytest.mark.parametrize(
    ("queue", "partitions"),
    [
        ("{}", 1),  # in-process: one worker consumes every queue
        ("{url: 'amqp://guest:guest@127.0.0.1:5672//'}", 8),
        ("{partitions: 4}", 4),
        ("{url: 'amqp://guest:guest@127.0.0.1:5672//', partitions: 16}", 16),
    ],
)
def test_queue_partitions_default_by_transport(tmp_path: Path, queue: str, partitions: int) -> None:
    assert load_config(write(tmp_path, f"queue: {queue}\n")).queue.partition_count() == partitions


def test_route_files_know_the_data_dir_and_defaults_may_name_a_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`${CAREHUB_OUTBOX:-${CAREHUB_DATA_DIR}/outbox}`: a file forward writes beside the store
    of whichever data dir the hub runs with, unless the environment says otherwise."""
    monkeypatch.delenv("CAREHUB_OUTBOX", raising=False)
    monkeypatch.delenv(ENV_DATA_DIR, raising=False)
    routes = write(
        tmp_path,
        "routes:\n  - name: r\n    steps:\n      - forward: {channel: file, name: out, "
        "directory: '${CAREHUB_OUTBOX:-${CAREHUB_DATA_DIR}/outbox}/events'}\n",
        "routes.yaml",
    )

    def directory(data_dir: Path | None) -> str:
        (loaded,) = load_route_files([routes], data_dir)
        return str(loaded.config.steps[0].forward["directory"])  # type: ignore[index]

    assert directory(tmp_path / "hub-data") == f"{tmp_path / 'hub-data'}/outbox/events"
    monkeypatch.setenv("CAREHUB_OUTBOX", "/srv/outbox")
    assert directory(tmp_path / "hub-data") == "/srv/outbox/events"
    monkeypatch.delenv("CAREHUB_OUTBOX")
    with pytest.raises(ConfigError, match="CAREHUB_DATA_DIR is not set"):
        directory(None)  # read with no hub behind it: says what is missing


def test_referenced_environment_names_every_variable_with_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from carehub.config import referenced_environment

    monkeypatch.setenv("REF_A", "one")
    monkeypatch.delenv("REF_B", raising=False)
    monkeypatch.setenv("REF_C", "three")
    text = "url: ${REF_A}\ntoken: ${REF_B:-${REF_C}}\nagain: ${REF_A}\nplain: $REF_D"
    assert referenced_environment(text) == [("REF_A", "one"), ("REF_B", None), ("REF_C", "three")]
    # The data dir is carehub's own to supply, however each process was given it.
    monkeypatch.setenv("CAREHUB_DATA_DIR", "/srv/carehub")
    assert referenced_environment("path: ${CAREHUB_DATA_DIR}/outbox") == []


def test_an_unset_secret_is_not_to_be_given_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from carehub.config import expand_env

    monkeypatch.delenv("SITE_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("SITE_URL", raising=False)
    with pytest.raises(ConfigError, match="a secret has no default"):
        expand_env("${SITE_WEBHOOK_SECRET}", "routes.yaml:3")
    with pytest.raises(ConfigError, match=r"write \$\{SITE_URL:-default\}"):
        expand_env("${SITE_URL}", "routes.yaml:4")


# -- references carehub does not expand ---------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        (
            "$CH_TEST_HOST",
            "$CH_TEST_HOST is not expanded: carehub expands only ${NAME}, so write ${CH_TEST_HOST}",
        ),
        (
            "${CH_TEST_HOST:-127.0.0.1",
            "'${CH_TEST_HOST:-127.0.0.1' is not a reference carehub expands (a ${ left open",
        ),
        ("${CH_TEST_HOST-127.0.0.1}", "is not a reference carehub expands"),
        ("${CH_TEST_HOST:-$CH_TEST_OTHER}", "$CH_TEST_OTHER is not expanded"),
    ],
)
def test_a_reference_carehub_does_not_expand_is_refused_naming_file_line_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, wanted: str
) -> None:
    """A shell habit ($VAR) or a ${ left open would stay as text: a host named so, a folder
    named $CAREHUB_DATA_DIR under which patient data is written. Set or not, it is refused."""
    monkeypatch.setenv("CH_TEST_HOST", "10.1.2.3")
    path = write(tmp_path, f"hub:\n  application: X\n  facility: '{value}'\n")
    message = config_error(path)
    assert message.startswith(f"{path}:3: hub.facility: "), message
    assert wanted in message, message


def test_a_shell_style_variable_in_a_route_file_is_refused(tmp_path: Path) -> None:
    routes = write(
        tmp_path,
        "routes:\n  - name: adt\n    steps:\n      - forward:\n          channel: file\n"
        "          directory: $CAREHUB_DATA_DIR/out/adt\n",
        "routes.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([routes], tmp_path / "data")
    assert str(caught.value) == (
        f"{routes}:6: routes[0].steps[0].forward.directory: $CAREHUB_DATA_DIR is not expanded: "
        "carehub expands only ${NAME}, so write ${CAREHUB_DATA_DIR} (a $ before a name meant as "
        "text, as in a password, is given through a variable)"
    )


def test_a_dollar_that_names_no_variable_stays_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regex's $, a FHIR operation in a URL, a $ a variable's value holds and a $ before a
    name in a default's text are not references: they load as written."""
    monkeypatch.setenv("CH_TEST_PASSWORD", "pa$SWORD${X")
    monkeypatch.delenv("CH_TEST_UNSET", raising=False)
    routes = write(
        tmp_path,
        "routes:\n"
        "  - name: adt\n"
        "    when: {fields: {PID-5.1: {regex: '^A$|^\\$USD|[$]EUR'}, MSH-4: {not: [$]}}}\n"
        "    steps:\n"
        "      - forward:\n"
        "          channel: webhook\n"
        "          url: 'https://fhir.example.org/r4/$process-message?t=a$'\n"
        "          hmac_secret: '${CH_TEST_PASSWORD}'\n"
        "          name: '${CH_TEST_UNSET:-cost$}'\n",
        "routes.yaml",
    )
    (loaded,) = load_route_files([routes])
    forward = loaded.config.steps[0].forward
    assert forward == {
        "channel": "webhook",
        "url": "https://fhir.example.org/r4/$process-message?t=a$",
        "hmac_secret": "pa$SWORD${X",
        "name": "cost$",
    }
    fields = loaded.config.when.fields
    assert fields["PID-5.1"].regex == "^A$|^\\$USD|[$]EUR"


def test_an_unset_host_of_a_forward_has_no_default_one_of_a_listener_may(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLLP or email host is where patient data goes, as a URL is: a default would send it
    to whatever listens there. A listener's host is where the hub listens."""
    monkeypatch.delenv("CH_TEST_EHR_HOST", raising=False)
    routes = write(
        tmp_path,
        "routes:\n  - name: adt\n    steps:\n"
        "      - forward: {channel: mllp, host: '${CH_TEST_EHR_HOST}', port: 2575}\n",
        "routes.yaml",
    )
    with pytest.raises(ConfigError) as caught:
        load_route_files([routes])
    assert str(caught.value) == (
        f"{routes}:4: routes[0].steps[0].forward.host: environment variable CH_TEST_EHR_HOST is "
        "not set (set it to the address of the system it names: an address has no default, so "
        "nothing is sent where nobody said)"
    )
    notify = write(
        tmp_path,
        "routes:\n  - name: adt\n    steps:\n      - notify:\n          channels:\n"
        "            email: {channel: email, host: '${CH_TEST_EHR_HOST}'}\n",
        "notify.yaml",
    )
    with pytest.raises(ConfigError, match="an address has no default"):
        load_route_files([notify])
    path = write(tmp_path, "listeners:\n  mllp:\n    - host: ${CH_TEST_EHR_HOST}\n")
    assert "write ${CH_TEST_EHR_HOST:-default} to give a default" in config_error(path)


# -- misspelt keys ------------------------------------------------------------------------------
def test_a_misspelt_key_is_told_at_its_own_line_with_the_key_it_may_be(tmp_path: Path) -> None:
    """The key's line, not its block's first line, and the known key nearest it."""
    path = write(
        tmp_path,
        "hub: {application: X}\n"
        "store: {durabilty: process}\n"
        "listener:\n"
        "  mllp:\n"
        "    - {name: adt, port: 2575}\n",
    )
    assert config_error(path).splitlines() == [
        f"{path}:2: store.durabilty: Extra inputs are not permitted; did you mean `durability`?",
        f"{path}:3: listener: Extra inputs are not permitted; did you mean `listeners`?",
    ]
    # Nothing near enough: no guess.
    assert config_error(write(tmp_path, "zzz: 1\n")).endswith("zzz: Extra inputs are not permitted")
