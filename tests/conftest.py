"""Shared fixtures: a running hub on free local ports with a fresh SQLite store per test, and
the suite kept to carehub's own plugins plus the shipped example, whatever else is installed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from carehub import plugins
from carehub.testing import HubThread, local_config

#: The entry-point plugins this suite knows: the example in plugins/carehub-pager.
KNOWN_ENTRY_POINTS = frozenset({"pager"})

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CORPUS = PROJECT_ROOT.parent / "shared" / "corpus" / "fhir-converter-hl7v2"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubThread]:
    """A hub with one MLLP listener and the HTTP listener, both on 127.0.0.1."""
    with HubThread(local_config(), tmp_path / "data") as running:
        yield running


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.hl7")) if CORPUS.is_dir() else []


requires_corpus = pytest.mark.skipif(
    not CORPUS.is_dir(),
    reason=f"sample corpus not found at {CORPUS} (it sits beside the checkout in shared/corpus)",
)


@pytest.fixture(scope="session", autouse=True)
def only_known_plugins() -> Iterator[None]:
    """Keep the suite to the built-ins and the example pager, so a third-party plugin in the
    same environment (one that registers `webhook`, say) cannot change the results: entry
    points other than the known ones are left out of discovery in this process, and blocked
    through CAREHUB_BLOCK_PLUGINS in `carehub` processes that inherit the environment. A
    developer's allow list and plugins directory are cleared; tests of the lists and of
    discovery set their own (plugin-discovery tests still see every known entry point)."""
    real = plugins.installed_entry_points
    unknown = sorted({e.name for e in real()} - KNOWN_ENTRY_POINTS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            plugins,
            "installed_entry_points",
            lambda: [e for e in real() if e.name in KNOWN_ENTRY_POINTS],
        )
        for name in (plugins.ENV_ALLOW, plugins.ENV_PLUGINS_DIR, plugins.ENV_BLOCK):
            patch.delenv(name, raising=False)
        if unknown:
            patch.setenv(plugins.ENV_BLOCK, ",".join(unknown))
        yield


#: The sample routes' destinations, which have no default: by default the suite sends them
#: where nobody answers (port 9 of this machine, which only a privileged account could take;
#: https, so no warning about sending in clear), and a test that looks at what they receive
#: points them at its own stand-ins (tests.test_care_e2e.point_sample_at).
SAMPLE_DESTINATIONS = {
    "CARE_PLATFORM_URL": "https://127.0.0.1:9/care-events",
    "SMS_GATEWAY_URL": "https://127.0.0.1:9/messages",
    "CARE_FHIR_URL": "https://127.0.0.1:9/fhir",
    "CBO_FHIR_URL": "https://127.0.0.1:9/fhir",
}


@pytest.fixture(scope="session", autouse=True)
def sample_routes_environment() -> Iterator[None]:
    """What the sample routes need to load and run against the suite's stand-ins, as
    `carehub demo` sets it: a signing key of the suite's own ($CARE_PLATFORM_SECRET, without
    which they do not load), their destinations' URLs (SAMPLE_DESTINATIONS), and plain SMTP
    to the mail stand-ins on 127.0.0.1 (the sample requires STARTTLS by default)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CARE_PLATFORM_SECRET", "suite-stand-in-signing-key")
        patch.setenv("SMTP_STARTTLS", "false")
        for name, url in SAMPLE_DESTINATIONS.items():
            patch.setenv(name, url)
        yield
