"""Patient merges (A40): which identifier a merge left standing for a retired one."""

from __future__ import annotations

from collections.abc import Callable

#: A chain of merges longer than this is a loop in bad data.
MERGE_HOPS = 32


def follow_merges(merged_into: Callable[[str], str | None], patient_key: str) -> str:
    """The patient key the merges left standing for ``patient_key``: itself unless it was
    retired, followed through a chain of merges (A into B, then B into C); ``merged_into``
    says what one key was merged into, or None."""
    seen = {patient_key}
    for _ in range(MERGE_HOPS):
        target = merged_into(patient_key)
        if target is None or target in seen:
            break
        seen.add(target)
        patient_key = target
    return patient_key
