"""HL7 v2 text handling: MLLP framing, character sets, the lazy field view, ACKs."""

from carehub.hl7.view import MessageView, NotHL7Error

__all__ = ["MessageView", "NotHL7Error"]
