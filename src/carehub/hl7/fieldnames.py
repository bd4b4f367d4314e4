"""Human names of HL7 v2 fields and components, for showing a message segment by segment.

``carehub messages show ID`` prints each field as ``PID-5  Patient Name  DOE^JANE``; the names
come from the reference tables bundled with hl7apy (the same tables its parser validates
against), so they follow the message's own HL7 version instead of a hand-kept list.

Both lookups are for display only: they never raise, whatever the segment, field number or
version string, and answer ``None`` / ``[]`` when there is nothing sensible to show (Z
segments, fields past the end of a segment, fields withdrawn in that version).

Cost: hl7apy imports one whole version library (every segment, field and data type of that
version) on first use, about 10-16 ms per version; each segment's names are then built once
(about 1.5 ms) and every later lookup is a cached dict hit (about 0.5 us), which matters
because the display asks once per field of every segment of every message shown.
"""

from __future__ import annotations

import operator
import re
from functools import lru_cache
from typing import Any

import hl7apy

__all__ = ["component_names", "field_name", "humanize", "resolve_version"]

DEFAULT_VERSION = "2.5"
"""Used when the message's version is missing or is not an HL7 v2 version at all."""

# Abbreviations kept upper-case in display names.  Segment IDs and tokens mixing letters and
# digits (NK1, HL7, UB92) are handled by rule; these are the rest, taken from the long names
# hl7apy 1.3.5 actually uses.  Data type codes (ST, NM, IS, ...) are here because hl7apy
# appends them to some component names to tell same-named components apart (ID_NUMBER_ST).
# fmt: off
_ACRONYMS = frozenset({
    "AE", "BC", "BP", "CCL", "CE", "CHAMPUS", "CM", "CMS", "CP", "CPU", "CRL", "CWE", "CX",
    "DEA", "DIN", "DMV", "DOB", "DR", "DRG", "DT", "EI", "ESR", "HD", "ID", "III", "IRB", "IS",
    "IV", "JR", "LOA", "MD", "MFN", "NDC", "NM", "NPI", "OCE", "OID", "PA", "PCA", "PCCL", "POA",
    "PP", "PRN", "PSRO", "QRY", "RX", "SAD", "SI", "SSN", "ST", "TP", "TS", "TX", "UB", "UID",
    "UNSPSC", "UOM", "UR", "VAT", "VIP", "VT", "XCN", "XPN",
})
# fmt: on
_SPECIAL = {"IDS": "IDs", "ML": "mL"}
# Minor words stay lower-case inside a name, as in the standard's own "Date/Time of Birth".
_MINOR = frozenset({"A", "AN", "AND", "AS", "AT", "BY", "FOR", "IN", "OF", "ON", "OR", "THE", "TO"})
# Two-token phrases the standard writes with a slash or as an abbreviation.
_PAIRS = {
    ("DATE", "TIME"): "Date/Time",
    ("D", "T"): "D/T",
    ("R", "U"): "R/U",
    ("E", "G"): "(e.g.",  # PREFIX_E_G_DR -> Prefix (e.g. DR); closed at the end of the name
}

_VERSION_RE = re.compile(r"\d+(?:\.\d+)*")
_NUMBERED_RE = re.compile(r"\s*([A-Za-z0-9]+)_(\d+)\s*")
_SEGMENT_ID_RE = re.compile(r"[A-Z][A-Z0-9]{2}")


def field_name(segment: str, field: int, version: str = DEFAULT_VERSION) -> str | None:
    """Human name of SEG-n for that HL7 version, e.g. field_name("PID", 5) -> "Patient Name".

    None for unknown segments/fields (Z segments, fields past the end, withdrawn fields).
    """
    try:
        entry = _lookup(segment, field, version)
    except Exception:  # display helper: a bad name must never break `messages show`
        return None
    return entry[0] if entry else None


def component_names(segment: str, field: int, version: str = DEFAULT_VERSION) -> list[str]:
    """Names of the components of SEG-n, e.g. ("PID", 3) -> ["ID Number", "Check Digit", ...].

    Position i holds component i+1, so a component withdrawn in that version (2.6 XTN-1) is
    an empty string rather than shifting the rest.  [] for leaf fields or anything unknown.
    """
    try:
        entry = _lookup(segment, field, version)
    except Exception:  # display helper: a bad name must never break `messages show`
        return []
    return list(entry[1]) if entry else []


