"""carehub: an integration engine for care coordination."""

__version__ = "0.1.0"
