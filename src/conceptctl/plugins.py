"""The plugin manager: built-in plugins, third-party entry points, and the switch that limits them.

Built-in components are default plugins registered exactly like third-party ones, so there is one
path for both. Third-party plugins arrive through the ``conceptctl`` entry-point group. The
``CONCEPTCTL_PLUGINS`` environment variable, when set, names the only third-party plugins to load
(comma-separated; empty loads none), which is how a user sidelines a broken plugin.
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


def _register(state: _State, plugin: object, info: PluginInfo) -> None:
    try:
        state.pm.register(plugin, name=info.name)
    except pluggy.PluginValidationError as err:
        # pluggy rejects a hookimpl whose arguments the spec does not offer.
        raise PluginError(
            f"plugin {info.name!r} does not match conceptctl's hooks: {err}",
            hint=f"fix the plugin, or leave it out with {ENV_PLUGINS}=<the plugins to keep>",
        ) from err
    state.infos[info.name] = info


def _check_hook_names(state: _State) -> None:
    """A misspelled hook would otherwise be silently ignored; name it and suggest the right one."""
    known = [name for name in dir(hookspecs) if name.startswith("register_")]
    for hook_name, caller in vars(state.pm.hook).items():
        if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            guess = difflib.get_close_matches(hook_name, known, n=1)
            did_you_mean = f" (did you mean {guess[0]!r}?)" if guess else ""
            raise PluginError(
                f"plugin {impl.plugin_name!r} implements {hook_name!r}, which is not a "
                f"conceptctl hook{did_you_mean}",
                hint=f"see docs/plugins.md for the hooks, or leave the plugin out with "
                f"{ENV_PLUGINS}=<the plugins to keep>",
            )


def _load_entry_points(state: _State) -> None:
    allowed = _allowed_third_party()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if ep.name in state.infos:
            other = state.infos[ep.name].package
            raise PluginError(f"two plugins are named {ep.name!r} (packages {other} and "
                              f"{ep.dist.name if ep.dist else '?'})")
        try:
            plugin = ep.load()
        except Exception as err:  # a broken plugin must not take the others down
            state.failures.append(PluginFailure(ep.name, f"{type(err).__name__}: {err}"))
            continue
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            package=dist.name if dist else ep.value,
            version=dist.version if dist else "?",
            builtin=False,
        )
        _register(state, plugin, info)


def _build_state() -> _State:
    from conceptctl import __version__

    pm = pluggy.PluginManager("conceptctl")
    pm.add_hookspecs(hookspecs)
    state = _State(pm=pm)
    for name, module in DEFAULT_PLUGINS:
        info = PluginInfo(name=name, package="conceptctl", version=__version__, builtin=True)
        _register(state, importlib.import_module(module), info)
    _load_entry_points(state)
    _check_hook_names(state)
    return state


def _get_state() -> _State:
    global _state
    if _state is None:
        _state = _build_state()
    return _state


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    return _get_state().pm


def plugin_infos() -> list[PluginInfo]:
    """Every loaded plugin, built-ins first."""
    return list(_get_state().infos.values())


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to import or to register; their components are missing."""
    return list(_get_state().failures)


def call_each_plugin(hook_name: str, kwargs_for: Callable[[str], dict]) -> Iterator[str]:
    """Call every implementation of ``hook_name`` in registration order (built-ins first).

    A generator: it yields each plugin's name right after that plugin's hook returned, so the
    caller can see what that one plugin did before the next runs. ``kwargs_for(plugin_name)``
    gives that plugin's arguments. A plugin whose hook raises is recorded as failed and skipped,
    so one buggy plugin cannot hide the others; :class:`PluginError` (a contract violation)
    still propagates.
    """
    state = _get_state()
    # get_hookimpls() lists in registration order (pluggy itself would call the last first).
    for impl in getattr(state.pm.hook, hook_name).get_hookimpls():
        kwargs = kwargs_for(impl.plugin_name)
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except PluginError:
            raise
        except Exception as err:
            failure = PluginFailure(impl.plugin_name,
                                    f"{hook_name} raised {type(err).__name__}: {err}")
            if failure not in state.failures:
                state.failures.append(failure)
            continue
        yield impl.plugin_name


def registry_cache() -> dict:
    """Per-process cache of registries built from the hooks (see :mod:`conceptctl.registry`)."""
    return _get_state().registries


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin object (tests, notebooks). Registries are rebuilt."""
    state = _get_state()
    _register(state, plugin, PluginInfo(name=name, package="(in process)", version="-",
                                        builtin=False))
    try:
        _check_hook_names(state)
    except PluginError:
        unregister_plugin(name)
        raise
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
