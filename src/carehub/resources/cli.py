"""`carehub resources search`: ask the community directory what the enricher would, from the
command line, so a coordinator (or whoever edits the crosswalk) can check a match by hand:

    carehub resources search --need food --near 62704 --language es --age 70

Files default to ``resources/`` beside the hub config (``--config`` or $CAREHUB_CONFIG), else
``./config/resources/``: the layout of the sample config, where the enricher finds them too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from carehub.config import ENV_CONFIG
from carehub.resources.hsds import ApiDirectory, Directory, LocalDirectory, Service
from carehub.resources.matching import (
    Crosswalk,
    PostalCodes,
    known_language,
    language_hint,
    rank,
)


def _base_folder(config_path: Path | None) -> Path:
    """Where default file names start: the config file's folder, else ./config."""
    if config_path is not None:
        return config_path.resolve().parent
    return Path.cwd() / "config"


def _resolve(value: Path | None, base: Path, default: str) -> Path:
    return value if value is not None else base / default


@click.group()
def resources() -> None:
    """Community resources: search the HSDS directory the community-resources step uses."""


@resources.command("search")
@click.option(
    "--need",
    "needs",
    multiple=True,
    required=True,
    help="A need category (food, housing, ...), an ICD-10-CM code (Z59.41) or words; repeatable.",
)
@click.option("--near", help="The patient's postal code, for distance.")
@click.option(
    "--language",
    help="The patient's language: an ISO 639-1/639-2 code or English name (es, spa, Spanish) "
    "or a language the directory lists.",
)
@click.option("--age", type=click.IntRange(min=0, max=130), help="The patient's age in years.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--directory",
    type=click.Path(path_type=Path, dir_okay=False),
    help="HSDS JSON export (default: resources/directory.json beside the config).",
)
@click.option("--api-url", help="An HSDS 3.0 API base URL instead of a file.")
@click.option("--crosswalk", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--postal-codes", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--max-km", type=click.FloatRange(min=0, min_open=True), default=25.0)
@click.option("--max-results", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar=ENV_CONFIG,
    help=f"Hub config YAML (or ${ENV_CONFIG}); default files are found beside it.",
)
def search_command(
    needs: tuple[str, ...],
    near: str | None,
    language: str | None,
    age: int | None,
    as_json: bool,
    directory: Path | None,
    api_url: str | None,
    crosswalk: Path | None,
    postal_codes: Path | None,
    max_km: float,
    max_results: int,
    config_path: Path | None,
) -> None:
    """Rank the services that serve NEED near a postal code, with the reasons."""
    if directory is not None and api_url:
        raise click.UsageError("give --directory or --api-url, not both")
    base = _base_folder(config_path)
    walk = Crosswalk.load(_resolve(crosswalk, base, "resources/crosswalk.yaml"))
    postal_codes_file = _resolve(postal_codes, base, "resources/postal_codes.csv")
    table = PostalCodes.load(postal_codes_file)
    wanted = walk.resolve(needs)
    near = PostalCodes.normalize(near)
    if near and not api_url and table.get(near) is None:
        click.echo(
            f"note: postal code {near} is not in {postal_codes_file}: distances are unknown, "
            "so services are not ranked or limited by distance",
            err=True,
        )
    source: Directory
    if api_url:
        source = ApiDirectory(api_url, cache_seconds=0)
    else:
        source = LocalDirectory(_resolve(directory, base, "resources/directory.json"), table)
    try:
        if near and isinstance(source, ApiDirectory):
            services = source.search(postcode=near, proximity_m=max_km * 1000)
        else:
            services = source.services()
    finally:
        if isinstance(source, ApiDirectory):
            source.close()
    found = _language(language, services) if language else None
    ranking = rank(
        services,
        wanted,
        near,
        found[0] if found else None,
        age,
        postal_codes=table,
        max_km=max_km,
        max_results=max_results,
    )
    result = {
        "needs": [n.to_json() for n in wanted],
        "near_postal_code": near,
        "language": found[1] if found else None,
        "age": age,
        "directory": source.describe(),
        **ranking.to_json(),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    _print(result)


def _language(text: str, services: list[Service]) -> tuple[str, str]:
    """The --language value as rank() compares it, and its name. Unlike a postal code missing
    from the table (distance is only unknown, so the search goes on with a note), a language
    nobody knows is a typo or matches no service: ranked as if it were not asked, the results
    would look like an answer, so it is refused with the forms that are accepted."""
    found = known_language(text, services)
    if found is None:
        raise click.BadParameter(
            f"{text!r} is not a language carehub knows or the directory lists: "
            f"{language_hint(text, services)}",
            param_hint="'--language'",
        )
    return found


def _print(result: dict[str, Any]) -> None:
    needs = ", ".join(n["category"] for n in result["needs"])
    facts = [f"needs: {needs}"]
    for label, key in (("near", "near_postal_code"), ("language", "language"), ("age", "age")):
        if result.get(key) is not None:
            facts.append(f"{label} {result[key]}")
    click.echo(" · ".join(facts) + f" · {result['directory']}")
    matches = result["matches"]
    if not matches:
        click.echo("no matching services")
    for match in matches:
        org = f"{match['organization']} — " if match.get("organization") else ""
        click.echo(f"{match['rank']}. {org}{match['service']}  [score {match['score']}]")
        location = match.get("location") or {}
        contact = [p for p in (location.get("address"), match.get("phone")) if p]
        if contact:
            click.echo("   " + " · ".join(contact))
        for reason in match["reasons"]:
            click.echo(f"   - {reason}")
    excluded = result["excluded"]
    if excluded:
        click.echo(f"excluded ({result['excluded_total']}):")
        for item in excluded:
            who = f"{item['service']} ({item['organization']})"
            click.echo(f"   - {who}: {'; '.join(item['reasons'])}")
