"""``conceptctl plugins`` and ``conceptctl backbones``: what is installed, loading no model."""

from __future__ import annotations

import os
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from conceptctl.cli import COMMAND_OWNERS, console, options


def plugins(json_output: options.Json = False) -> None:
    """List loaded plugins, what each registers (commands included), and plugins that failed."""
    from conceptctl.plugins import ENV_PLUGINS, plugin_failures, plugin_infos
    from conceptctl.registry import KINDS, get_registry

    registered: dict[str, dict[str, list[str]]] = {}
    for kind in KINDS:
        for entry in get_registry(kind):
            registered.setdefault(entry.plugin, {}).setdefault(kind, []).append(entry.name)
    for command, plugin in sorted(COMMAND_OWNERS.items()):
        registered.setdefault(plugin, {}).setdefault("command", []).append(command)
    infos, failures = plugin_infos(), plugin_failures()

    if json_output:
        console.out.print_json(data={
            "plugins": [
                {"name": i.name, "package": i.package, "version": i.version, "builtin": i.builtin,
                 "registers": registered.get(i.name, {})}
                for i in infos
            ],
            "failed": [{"name": f.name, "error": f.error} for f in failures],
        })
        return
    table = Table(title="conceptctl plugins", title_justify="left")
    for column in ("plugin", "package", "version", "registers"):
        table.add_column(column)
    failed = {f.name for f in failures}
    for info in infos:
        what = registered.get(info.name, {})
        listed = escape("\n".join(f"{kind}: {', '.join(names)}" for kind, names in what.items()))
        # A loaded plugin can still have failed in a hook or had its commands refused.
        flag = ["[red]failed, see below[/]"] if info.name in failed else []
        table.add_row(escape(info.name), escape(info.package), info.version,
                      "\n".join([listed or "[dim]nothing[/]", *flag]))
    console.out.print(table)
    for failure in failures:
        console.err.print(f"[red]plugin {escape(failure.name)} failed:[/] "
                          f"{escape(failure.error)}")
    if failures:
        console.err.print(f"[dim]hint: fix or uninstall it, or choose the plugins to load with "
                          f"{ENV_PLUGINS}=name,name[/]")


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home) / "hub"


def _local_copy(name: str, source: str | None, paths: dict[str, str]) -> str:
    """Where a usable copy is, judged from the file system alone (no hub call, no torch)."""
    if name in paths:
        return paths[name] if Path(paths[name]).exists() else f"missing: {paths[name]}"
    if source and "/" in source and not Path(source).exists():
        cached = _hf_cache_dir() / ("models--" + source.replace("/", "--"))
        return "hub cache" if cached.exists() else ""
    return source or ""


def backbones(json_output: options.Json = False) -> None:
    """List known backbone names with their properties and whether a local copy exists."""
    from conceptctl.registry import get_registry
    from conceptctl.settings import load_settings

    settings = load_settings()
    entries = list(get_registry("backbone"))
    rows = []
    for entry in entries:
        spec = entry.value
        rows.append(spec.properties() | {
            "plugin": entry.plugin,
            "default": spec.name == settings.default_backbone,
            "local_copy": _local_copy(spec.name, spec.source, settings.backbone_paths),
        })
    if json_output:
        console.out.print_json(data={"backbones": rows})
        return
    table = Table(title="known backbones (--backbone also takes a folder, a .safetensors file or "
                        "a hub id)", title_justify="left")
    for column in ("name", "source", "resolution", "prediction", "text width", "local copy"):
        table.add_column(column)
    for row in rows:
        name = row["name"] + (" (default)" if row["default"] else "")
        table.add_row(escape(name), escape(row["source"] or "(plugin loader)"),
                      str(row["resolution"] or "?"), row["prediction_type"] or "?",
                      str(row["text_width"] or "?"), escape(row["local_copy"]) or "[dim]none[/]")
    console.out.print(table)
