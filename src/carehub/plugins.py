"""The plugin host: pluggy's manager plus the registries the registration hooks fill.

Plugins come from three places: carehub's built-ins (``carehub.builtins``), packages that
declare the ``carehub`` entry-point group, and single ``.py`` files in a plugins directory.
``CAREHUB_PLUGINS`` (allow-list) and ``CAREHUB_BLOCK_PLUGINS`` (block-list), comma-separated
plugin names, choose among them. A plugin that fails to import is reported by name and skipped,
unless strict loading is asked for. The host lives on the Hub: there is no global manager.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click
import pluggy
from pydantic_core import to_jsonable_python

from carehub import hookspecs
from carehub.builtins import BUILTIN_PLUGINS
from carehub.components import Channel, Component, ComponentOptions, Enricher, Translator
from carehub.errors import CarehubError, ConfigError
from carehub.routing.config import ForwardConfig

if TYPE_CHECKING:
    from carehub.config import HubConfig
    from carehub.store.failure_run import FailureRun

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "carehub"
ENV_ALLOW = "CAREHUB_PLUGINS"
ENV_BLOCK = "CAREHUB_BLOCK_PLUGINS"
ENV_PLUGINS_DIR = "CAREHUB_PLUGINS_DIR"
#: The built-in that runs every translate and enrich step (carehub_run_step); never blocked.
CORE_PLUGIN = "builtin.core"
#: Plugin names starting with this belong to carehub's built-ins: an entry point or a
#: plugins-directory file so named would take a blocked built-in's place, or clash with it.
BUILTIN_PREFIX = "builtin."

#: Per component kind: the methods carehub awaits (``async def``) and those it calls without
#: awaiting (plain ``def``). The wrong kind fails late and quietly otherwise: a plain ``send``
#: delivers and is then recorded as failing (``await`` of its str), and an ``async def
#: enrich`` records its coroutine as the output without running.
AWAITED_METHODS: dict[str, tuple[str, ...]] = {"channel": ("send",)}
CALLED_METHODS: dict[str, tuple[str, ...]] = {
    "translator": ("translate",),
    "enricher": ("enrich",),
    "channel": ("render",),
}

#: Seconds between the log's reminders that one plugin's observer hook keeps raising.
OBSERVER_REPORT_SECONDS = 60.0
#: Seconds an observer hook may take for one call before a WARNING names it: observers run
#: where messages are acknowledged, so a slow one delays every ACK.
SLOW_OBSERVER = 0.25
#: Seconds between WARNINGs about the same slow observer (plugin and hook).
SLOW_OBSERVER_EVERY = 300

#: Step keys carehub reads itself, by component kind: an Options field of one of these names
#: would never receive the route's value (StepConfig.component pops ``use``; ForwardConfig
#: takes ``channel``, ``name``, ``retry`` and ``allow_cleartext`` before the channel sees its
#: options).
RESERVED_OPTION_KEYS: dict[str, frozenset[str]] = {
    "translator": frozenset({"use"}),
    "enricher": frozenset({"use"}),
    "channel": frozenset(ForwardConfig.model_fields),
}


class PluginError(CarehubError):
    """A plugin could not be loaded or registered something invalid."""


class HookImplementationError(PluginError):
    """A hook implementation that could never work (``async def``, or an argument the hook
    does not pass); its plugin is not loaded. ``at``: FILE:LINE of the implementation."""

    def __init__(self, message: str, at: str | None) -> None:
        super().__init__(message)
        self.at = at


class InvalidComponentError(PluginError):
    """A component breaks the component contract (its Options, its methods); its plugin is
    not loaded, as if it had failed to import."""


class ReservedOptionError(InvalidComponentError):
    """A component's Options declares a key carehub reads itself; its plugin is not loaded."""


class ComponentNameError(InvalidComponentError):
    """A component without a name, or with one another plugin (a built-in, say) registered
    first: the first keeps it, and this plugin is not loaded."""


@dataclass(slots=True)
class OptionInfo:
    """One option of a component's Options model, for `carehub plugins --json`."""

    name: str
    required: bool
    default: Any = None  # as JSON holds it


