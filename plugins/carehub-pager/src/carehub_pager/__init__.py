"""carehub-pager: pages the on-call clinician for a unit from carehub routes.

carehub finds the plugin through the ``carehub`` entry point in pyproject.toml, which names
``carehub_pager.plugin``; this package module only carries the version.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("carehub-pager")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
