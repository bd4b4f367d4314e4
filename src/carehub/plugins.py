"""The plugin host: pluggy's manager plus the registries the registration hooks fill.

Plugins come from three places: carehub's built-ins (``carehub.builtins``), packages that
declare the ``carehub`` entry-point group, and single ``.py`` files in a plugins directory.
``CAREHUB_PLUGINS`` (allow-list) and ``CAREHUB_BLOCK_PLUGINS`` (block-list), comma-separated
plugin names, choose among them. A plugin that fails to import is reported by name and skipped,
unless strict loading is asked for. The host lives on the Hub: there is no global manager.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pluggy

from carehub import hookspecs
from carehub.builtins import BUILTIN_PLUGINS
from carehub.components import Channel, Component, Enricher, Translator
from carehub.errors import CarehubError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "carehub"
ENV_ALLOW = "CAREHUB_PLUGINS"
ENV_BLOCK = "CAREHUB_BLOCK_PLUGINS"
ENV_PLUGINS_DIR = "CAREHUB_PLUGINS_DIR"


class PluginError(CarehubError):
    """A plugin could not be loaded or registered something invalid."""


@dataclass(slots=True)
class PluginInfo:
    """One loaded plugin, for `carehub plugins`."""

    name: str
    source: str  # builtin | entry point | file
    version: str | None
    module: ModuleType | None = None
    components: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)


@dataclass(slots=True)
class LoadFailure:
    name: str
    source: str
    error: str


def _names(env: str) -> set[str] | None:
    raw = os.environ.get(env)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


class PluginHost:
    """Loads plugins, calls the registration hooks, and holds what they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("carehub")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[LoadFailure] = []
        self.translators: dict[str, type[Translator]] = {}
        self.enrichers: dict[str, type[Enricher]] = {}
        self.channels: dict[str, type[Channel]] = {}
        self.commands: list[click.Command] = []
        self._owner: dict[tuple[str, str], str] = {}

    # -- loading --------------------------------------------------------------------------
    def load(self, *, plugins_dir: Path | None = None, strict: bool = False) -> PluginHost:
        """Load built-ins, entry points and the plugins directory, then run registration."""
        allow, block = _names(ENV_ALLOW), _names(ENV_BLOCK)

        def wanted(name: str, builtin: bool) -> bool:
            if block and name in block:
                return False
            return builtin or allow is None or name in allow

        for module_name in BUILTIN_PLUGINS:
            short = module_name.rsplit(".", 1)[-1]
            if wanted(f"builtin.{short}", True):
                self._add(
                    f"builtin.{short}",
                    "builtin",
                    None,
                    lambda m=module_name: importlib.import_module(m),
                    strict=True,
                )
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if not wanted(entry.name, False):
                continue
            version = entry.dist.version if entry.dist else None
            self._add(entry.name, "entry point", version, entry.load, strict=strict)
        directory = plugins_dir or (
            Path(os.environ[ENV_PLUGINS_DIR]) if os.environ.get(ENV_PLUGINS_DIR) else None
        )
        if directory is not None and directory.is_dir():
            for path in sorted(directory.glob("*.py")):
                if path.name.startswith("_") or not wanted(path.stem, False):
                    continue
                self._add(
                    path.stem, f"file {path}", None, lambda p=path: _import_file(p), strict=strict
                )
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise PluginError(f"a plugin implements a hook that does not exist: {err}") from err
        self._register_all()
        return self

    def add_plugin(self, plugin: Any, name: str, *, source: str = "code") -> None:
        """Register an already-imported plugin object (tests and embedding use this)."""
        self._add(name, source, None, lambda: plugin, strict=True)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            self.pm.unregister(plugin)
            self.plugins.pop(name, None)
            raise PluginError(
                f"plugin {name!r} implements a hook that does not exist: {err}"
            ) from err

    def _add(
        self,
        name: str,
        source: str,
        version: str | None,
        loader: Callable[[], Any],
        *,
        strict: bool,
    ) -> None:
        try:
            plugin = loader()
            self.pm.register(plugin, name=name)
        except Exception as err:
            if strict:
                raise PluginError(f"plugin {name!r} ({source}) failed to load: {err}") from err
            log.error("plugin %r (%s) failed to load and is skipped: %s", name, source, err)
            self.failures.append(LoadFailure(name, source, f"{type(err).__name__}: {err}"))
            return
        module = plugin if isinstance(plugin, ModuleType) else None
        hooks = [impl.name for impl in self.pm.get_hookcallers(plugin) or []]
        self.plugins[name] = PluginInfo(name, source, version, module, hooks=sorted(hooks))

    # -- registration ---------------------------------------------------------------------
    def _register_all(self) -> None:
        hook = self.pm.hook
        for hook_name, registry, base in (
            ("carehub_register_translators", self.translators, Translator),
            ("carehub_register_enrichers", self.enrichers, Enricher),
            ("carehub_register_channels", self.channels, Channel),
        ):
            for impl in getattr(hook, hook_name).get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"
                impl.function(register=self._registrar(plugin_name, registry, base))
        for impl in hook.carehub_register_commands.get_hookimpls():
            impl.function(register=self.commands.append)

    def _registrar(
        self, plugin_name: str, registry: dict[str, Any], base: type[Component]
    ) -> Callable[[type[Component]], None]:
        def register(component: type[Component]) -> None:
            if not (isinstance(component, type) and issubclass(component, base)):
                raise PluginError(
                    f"plugin {plugin_name!r} registered {component!r}, which is not a "
                    f"{base.__name__} subclass"
                )
            if not component.name:
                raise PluginError(f"plugin {plugin_name!r}: {component.__name__} has no name")
            key = (base.kind, component.name)
            if key in self._owner:
                raise PluginError(
                    f"two plugins register a {base.kind} named {component.name!r}: "
                    f"{self._owner[key]!r} and {plugin_name!r}"
                )
            self._owner[key] = plugin_name
            registry[component.name] = component
            info = self.plugins.get(plugin_name)
            if info is not None:
                info.components.append(f"{base.kind} {component.name}")

        return register

    # -- per-message observers ------------------------------------------------------------
    def observed(self, hook_name: str) -> bool:
        """Whether any plugin implements an observer hook (so its arguments are worth making)."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook on every plugin; a plugin that raises is logged and skipped."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            try:
                # Like pluggy itself, pass only the arguments the implementation declares.
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception:
                log.exception(
                    "plugin %r raised in %s; ignored", self.pm.get_name(impl.plugin), hook_name
                )

    def run_step(self, work: Any, step: str, run: Callable[[], Any]) -> Any:
        """Run one route step through the carehub_run_step wrappers (tracing, timing)."""
        return self.pm.hook.carehub_run_step(work=work, step=step, run=run)


def _import_file(path: Path) -> ModuleType:
    module_name = f"carehub_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