@dataclass(slots=True)
class ComponentInfo:
    """One registered component: what routes write and what `carehub plugins` shows."""

    kind: str  # translator | enricher | channel
    name: str
    description: str
    options: list[OptionInfo] = field(default_factory=list)

    @classmethod
    def of(cls, component: type[Component]) -> ComponentInfo:
        options = [
            OptionInfo(key, True)
            if spec.is_required()
            else OptionInfo(
                key,
                False,
                to_jsonable_python(spec.get_default(call_default_factory=True), fallback=str),
            )
            for key, spec in component.Options.model_fields.items()
        ]
        return cls(component.kind, component.name, component.description, options)


@dataclass(slots=True)
class PluginInfo:
    """One loaded plugin, for `carehub plugins`."""

    name: str
    source: str  # builtin | entry point | file
    version: str | None
    module: ModuleType | None = None
    #: "KIND NAME" of each component registered, in order.
    components: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    #: The same components with their descriptions and options.
    details: list[ComponentInfo] = field(default_factory=list)
    #: What loaded but looks wrong (a module with no hook implementations), as logged.
    warning: str | None = None
    #: "NAME VERSION" of the distribution that provides an entry point, for its errors.
    provided_by: str | None = None

    @property
    def origin(self) -> str:
        """Where the plugin comes from, as its load errors say it (see _origin)."""
        return _origin(self.source, self.provided_by)


@dataclass(slots=True)
class LoadFailure:
    name: str
    source: str
    error: str
    #: FILE:LINE of the code that raised, when it is known (see _failure_site).
    at: str | None = field(default=None, compare=False)


def _names(env: str) -> set[str] | None:
    raw = os.environ.get(env)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def installed_entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed distributions' ``carehub`` entry points (one place to narrow them down,
    as carehub's own test suite does to stay independent of what else is installed)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


