"""A site's templates folder is read when the step starts: a file no notice would look for (a
misspelt event, a channel the step lacks) would leave the built-in text in use, perhaps saying
more than the site's, and a template Jinja cannot read would fail every notice as it is sent.
Both are refused by `carehub routes check` and `carehub serve`, naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_notify_step_options import COMMANDS, NOTIFY, NOTIFY_REFERRAL, carehub, refused

SAMPLE_TEMPLATES = Path(__file__).resolve().parents[1] / "config" / "care" / "templates"


def with_templates(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "config" / "site-templates"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelt_event_name_is_refused(tmp_path: Path, command: list[str]) -> None:
    folder = with_templates(tmp_path, {"dicharge.txt": "Subject: Discharge\n{{ patient_name }}"})
    done, routes = carehub(tmp_path, NOTIFY + "          templates: site-templates\n", command)
    error = refused(done)
    assert f"{routes}:7: route 'care': steps[1] (notify): templates: {folder}/dicharge.txt" in (
        error
    )
    assert "no notice is called 'dicharge'" in error and "discharge" in error


@pytest.mark.parametrize("command", COMMANDS)
def test_a_channel_the_step_lacks_is_refused(tmp_path: Path, command: list[str]) -> None:
    with_templates(tmp_path, {"discharge.fax.txt": "{{ patient_name }}"})
    done, _ = carehub(tmp_path, NOTIFY + "          templates: site-templates\n", command)
    error = refused(done)
    assert "discharge.fax.txt: this step has no channel 'fax'" in error
    assert "(its channels: email, sms)" in error


def test_a_template_jinja_cannot_read_is_refused_with_its_line(tmp_path: Path) -> None:
    broken = "Subject: Admission\n{{ patient_name }}\n{% if full %}\nDiagnoses: {{ diagnoses }}\n"
    folder = with_templates(tmp_path, {"admission.email.txt": broken})
    done, _ = carehub(tmp_path, NOTIFY + "          templates: site-templates\n", COMMANDS[0])
    assert f"{folder}/admission.email.txt:4: Unexpected end of template" in refused(done)


def test_referral_templates_are_checked_against_the_referral_notices(tmp_path: Path) -> None:
    # A care template in the referral step's folder is no referral notice.
    with_templates(tmp_path, {"referral_new.txt": "ok", "discharge.txt": "not a referral"})
    routes_text = NOTIFY_REFERRAL + (
        "          providers: providers.yaml\n          templates: site-templates\n"
    )
    done, _ = carehub(tmp_path, routes_text, COMMANDS[0])
    error = refused(done)
    assert "discharge.txt: no notice is called 'discharge'" in error
    assert "referral_new" in error


def test_the_sample_templates_and_other_files_pass(tmp_path: Path) -> None:
    """The sample folder's override and its README (not a template) are fine."""
    files = {p.name: p.read_text(encoding="utf-8") for p in SAMPLE_TEMPLATES.iterdir()}
    assert "discharge.sms.txt" in files and "README.md" in files
    with_templates(tmp_path, files)
    done, _ = carehub(tmp_path, NOTIFY + "          templates: site-templates\n", COMMANDS[0])
    assert done.returncode == 0, done
