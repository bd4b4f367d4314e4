"""Closed-loop referrals: REF/RRI (HL7 v2 chapter 11) and CBO status updates tracked as FHIR
Task statuses, so the referring provider hears what became of each referral.

The route step is :class:`~carehub.referrals.state.ReferralStateEnricher` (``referral-state``);
the command group is :data:`~carehub.referrals.cli.referrals`. Both are imported lazily by the
builtin plugin, so importing this package stays cheap.
"""

from __future__ import annotations

from carehub.referrals.state import (
    CLOSED_STATUSES,
    OPEN_STATUSES,
    STATUSES,
    TRANSITIONS,
    ReferralRecord,
    ReferralStateEnricher,
    ReferralTracker,
    ReferralTransition,
    list_referrals,
    referral_timeline,
)

__all__ = [
    "CLOSED_STATUSES",
    "OPEN_STATUSES",
    "STATUSES",
    "TRANSITIONS",
    "ReferralRecord",
    "ReferralStateEnricher",
    "ReferralTracker",
    "ReferralTransition",
    "list_referrals",
    "referral_timeline",
]