class PluginHost:
    """Loads plugins, calls the registration hooks, and holds what they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("carehub")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[LoadFailure] = []
        #: Plugins the allow or block list kept out: name -> the variable that did.
        self.left_out: dict[str, str] = {}
        #: Allow-list names that matched no plugin (a typo, or a package not installed).
        self.unmatched: list[str] = []
        self.translators: dict[str, type[Translator]] = {}
        self.enrichers: dict[str, type[Enricher]] = {}
        self.channels: dict[str, type[Channel]] = {}
        self.commands: list[click.Command] = []
        self._owner: dict[tuple[str, str], str] = {}
        self._step_runner: bool | None = None  # is anything answering carehub_run_step?
        #: (plugin, hook) -> the run of that observer's failures (see notify). Observers are
        #: called from the event loop and from routing's helper threads, hence the lock.
        self._observer_runs: dict[tuple[str, str], FailureRun] = {}
        self._observer_lock = threading.Lock()
        #: (plugin, hook) -> (when a slow call was last logged, slow calls since then).
        self._observer_slow_logged: dict[tuple[str, str], tuple[float | None, int]] = {}

    # -- loading --------------------------------------------------------------------------
    def load(
        self,
        *,
        plugins_dir: Path | None = None,
        strict: bool = False,
        config: HubConfig | None = None,
    ) -> PluginHost:
        """Load built-ins, entry points and the plugins directory, then run registration.
        ``config``: its ``plugins_dir`` is used when ``plugins_dir`` is not given, and an
        error about it names the config file and line."""
        allow, block = _names(ENV_ALLOW), _names(ENV_BLOCK)
        if block and CORE_PLUGIN in block:
            raise PluginError(
                f"{ENV_BLOCK} names {CORE_PLUGIN!r}, which cannot be blocked: it runs every "
                "translate and enrich step"
            )
        directory = _plugins_directory(plugins_dir, config)
        seen: set[str] = set()

        def wanted(name: str, builtin: bool) -> bool:
            seen.add(name)
            if block and name in block:
                self.left_out[name] = ENV_BLOCK
                return False
            if builtin or allow is None or name in allow:
                return True
            self.left_out[name] = ENV_ALLOW
            return False

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
        for entry in installed_entry_points():
            if wanted(entry.name, False):
                self._add_entry_point(entry, strict=strict)
        if directory is not None:
            for path in sorted(directory.glob("*.py")):
                if path.name.startswith("_") or not wanted(path.stem, False):
                    continue
                self._add(
                    path.stem,
                    f"file {path}",
                    None,
                    lambda p=path: _import_file(p),
                    strict=strict,
                    home=(str(path),),
                )
        self.unmatched = sorted((allow or set()) - seen)
        if self.unmatched:
            log.warning(
                "%s names %s, which %s no installed plugin or plugins-directory file",
                ENV_ALLOW,
                ", ".join(repr(name) for name in self.unmatched),
                "matches" if len(self.unmatched) == 1 else "match",
            )
        self._check_hooks()
        self._register_all(strict)
        return self

    def add_plugin(self, plugin: Any, name: str, *, source: str = "code") -> None:
        """Register an already-imported plugin object (tests and embedding use this)."""
        self._add(name, source, None, lambda: plugin, strict=True)
        try:
            self._check_hooks()
        except PluginError:
            self.pm.unregister(plugin)
            self.plugins.pop(name, None)
            raise

    def _add_entry_point(self, entry: importlib.metadata.EntryPoint, *, strict: bool) -> None:
        """Load one installed entry point. Python imports a module once per process, so once
        a newer version is installed a route reload gets the code imported at start again:
        a WARNING says so, with both versions, since only a restart runs the new one."""
        dist = entry.dist
        installed = dist.version if dist else None
        named_by = "entry point" + (f" in the distribution {dist.name}" if dist else "")
        imported_before = entry.module in sys.modules
        self._add(
            entry.name,
            "entry point",
            installed,
            entry.load,
            strict=strict,
            named_by=named_by,
            provided_by=f"{dist.name} {dist.version}" if dist else None,
            home=_package_home(entry.module),
        )
        if dist is None or installed is None:
            return
        if not imported_before and entry.module in sys.modules:
            _imported_versions[entry.module] = installed
        running = _imported_versions.get(entry.module, installed)
        info = self.plugins.get(entry.name)
        if info is None or running == installed:
            return
        info.version = running  # the code that runs is the one imported at start
        log.warning(
            "plugin %r (entry point of %s): version %s is installed, but this process still "
            "runs version %s, imported when it started (a reload does not import installed "
            "packages again): restart carehub serve / carehub worker to run %s",
            entry.name,
            dist.name,
            installed,
            running,
            installed,
        )

    def _add(
        self,
        name: str,
        source: str,
        version: str | None,
        loader: Callable[[], Any],
        *,
        strict: bool,
        named_by: str | None = None,
        provided_by: str | None = None,
        home: tuple[str, ...] = (),
    ) -> None:
        """Import and register one plugin. ``named_by``: what gives it its name (to rename on
        a clash), by default what its source says; ``provided_by``: the distribution of an
        entry point, which its load errors name; ``home``: where its own code lives (see
        _failure_site)."""
        self._step_runner = None
        origin = _origin(source, provided_by)
        try:
            _check_plugin_name(name, source, self.plugins, named_by or _what_names(source))
            plugin = loader()
            self._check_implementations(name, plugin)
            self.pm.register(plugin, name=name)
        except Exception as err:
            if strict:
                raise PluginError(f"plugin {name!r} ({origin}) failed to load: {err}") from err
            if isinstance(err, PluginError):
                self._failed(name, origin, str(err), getattr(err, "at", None))
            else:
                log.debug("plugin %r (%s): import traceback", name, origin, exc_info=err)
                self._failed(name, origin, f"{type(err).__name__}: {err}", _failure_site(err, home))
            return
        module = plugin if isinstance(plugin, ModuleType) else None
        hooks = [impl.name for impl in self.pm.get_hookcallers(plugin) or []]
        info = PluginInfo(
            name, source, version, module, hooks=sorted(hooks), provided_by=provided_by
        )
        if not hooks and source not in ("builtin", "code"):
            named = source == "entry point"
            info.warning = (
                "implements no carehub hook (no @hookimpl function), so it adds nothing"
                + ("; does the entry point name the module that holds them?" if named else "")
            )
            log.warning("plugin %r (%s) %s", name, source, info.warning)
        self.plugins[name] = info

    def _failed(self, name: str, source: str, error: str, at: str | None = None) -> None:
        """Record and log a plugin that is skipped, on one line whatever the error's text
        (pluggy's span several); ``at`` (FILE:LINE of the code that raised) is code, not
        data, so the one-line summary may carry it."""
        error = "; ".join(line.strip() for line in error.splitlines() if line.strip())
        where = f" (at {at})" if at else ""
        log.error("plugin %r (%s) failed to load and is skipped: %s%s", name, source, error, where)
        self.failures.append(LoadFailure(name, source, error, at))

    def _check_implementations(self, name: str, plugin: Any) -> None:
        """Refuse a hook implementation that could never work, naming the plugin, the hook
        and where the implementation is, before pluggy registers it: an ``async def`` one
        (carehub calls hooks without awaiting them, so its body would never run) and one
        declaring an argument the hook does not pass (pluggy's refusal points into pluggy
        and spans several lines)."""
        for attribute in dir(plugin):
            options = self.pm.parse_hookimpl_opts(plugin, attribute)
            if options is None:
                continue
            function = getattr(plugin, attribute)
            hook_name = options.get("specname") or attribute
            at = _definition_site(function)
            if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
                raise HookImplementationError(
                    f"plugin {name!r}: {hook_name} must not be 'async def': carehub calls "
                    "hooks without awaiting them, so its body would never run (make it a "
                    "plain def; hand slow work to a thread or queue of your own)",
                    at,
                )
            caller = getattr(self.pm.hook, hook_name, None)
            spec = caller.spec if caller is not None else None
            if spec is None:
                if options.get("optionalhook"):
                    continue  # a hook of a newer carehub: never called here, by request
                close = difflib.get_close_matches(hook_name, _hook_names(), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise HookImplementationError(
                    f"plugin {name!r}: implements a hook that does not exist: {hook_name}"
                    f"{hint} (a hook only newer carehub versions have is implemented with "
                    "@hookimpl(optionalhook=True))",
                    at,
                )
            if (
                hook_name == "carehub_run_step"
                and name != CORE_PLUGIN
                and not (options.get("wrapper") or options.get("hookwrapper"))
            ):
                raise HookImplementationError(
                    f"plugin {name!r}: carehub_run_step must be @hookimpl(wrapper=True) (a "
                    "generator that yields to the step): a plain implementation's return "
                    "value would replace the output of every translate and enrich step",
                    at,
                )
            declared = pluggy.HookImpl(plugin, name, function, options).argnames
            unknown = [a for a in declared if a not in (*spec.argnames, *spec.kwargnames)]
            if unknown:
                raise HookImplementationError(
                    f"plugin {name!r}: {hook_name}({', '.join(declared)}) declares "
                    f"{', '.join(repr(a) for a in unknown)}, which the hook does not pass "
                    f"(its arguments: {', '.join(spec.argnames)})",
                    at,
                )

    def _check_hooks(self) -> None:
        """A ``carehub_*`` hookimpl that matches no hook is a misspelling: raise PluginError
        naming the plugin (as `carehub plugins` shows it) and the hook, rather than leaving
        it silently never called."""
        for hook_name in list(vars(self.pm.hook)):
            if hook_name.startswith("_"):
                continue
            caller = getattr(self.pm.hook, hook_name)
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                info = self.plugins.get(name)
                where = f" ({info.source})" if info else ""
                close = difflib.get_close_matches(hook_name, _hook_names(), n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise PluginError(
                    f"plugin {name!r}{where} implements a hook that does not exist: "
                    f"{hook_name}{hint}"
                )

    # -- registration ---------------------------------------------------------------------
    def _register_all(self, strict: bool) -> None:
        hook = self.pm.hook
        for hook_name, registry, base in (
            ("carehub_register_translators", self.translators, Translator),
            ("carehub_register_enrichers", self.enrichers, Enricher),
            ("carehub_register_channels", self.channels, Channel),
        ):
            for impl in getattr(hook, hook_name).get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or "?"
                register = self._registrar(plugin_name, registry, base)
                self._run_registration(plugin_name, hook_name, impl, register, strict)
        for impl in hook.carehub_register_commands.get_hookimpls():
            plugin_name = self.pm.get_name(impl.plugin) or "?"
            commands: list[click.Command] = []
            hook_name = "carehub_register_commands"
            if self._run_registration(plugin_name, hook_name, impl, commands.append, strict):
                self.commands.extend(commands)

    def _run_registration(
        self,
        plugin_name: str,
        hook_name: str,
        impl: pluggy.HookImpl,
        register: Callable[[Any], None],
        strict: bool,
    ) -> bool:
        """Call one plugin's registration hook; False when the plugin was dropped for it.

        A hook that raises (a lazy import of an optional dependency that is not installed,
        a component that breaks the contract) takes its own plugin out, not every command of
        carehub: the other plugins load and the failure is listed with the import failures."""
        at: str | None = None
        try:
            impl.function(register=register)
            return True
        except InvalidComponentError as err:
            error = str(err)
            failure: Exception = err
        except Exception as err:
            error = f"{hook_name} raised {type(err).__name__}: {err}"
            failure, at = err, _failure_site(err, _home_of(impl.plugin))
        info = self.plugins.get(plugin_name)
        if strict or info is None or info.source == "builtin":
            if isinstance(failure, PluginError):
                raise failure
            raise PluginError(f"plugin {plugin_name!r}: {error}") from failure
        log.debug("plugin %r: %s traceback", plugin_name, hook_name, exc_info=failure)
        self._drop(plugin_name, info.origin, error, at)
        return False

    def _drop(self, plugin_name: str, source: str, error: str, at: str | None = None) -> None:
        """Take a plugin back out, with every component it registered so far, and record it
        as failing to load: half a plugin is worse than none."""
        registries: dict[str, dict[str, Any]] = {
            Translator.kind: self.translators,
            Enricher.kind: self.enrichers,
            Channel.kind: self.channels,
        }
        for key, owner in list(self._owner.items()):
            if owner == plugin_name:
                del self._owner[key]
                registries[key[0]].pop(key[1], None)
        self.plugins.pop(plugin_name, None)
        if self.pm.has_plugin(plugin_name):
            self.pm.unregister(name=plugin_name)
        self._step_runner = None
        self._failed(plugin_name, source, error, at)

    def _registrar(
        self, plugin_name: str, registry: dict[str, Any], base: type[Component]
    ) -> Callable[[type[Component]], None]:
        def register(component: type[Component]) -> None:
            """Check one component and add it; InvalidComponentError (the plugin is skipped,
            or with strict loading, the load fails) when it breaks the contract."""
            if not (isinstance(component, type) and issubclass(component, base)):
                raise InvalidComponentError(
                    f"plugin {plugin_name!r} registered {component!r}, which is not a "
                    f"{base.__name__} subclass"
                )
            if not component.name:
                raise ComponentNameError(
                    f"plugin {plugin_name!r}: {base.kind} {component.__name__} has no name "
                    "(set the class attribute `name`, the word routes use)"
                )
            _check_options_model(plugin_name, base.kind, component)
            _check_reserved(plugin_name, base.kind, component)
            _check_methods(plugin_name, base.kind, component)
            key = (base.kind, component.name)
            owner = self._owner.get(key)
            if owner == plugin_name:
                raise ComponentNameError(
                    f"plugin {plugin_name!r} registers two {base.kind}s named "
                    f"{component.name!r}; give each its own name"
                )
            if owner is not None:
                raise ComponentNameError(
                    f"two plugins register a {base.kind} named {component.name!r}: "
                    f"{owner!r} and {plugin_name!r}; {owner!r} keeps it: rename the one in "
                    f"{plugin_name!r}"
                )
            self._owner[key] = plugin_name
            registry[component.name] = component
            info = self.plugins.get(plugin_name)
            if info is not None:
                info.components.append(f"{base.kind} {component.name}")
                info.details.append(ComponentInfo.of(component))

        return register

    def owner(self, kind: str, name: str) -> str | None:
        """The plugin that registered the ``kind`` ("channel", ...) called ``name``."""
        return self._owner.get((kind, name))

    def missing_note(self) -> str:
        """What to add to a "no channel named ..." error: the plugins the allow or block list
        left out and those that failed to load, since the component may be in one of them."""
        notes = []
        for variable in (ENV_ALLOW, ENV_BLOCK):
            names = sorted(n for n, v in self.left_out.items() if v == variable)
            if names:
                notes.append(f"left out by {variable}: {', '.join(names)}")
        if self.failures:
            notes.append(f"failed to load: {', '.join(f.name for f in self.failures)}")
        return "".join(f"; {note}" for note in notes)

    # -- per-message observers ------------------------------------------------------------
    def observed(self, hook_name: str) -> bool:
        """Whether any plugin implements an observer hook (so its arguments are worth making)."""
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook on every plugin; a plugin that raises (SystemExit and
        KeyboardInterrupt of its own included) is logged and skipped, and one that takes
        SLOW_OBSERVER seconds or more is named in a WARNING (see _observer_slow): observers
        run where messages are acknowledged, so a slow one delays every ACK."""
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            started = time.perf_counter()
            try:
                # Like pluggy itself, pass only the arguments the implementation declares.
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except (Exception, SystemExit, KeyboardInterrupt) as err:
                if not isinstance(err, Exception) and not raised_by_plugin(err):
                    raise
                self._observer_failed(self.pm.get_name(impl.plugin) or "?", hook_name, err)
            took = time.perf_counter() - started
            if took >= SLOW_OBSERVER:
                self._observer_slow(self.pm.get_name(impl.plugin) or "?", hook_name, took)

    def _observer_slow(self, plugin_name: str, hook_name: str, took: float) -> None:
        """WARNING that one plugin's observer hook took ``took`` seconds, at most once every
        SLOW_OBSERVER_EVERY seconds per plugin and hook (with how many slow calls meanwhile),
        so an observer slow on every message is one line, not one per message."""
        now = time.monotonic()
        with self._observer_lock:
            last, count = self._observer_slow_logged.get((plugin_name, hook_name), (None, 0))
            count += 1
            if last is not None and now - last < SLOW_OBSERVER_EVERY:
                self._observer_slow_logged[(plugin_name, hook_name)] = (last, count)
                return
            self._observer_slow_logged[(plugin_name, hook_name)] = (now, 0)
        log.warning(
            "%s of plugin %r took %.2f s (%d slow call(s) since the last report; observers "
            "should take well under %g s): it runs for every message and holds up the hub's "
            "work, acknowledgments included, while it runs; hand slow work to a thread or "
            "queue of its own (said at most every %d s)",
            hook_name,
            plugin_name,
            took,
            count,
            SLOW_OBSERVER,
            SLOW_OBSERVER_EVERY,
        )

    def _observer_failed(self, plugin_name: str, hook_name: str, err: BaseException) -> None:
        """Log an observer that raised as a run per plugin and hook: at ERROR the first time,
        then at most once an OBSERVER_REPORT_SECONDS with how many failed meanwhile, so one
        that fails on every message cannot flood the log. The log names the exception's type
        only: its text can quote the message (a patient's name); the traceback is at DEBUG."""
        log.debug("%s of plugin %r raised", hook_name, plugin_name, exc_info=err)
        with self._observer_lock:
            run = self._observer_runs.get((plugin_name, hook_name))
            if run is None:
                # Imported here: the store package brings SQLAlchemy, which `carehub plugins`
                # and the plugin commands otherwise do without.
                from carehub.store.failure_run import FailureRun

                run = self._observer_runs[(plugin_name, hook_name)] = FailureRun(
                    f"{hook_name} of plugin {plugin_name!r}",
                    "ignored; the message goes on and the other observers are still called",
                    "call(s)",
                    report_every=OBSERVER_REPORT_SECONDS,
                    logger=log,
                    traceback=False,
                )
            run.failed(FailureKind(type(err).__name__))

    def run_step(self, work: Any, step: str, run: Callable[[], Any]) -> Any:
        """Run one route step through the carehub_run_step wrappers (tracing, timing).
        carehub_run_step is a firstresult hook: with nothing but wrappers implementing it,
        pluggy would return None and every step would "succeed" without running."""
        if self._step_runner is None:
            self._step_runner = any(
                not (impl.wrapper or impl.hookwrapper)
                for impl in self.pm.hook.carehub_run_step.get_hookimpls()
            )
        if not self._step_runner:
            raise PluginError(
                f"no plugin runs route steps (carehub_run_step): {CORE_PLUGIN!r} is not loaded"
            )
        try:
            return self.pm.hook.carehub_run_step(work=work, step=step, run=run)
        except (SystemExit, KeyboardInterrupt) as err:
            if not raised_by_plugin(err):
                raise
            raise self.ended_inside(err, f"step {step}", self._step_owner(step)) from err

    def _step_owner(self, step: str) -> str | None:
        """The plugin whose component a step label (``translate NAME``) names, if known."""
        verb, _, component = step.partition(" ")
        kind = {"translate": Translator.kind, "enrich": Enricher.kind}.get(verb)
        return self.owner(kind, component) if kind else None

    def ended_inside(self, err: BaseException, what: str, plugin: str | None) -> PluginExit:
        """The PluginExit, logged at ERROR naming ``what`` (``send() of channel 'x'``, ``step
        translate y``) and its plugin, for a SystemExit or KeyboardInterrupt a plugin's own
        code raised (a vendor library calling sys.exit()): an Exception, so the caller
        takes it as that attempt or step failing, and the hub goes on. The stop of the
        process comes from SIGTERM and SIGINT, which the hub's event loop handles itself."""
        code = f"({err.code!r})" if isinstance(err, SystemExit) and err.code is not None else ""
        raised = f"{type(err).__name__}{code}"
        owner = f" (plugin {plugin!r})" if plugin else ""
        log.error(
            "%s%s raised %s, which would end the process: taken as a failure of this %s; "
            "carehub goes on",
            what,
            owner,
            raised,
            "send" if what.startswith("send()") else "step",
        )
        return PluginExit(f"{what}{owner} raised {raised}")


class PluginExit(PluginError):
    """A plugin's code raised SystemExit or KeyboardInterrupt: a failure of what it was
    doing (a send, a step), never the end of the hub (see PluginHost.ended_inside)."""


def raised_by_plugin(err: BaseException) -> bool:
    """Whether a SystemExit or KeyboardInterrupt comes from code that was called (a plugin,
    a library it uses) rather than from the process being told to stop. A KeyboardInterrupt
    in the main thread is Ctrl-C (Python's own handler, or asyncio.run's, which raises it in
    the main task) unless an event loop takes SIGINT itself: serve and worker do
    (loop.add_signal_handler, which leaves Python's handler a no-op), so there it never is."""
    if not isinstance(err, KeyboardInterrupt):
        return True
    if threading.current_thread() is not threading.main_thread():
        return True
    return getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_sighandler_noop"


class FailureKind(Exception):
    """A plugin's failure told by its exception's type alone, for the log: the exception's
    own text can quote the message it was handling."""


#: Code a plugin's failure is never pointed at: the standard library, installed packages
#: (pluggy, a client library the plugin calls) and carehub itself.
_NOT_THE_PLUGINS = tuple(
    {
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        str(Path(__file__).parent) + os.sep,
    }
)

#: The version of each entry point's distribution whose module this process imported
#: (module name -> version): importing it again returns that code, whatever is installed.
_imported_versions: dict[str, str] = {}


def _origin(source: str, provided_by: str | None) -> str:
    """A plugin's source as its load errors name it: an entry point with its distribution
    (``entry point of carehub-acme 1.0.0``), so the operator knows which package to fix."""
    return f"{source} of {provided_by}" if provided_by else source


def _failure_site(err: BaseException, home: tuple[str, ...] = ()) -> str | None:
    """FILE:LINE where a plugin's import or hook failed: a SyntaxError's own place, else the
    innermost frame in the plugin's own code (``home``, its file or package folder, which
    may be among the installed packages) or in any other code that is not the import
    machinery, the standard library, an installed package or carehub; None when there is
    none (a module that does not exist)."""
    if isinstance(err, SyntaxError) and err.filename and err.lineno:
        return f"{err.filename}:{err.lineno}"
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = frame.filename
        the_plugins = name.startswith(home)
        someone_elses = name.startswith("<") or name.startswith(_NOT_THE_PLUGINS)
        if the_plugins or not someone_elses:
            return f"{name}:{frame.lineno}"
    return None


def _definition_site(function: Callable[..., Any]) -> str | None:
    """FILE:LINE where a function is defined (its first decorator's line), if known."""
    code = getattr(inspect.unwrap(getattr(function, "__func__", function)), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None


def _package_home(module_name: str) -> tuple[str, ...]:
    """Where the top-level package of ``module_name`` lives (its folder, or its one file),
    found without importing it; empty when it cannot be found."""
    try:
        spec = importlib.util.find_spec(module_name.partition(".")[0])
    except (ImportError, ValueError):
        return ()
    if spec is None:
        return ()
    if spec.submodule_search_locations:
        return tuple(os.path.join(folder, "") for folder in spec.submodule_search_locations)
    return (spec.origin,) if spec.origin else ()


def _home_of(plugin: Any) -> tuple[str, ...]:
    """Where a registered plugin's own code lives (see _package_home)."""
    module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
    return _package_home(module)


def _hook_names() -> list[str]:
    return [name for name in vars(hookspecs) if name.startswith("carehub_")]


def _check_plugin_name(
    name: str, source: str, loaded: dict[str, PluginInfo], named_by: str
) -> None:
    """Refuse a plugin name that is a built-in's or another plugin's, with the rule, rather
    than pluggy's "already registered" and its dump of every plugin."""
    if source != "builtin" and name.startswith(BUILTIN_PREFIX):
        raise PluginError(
            f"the plugin name {name!r} is reserved: names starting {BUILTIN_PREFIX!r} belong to "
            f"carehub's built-ins; rename the {named_by}"
        )
    if name in loaded:
        raise PluginError(
            f"the plugin name {name!r} is already used by the plugin from "
            f"{loaded[name].source}; rename the {named_by}"
        )


def _what_names(source: str) -> str:
    """What gives a plugin from ``source`` its name, for a rename hint."""
    if source.startswith("file "):
        return source
    return "entry point" if source == "entry point" else "plugin"


def _check_options_model(plugin_name: str, kind: str, component: type[Component]) -> None:
    """Refuse an Options model that would let a misspelt option key through: carehub promises
    route authors that an unknown key stops the hub, which only ComponentOptions (extra keys
    forbidden) keeps."""
    options = component.Options
    where = f"plugin {plugin_name!r}: {kind} {component.name!r} ({component.__name__}.Options)"
    if not (isinstance(options, type) and issubclass(options, ComponentOptions)):
        raise InvalidComponentError(
            f"{where} is not a carehub.components.ComponentOptions subclass, so a misspelt "
            "option key in a route would be ignored; subclass ComponentOptions"
        )
    if options.model_config.get("extra") != "forbid":
        raise InvalidComponentError(
            f"{where} lets unknown keys through (model_config extra="
            f"{options.model_config.get('extra')!r}), so a misspelt option key in a route "
            "would be ignored; keep ComponentOptions' extra='forbid'"
        )


def _check_methods(plugin_name: str, kind: str, component: type[Component]) -> None:
    """Refuse a method of the wrong kind for how carehub calls it (see AWAITED_METHODS)."""
    where = f"plugin {plugin_name!r}: {kind} {component.name!r} ({component.__name__})"
    for method in AWAITED_METHODS.get(kind, ()):
        if not inspect.iscoroutinefunction(getattr(component, method, None)):
            raise InvalidComponentError(
                f"{where}: {method}() must be 'async def': carehub awaits it on the worker's "
                "event loop (use async I/O in it)"
            )
    for method in CALLED_METHODS.get(kind, ()):
        if inspect.iscoroutinefunction(getattr(component, method, None)):
            raise InvalidComponentError(
                f"{where}: {method}() must not be 'async def': carehub calls it and uses "
                "what it returns without awaiting it (do async work in start())"
            )


def _check_reserved(plugin_name: str, kind: str, component: type[Component]) -> None:
    """Refuse an Options field (or alias) named after a step key carehub reads itself: the
    route's value would never reach it, and the error the author would see names the wrong
    thing (``forward.name: Field required`` however the route spells it)."""
    reserved = RESERVED_OPTION_KEYS.get(kind, frozenset())
    step = {"translator": "translate", "enricher": "enrich", "channel": "forward"}.get(kind, kind)
    for key, spec in component.Options.model_fields.items():
        for spelled in (key, spec.alias, spec.validation_alias):
            if isinstance(spelled, str) and spelled in reserved:
                raise ReservedOptionError(
                    f"plugin {plugin_name!r}: {kind} {component.name!r} "
                    f"({component.__name__}.Options) declares {spelled!r}, which carehub reads "
                    f"itself from a route's {step}: step; rename the option"
                )


def _plugins_directory(plugins_dir: Path | None, config: HubConfig | None) -> Path | None:
    """The plugins directory to load, from the argument, the config or CAREHUB_PLUGINS_DIR;
    one set to something that is not a folder is a ConfigError naming the setting, since a
    misspelt folder would otherwise only show as "no enricher named ..." later."""
    setting = "plugins_dir"
    if plugins_dir is None and config is not None and config.plugins_dir is not None:
        plugins_dir = config.plugins_dir
        from carehub.config import where_in_config

        setting = where_in_config(config, "plugins_dir")
    if plugins_dir is None:
        value = os.environ.get(ENV_PLUGINS_DIR)
        if not value:
            return None
        plugins_dir, setting = Path(value), f"{ENV_PLUGINS_DIR}={value}"
    if not plugins_dir.is_dir():
        what = "is not a folder" if plugins_dir.exists() else "does not exist"
        raise ConfigError(f"{setting}: the plugins folder {plugins_dir.absolute()} {what}")
    return plugins_dir


def _import_file(path: Path) -> ModuleType:
    module_name = f"carehub_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
