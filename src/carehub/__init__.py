"""carehub: an integration engine for care coordination.

A plugin needs only ``from carehub import hookimpl`` and the component base classes in
``carehub.components``.
"""

from carehub.hookspecs import hookimpl

__version__ = "0.3.0"

__all__ = ["__version__", "hookimpl"]
