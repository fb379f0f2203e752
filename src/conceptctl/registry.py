"""Turn ``register_*`` hook calls into name -> component maps.

Core code never branches on a component's name: it asks a registry. Each kind of component has
one hook; the registry calls every plugin's implementation with a ``register`` callable, checks
names (stable kebab-case, since they are written into artifacts) and refuses duplicates, naming
both plugins.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from conceptctl.errors import PluginError, UnknownComponentError
from conceptctl.plugins import call_each_plugin, registry_cache

T = TypeVar("T")

# kind -> the hook that registers it. Adding a kind is adding a hookspec and a line here.
KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "method": "register_methods",
    "discriminator": "register_discriminators",
    "gradient-surgery": "register_gradient_surgeries",
    "anchor-selector": "register_anchor_selectors",
    "detector": "register_detectors",
    "suite": "register_suites",
    "metric": "register_metrics",
    "attack": "register_attacks",
    "exporter": "register_exporters",
}

NAME_RE = re.compile(r"^[a-z0-9]+(?:[.-][a-z0-9]+)*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component and the plugin that registered it."""

    name: str
    value: T
    plugin: str


class Registry(Generic[T]):
    """Components of one kind by name, in registration order (built-ins first)."""

    def __init__(self, kind: str, entries: dict[str, Entry[T]]) -> None:
        self.kind = kind
        self._entries = entries

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, self.names()) from None

    def get(self, name: str) -> T:
        return self.entry(name).value


def _component_name(kind: str, item: Any, plugin: str) -> str:
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PluginError(
            f"plugin {plugin!r} registered a {kind} named {name!r}; names must be lower-case "
            "kebab-case like 'sd-1.5' or 'patchgan'",
        )
    return name


def _duplicate(kind: str, name: str, first: str, second: str) -> PluginError:
    return PluginError(
        f"{kind} {name!r} is registered twice: by plugin {first!r} and by plugin {second!r}",
        hint="rename one of them, or leave one plugin out with CONCEPTCTL_PLUGINS",
    )


def build_registry(kind: str) -> Registry[Any]:
    """Call every plugin's hook for ``kind`` and collect what they register."""
    pending: dict[str, dict[str, Entry[Any]]] = {}

    def register_for(plugin: str) -> dict:
        mine = pending.setdefault(plugin, {})

        def register(item: Any) -> None:
            name = _component_name(kind, item, plugin)
            if name in mine:
                raise _duplicate(kind, name, plugin, plugin)
            mine[name] = Entry(name, item, plugin)

        return {"register": register}

    entries: dict[str, Entry[Any]] = {}
    # Only a plugin whose hook finished contributes; a half-registered one contributes nothing.
    for plugin in call_each_plugin(KINDS[kind], register_for):
        for name, entry in pending[plugin].items():
            if name in entries:
                raise _duplicate(kind, name, entries[name].plugin, plugin)
            entries[name] = entry
    return Registry(kind, entries)


def get_registry(kind: str) -> Registry[Any]:
    """The registry for ``kind``, built once per process (and after plugins change)."""
    if kind not in KINDS:
        raise KeyError(f"unknown component kind {kind!r}; known: {', '.join(KINDS)}")
    cache = registry_cache()
    if kind not in cache:
        cache[kind] = build_registry(kind)
    return cache[kind]
