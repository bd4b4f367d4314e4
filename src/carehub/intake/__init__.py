"""Intake: turn received bytes into stored messages and the ACKs that answer them."""

from carehub.intake.intake import Arrival, Intake, IntakeResult

__all__ = ["Arrival", "Intake", "IntakeResult"]