def resolve_version(version: object) -> str:
    """The hl7apy library version to read names from for a message's MSH-12 value.

    Exact matches win ("2.3.1", "2.5.1"); otherwise the newest supported version not newer
    than the one asked for ("2.9" -> "2.8.2", "2.7.1" -> "2.7"), the oldest for anything
    older, and DEFAULT_VERSION for empty or non-v2 values.  Only the first version-looking run
    of the text is read, so a VID composite such as "2.5.1^USA" gives "2.5.1".
    """
    try:
        return _resolve_version(version.strip() if isinstance(version, str) else "")
    except Exception:
        return DEFAULT_VERSION


def _lookup(segment: object, field: object, version: object) -> tuple[str, tuple[str, ...]] | None:
    """Normalise the caller's input to hashable keys, then hit the per-segment cache."""
    if not isinstance(segment, str):
        return None
    number = operator.index(field)  # type: ignore[arg-type]  # non-ints raise, caller catches
    if number < 1:
        return None
    seg = segment.strip().upper()
    if not _SEGMENT_ID_RE.fullmatch(seg) or seg.startswith("Z"):
        # Z segments are site-defined: whatever hl7apy ships for them says nothing about ours.
        return None
    return _segment_table(seg, resolve_version(version)).get(number)


@lru_cache(maxsize=64)
def _resolve_version(version: str) -> str:
    """Cached body of resolve_version (called for every field, so kept off the hot path)."""
    supported = _supported_versions()
    if version in supported:
        return version
    match = _VERSION_RE.search(version)
    if not match:
        return DEFAULT_VERSION
    wanted = _version_key(match.group())
    if match.group() in supported:
        return match.group()
    if wanted[0] != 2:
        return DEFAULT_VERSION
    ordered = sorted(supported, key=_version_key)
    older = [v for v in ordered if _version_key(v) <= wanted]
    return older[-1] if older else ordered[0]


@lru_cache(maxsize=1)
def _supported_versions() -> frozenset[str]:
    """Versions hl7apy has reference tables for (2.1 .. 2.8.2 in hl7apy 1.3.5)."""
    return frozenset(hl7apy.SUPPORTED_LIBRARIES)


def _version_key(version: str) -> tuple[int, ...]:
    """ "2.5.1" -> (2, 5, 1), so versions compare numerically."""
    return tuple(int(part) for part in version.split("."))


@lru_cache(maxsize=1024)
def _segment_table(segment: str, version: str) -> dict[int, tuple[str, tuple[str, ...]]]:
    """Field number -> (field name, component names) for one segment, built once per version.

    Keyed by the number in hl7apy's child name (PID_5), not by position: 2.6+ drop withdrawn
    fields from the tables (2.6 DG1 jumps from 6 to 15), so positions would mislabel.
    """
    try:
        reference = hl7apy.load_reference(segment, "Segment", version)
    except Exception:  # ChildNotFound for segments this version does not define
        return {}
    table: dict[int, tuple[str, tuple[str, ...]]] = {}
    for child in _children(reference):
        number = _child_number(child, segment)
        definition = child[1] if len(child) > 1 else None
        if number is None or not _is_definition(definition):
            continue
        name = humanize(definition[3], segment, _segment_ids(version))
        table[number] = (name, _component_names(definition, version))
    return table


def _component_names(definition: Any, version: str) -> tuple[str, ...]:
    """Names of a field's components, positional, "" where the version has a gap."""
    if definition[0] != "sequence":
        return ()
    by_number: dict[int, str] = {}
    for child in _children(("sequence", definition[1])):
        number = _child_number(child, None)
        component = child[1] if len(child) > 1 else None
        if number is not None and _is_definition(component):
            by_number[number] = humanize(component[3], None, _segment_ids(version))
    if not by_number:
        return ()
    return tuple(by_number.get(i, "") for i in range(1, max(by_number) + 1))


def _children(reference: Any) -> tuple[Any, ...]:
    """Child entries of a reference, tolerating the shapes hl7apy really ships.

    Normally ('sequence', children); 2.1 ORO is the bare children tuple, 2.7 QRD/QRF/URD/URS
    are ('sequence',) with no children, and 2.7 TQ1-1 is a sequence whose children are None.
    """
    if not isinstance(reference, (tuple, list)) or not reference:
        return ()
    if reference[0] == "sequence":
        children = reference[1] if len(reference) > 1 else None
    elif isinstance(reference[0], (tuple, list)):
        children = reference
    else:  # 'choice' (ANYHL7SEGMENT) and anything else has no numbered fields
        return ()
    if not isinstance(children, (tuple, list)):
        return ()
    return tuple(c for c in children if isinstance(c, (tuple, list)) and c)


