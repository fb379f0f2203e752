"""The plugin manager: built-in plugins, third-party entry points, and the switch that limits them.

Built-in components are default plugins registered exactly like third-party ones, so there is one
path for both. Third-party plugins arrive through the ``conceptctl`` entry-point group. The
``CONCEPTCTL_PLUGINS`` environment variable, when set, names the only third-party plugins to load
(comma-separated; empty loads none), which is how a user sidelines a broken plugin.

A third-party plugin that fails (to import, to match the hooks, or in a hook, even by calling
``sys.exit``) is recorded as a :class:`PluginFailure` and skipped; every other plugin and command
keeps working. Only Ctrl-C (``KeyboardInterrupt``) goes through.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pluggy

from conceptctl import hookspecs
from conceptctl.errors import PluginError

ENTRY_POINT_GROUP = "conceptctl"
ENV_PLUGINS = "CONCEPTCTL_PLUGINS"

# (plugin name, module) — every built-in component is registered through these.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("builtin-backbones", "conceptctl.default_plugins.backbones"),
    ("builtin-commands", "conceptctl.default_plugins.commands"),
    ("builtin-toy", "conceptctl.default_plugins.toy"),
    ("builtin-erasure", "conceptctl.default_plugins.erasure"),
    ("builtin-evaluation", "conceptctl.default_plugins.evaluation"),
    ("builtin-export", "conceptctl.default_plugins.export"),
)


@dataclass(frozen=True)
class PluginInfo:
    """What ``conceptctl plugins`` shows about one loaded plugin."""

    name: str
    package: str
    version: str
    builtin: bool


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used; the others still work."""

    name: str
    error: str


@dataclass
class _State:
    pm: pluggy.PluginManager
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    registries: dict = field(default_factory=dict)


_state: _State | None = None


def _allowed_third_party() -> set[str] | None:
    value = os.environ.get(ENV_PLUGINS)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _record(state: _State, name: str, error: str) -> None:
    failure = PluginFailure(name, error)
    if failure not in state.failures:  # hooks run again whenever a registry or the app is rebuilt
        state.failures.append(failure)


def _describe(err: BaseException) -> str:
    """``Type: message`` in one line (``sys.exit()`` has no message)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unknown_hook(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """A misspelled hook would otherwise be silently ignored; name it and suggest the right one."""
    known = [name for name in dir(hookspecs) if name.startswith("register_")]
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.has_spec():
            continue
        guess = difflib.get_close_matches(caller.name, known, n=1)
        did_you_mean = f" (did you mean {guess[0]!r}?)" if guess else ""
        return f"implements {caller.name!r}, which is not a conceptctl hook{did_you_mean}"
    return None


def _register(state: _State, plugin: object, info: PluginInfo) -> None:
    """Register one plugin, or raise PluginError and leave the manager as it was."""
    try:
        state.pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as err:
        # pluggy rejects a hookimpl whose arguments the spec does not offer (before registering).
        problem = f"does not match conceptctl's hooks: {' '.join(str(err).split())}"
    except ValueError:  # pluggy refuses a taken name, or one module behind two names
        other = state.pm.get_name(plugin)
        problem = (f"is already loaded, as plugin {other!r}" if other
                   else "has the name of a plugin that is already loaded")
    else:
        problem = _unknown_hook(state.pm, plugin)
        if problem:
            state.pm.unregister(name=info.name)
    if problem:
        raise PluginError(
            f"plugin {info.name!r} {problem}",
            hint=f"see docs/plugins.md for the hooks, or leave the plugin out with "
            f"{ENV_PLUGINS}=<the plugins to keep>",
        )
    state.infos[info.name] = info


def _load_entry_points(state: _State) -> None:
    """Import and register each allowed entry point; one that fails is recorded and skipped."""
    allowed = _allowed_third_party()
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for name in sorted((allowed or set()) - {ep.name for ep in points}):
        _record(state, name, f"{ENV_PLUGINS} names it, but no installed package provides a "
                             "conceptctl plugin of that name")
    for ep in points:
        if allowed is not None and ep.name not in allowed:
            continue
        package = ep.dist.name if ep.dist else ep.value
        if ep.name in state.infos:
            _record(state, ep.name, f"two plugins are named {ep.name!r} (packages "
                                    f"{state.infos[ep.name].package} and {package}); "
                                    f"the one from {package} is left out")
            continue
        try:
            plugin = ep.load()
        except KeyboardInterrupt:  # the user pressed Ctrl-C: stop, as everywhere else
            raise
        except BaseException as err:  # even sys.exit at import must not take the others down
            _record(state, ep.name, _describe(err))
            continue
        version = ep.dist.version if ep.dist else "?"
        try:
            _register(state, plugin, PluginInfo(ep.name, package, version, builtin=False))
        except PluginError as err:  # a misspelled hook or a wrong signature disables this one
            _record(state, ep.name, err.message)


def _build_state() -> _State:
    from conceptctl import __version__

    pm = pluggy.PluginManager("conceptctl")
    pm.add_hookspecs(hookspecs)
    state = _State(pm=pm)
    for name, module in DEFAULT_PLUGINS:
        info = PluginInfo(name=name, package="conceptctl", version=__version__, builtin=True)
        _register(state, importlib.import_module(module), info)
    _load_entry_points(state)
    return state


def _get_state() -> _State:
    global _state
    if _state is None:
        _state = _build_state()
    return _state


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin, built-ins first."""
    return list(_get_state().infos.values())


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to import, register or run a hook; what they offered is missing."""
    return list(_get_state().failures)


def record_failure(name: str, error: str) -> None:
    """Record that plugin ``name`` could not be (fully) used; ``conceptctl plugins`` shows it."""
    _record(_get_state(), name, error)


def call_each_plugin(hook_name: str, kwargs_for: Callable[[str], dict]) -> Iterator[str]:
    """Call every implementation of ``hook_name`` in registration order (built-ins first).

    A generator: it yields each plugin's name right after that plugin's hook returned, so the
    caller can see what that one plugin did before the next runs. ``kwargs_for(plugin_name)``
    gives that plugin's arguments. A plugin whose hook raises anything, ``SystemExit`` included,
    is recorded as failed and skipped, so one buggy plugin cannot hide the others or end the
    process; :class:`PluginError` (a contract violation) and ``KeyboardInterrupt`` (the user
    pressed Ctrl-C) still propagate.
    """
    state = _get_state()
    # get_hookimpls() lists in registration order (pluggy itself would call the last first).
    for impl in getattr(state.pm.hook, hook_name).get_hookimpls():
        kwargs = kwargs_for(impl.plugin_name)
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except (PluginError, KeyboardInterrupt):
            raise
        except BaseException as err:  # closing this generator raises at the yield, not here
            _record(state, impl.plugin_name, f"{hook_name} raised {_describe(err)}")
            continue
        yield impl.plugin_name


def registry_cache() -> dict:
    """Per-process cache of registries built from the hooks (see :mod:`conceptctl.registry`)."""
    return _get_state().registries


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin object (tests, notebooks). Registries are rebuilt."""
    state = _get_state()
    # A misspelled hook or a wrong signature raises PluginError to the caller (nothing is
    # registered then); installed plugins get the same check but are only recorded as failed.
    _register(state, plugin, PluginInfo(name=name, package="(in process)", version="-",
                                        builtin=False))
    state.registries.clear()


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    state = _get_state()
    state.pm.unregister(name=name)
    state.infos.pop(name, None)
    state.registries.clear()


def reset_plugins() -> None:
    """Forget every loaded plugin; the next call loads them again (tests, env changes)."""
    global _state
    _state = None
