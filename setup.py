"""The build's one step beyond pyproject.toml: a built wheel carries the sample config (the
checkout's config/) as ``carehub/samples``, so that `carehub demo` works from an installed
wheel and a site has an annotated config to copy (README, Deploying from a wheel). An
editable install reads config/ of the checkout itself."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SAMPLES = Path(__file__).resolve().parent / "config"


class BuildWithSamples(build_py):
    """build_py, then config/ copied into the built package."""

    def run(self) -> None:
        super().run()
        if SAMPLES.is_dir():
            target = Path(self.build_lib) / "carehub" / "samples"
            shutil.copytree(
                SAMPLES, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )


setup(cmdclass={"build_py": BuildWithSamples})