def _child_number(child: Any, segment: str | None) -> int | None:
    """5 for ('PID_5', ...); None if the name is not <segment>_<n>."""
    if not isinstance(child[0], str):
        return None
    match = _NUMBERED_RE.fullmatch(child[0])
    if not match or (segment is not None and match.group(1).upper() != segment):
        return None
    return int(match.group(2))


def _is_definition(definition: Any) -> bool:
    """True for ('leaf'|'sequence', children, datatype, LONG_NAME, table, maxlen)."""
    return (
        isinstance(definition, (tuple, list))
        and len(definition) > 3
        and isinstance(definition[3], str)
        and bool(definition[3].strip())
    )


@lru_cache(maxsize=16)
def _segment_ids(version: str) -> frozenset[str]:
    """Segment IDs of a version, so qualifiers like the PID in SET_ID_PID stay upper-case."""
    try:
        return frozenset(hl7apy.load_library(version).SEGMENTS)
    except Exception:
        return frozenset()


def humanize(
    long_name: str, segment: str | None = None, segment_ids: frozenset[str] = frozenset()
) -> str:
    """'PATIENT_NAME' -> 'Patient Name', 'SET_ID_PID' -> 'Set ID - PID', 'MOTHER_S_MAIDEN_NAME'
    -> "Mother's Maiden Name", 'DATE_TIME_OF_BIRTH' -> 'Date/Time of Birth'.

    The long names are the standard's names with punctuation turned into underscores, so this
    puts back what it can: " - " (written ___, or a trailing segment ID), "'s", "(s)", "/".
    """
    # hl7apy has a few names with stray spaces: 'INACTIVATIO   N_DATE', 'NAME_ID NO'.
    text = re.sub(r"\s{2,}", "", long_name.strip())
    text = re.sub(r"\s", "_", text).upper()
    parts = [p for p in text.split("___") if p.strip("_")]
    if len(parts) == 1 and segment:
        head, _, tail = parts[0].rpartition("_")
        if head.strip("_") and tail == segment:  # SET_ID_PID, DIAGNOSIS_CODE_DG1
            parts = [head, tail]
    return " - ".join(_humanize_part(p, segment, segment_ids) for p in parts)


def _humanize_part(text: str, segment: str | None, segment_ids: frozenset[str]) -> str:
    """Title-case one underscore-separated run of words."""
    tokens = [t for t in text.split("_") if t]
    words: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        pair = _PAIRS.get((token, tokens[i + 1])) if i + 1 < len(tokens) else None
        if pair:
            words.append(pair)
            i += 2
            continue
        if token == "S" and words:  # possessive or plural: MOTHER_S_, SITE_S at the end
            words[-1] += "'s" if i + 1 < len(tokens) else "(s)"
            i += 1
            continue
        last = i == len(tokens) - 1
        numbered = not last and tokens[i + 1].isdigit()  # OBX_5 in PART_OF_OBX_5_OBSERVATION
        words.append(
            _word(
                token,
                inner=bool(words) and not last,
                qualifier=i == 0 or last or numbered,
                segment=segment,
                segment_ids=segment_ids,
            )
        )
        i += 1
    if any(word.startswith("(") and not word.endswith(")") for word in words):
        words[-1] += ")"
    return " ".join(words)


def _word(
    token: str,
    *,
    inner: bool,
    qualifier: bool,
    segment: str | None,
    segment_ids: frozenset[str],
) -> str:
    """Case one token: acronyms and segment IDs upper, inner minor words lower, the rest Title."""
    if token in _SPECIAL:
        return _SPECIAL[token]
    if token in _ACRONYMS or token == segment:
        return token
    if re.search(r"\d", token) and re.search(r"[A-Z]", token):  # NK1, HL7, UB92
        return token
    # Segment IDs used as a qualifier (LDP_PRIMARY_KEY_VALUE, ROLE_ROL, OBX_5); elsewhere in
    # a name they are usually ordinary abbreviations (PRACTITIONER_ORG_UNIT_IDENTIFIER).
    if qualifier and token in segment_ids:
        return token
    if inner and token in _MINOR:
        return token.lower()
    return token.capitalize()
