"""Plugin discovery and the registry's contract: names, duplicates, broken and misspelled."""

import json
import sys
import textwrap

import pytest

from conceptctl.backbones import BackboneSpec
from conceptctl.errors import PluginError, UnknownComponentError
from conceptctl.hookspecs import hookimpl
from conceptctl.plugins import plugin_failures, register_plugin, reset_plugins, unregister_plugin
from conceptctl.registry import get_registry


def install_fake_plugin(tmp_path, monkeypatch, name: str, source: str) -> None:
    """Make an importable module plus a dist-info with a conceptctl entry point, as pip would."""
    module = f"fake_{name.replace('-', '_')}"
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{module}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[conceptctl]\n{name} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, module, raising=False)
    reset_plugins()


GOOD = """
from conceptctl.backbones import BackboneSpec
from conceptctl.hookspecs import hookimpl

@hookimpl
def register_backbones(register):
    register(BackboneSpec(name="fake-good", source="org/fake-good"))
"""


def test_builtins_are_plugins(cli):
    data = json.loads(cli("plugins", "--json").out)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["builtin-backbones"]["registers"]["backbone"] == [
        "sd-1.4", "sd-1.5", "sd-2.1", "sd-2.1-base"]
    assert set(by_name["builtin-commands"]["registers"]["command"]) >= {
        "sample", "plugins", "backbones", "config"}
    assert all(p["builtin"] for p in by_name.values() if p["name"].startswith("builtin-"))


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, cli):
    install_fake_plugin(tmp_path, monkeypatch, "good", GOOD)
    assert "fake-good" in get_registry("backbone")
    assert get_registry("backbone").entry("fake-good").plugin == "good"
    data = json.loads(cli("plugins", "--json").out)
    good = next(p for p in data["plugins"] if p["name"] == "good")
    assert (good["package"], good["version"]) == ("fake_good", "1.2.3")
    assert good["registers"] == {"backbone": ["fake-good"]}


def test_env_variable_limits_third_party_plugins(tmp_path, monkeypatch):
    install_fake_plugin(tmp_path, monkeypatch, "good", GOOD)
    monkeypatch.setenv("CONCEPTCTL_PLUGINS", "")
    reset_plugins()
    assert "fake-good" not in get_registry("backbone")
    assert "sd-1.5" in get_registry("backbone")  # built-ins always load
    monkeypatch.setenv("CONCEPTCTL_PLUGINS", "good, other")
    reset_plugins()
    assert "fake-good" in get_registry("backbone")


def test_plugin_that_fails_to_import_is_reported_and_others_work(tmp_path, monkeypatch, cli):
    install_fake_plugin(tmp_path, monkeypatch, "good", GOOD)
    install_fake_plugin(tmp_path, monkeypatch, "broken", "import not_a_module_anywhere\n")
    assert "fake-good" in get_registry("backbone")
    failures = {f.name: f.error for f in plugin_failures()}
    assert "ModuleNotFoundError" in failures["broken"]
    result = cli("plugins")
    assert result.code == 0
    assert "plugin broken failed" in result.err
    assert "fake-good" in result.out


def test_plugin_whose_hook_raises_is_skipped_not_fatal():
    class Buggy:
        @hookimpl
        def register_backbones(self, register):
            register(BackboneSpec(name="half-done"))
            raise RuntimeError("boom")

    register_plugin(Buggy(), "buggy")
    try:
        registry = get_registry("backbone")
        assert "half-done" not in registry  # nothing from a plugin whose hook failed
        assert "sd-1.5" in registry
        assert any(f.name == "buggy" and "boom" in f.error for f in plugin_failures())
    finally:
        unregister_plugin("buggy")


def test_duplicate_name_names_both_plugins():
    class Clash:
        @hookimpl
        def register_backbones(self, register):
            register(BackboneSpec(name="sd-1.5", source="someone/else"))

    register_plugin(Clash(), "clash")
    try:
        with pytest.raises(PluginError, match="'sd-1.5'.*'builtin-backbones'.*'clash'"):
            get_registry("backbone")
    finally:
        unregister_plugin("clash")


def test_misspelled_hook_is_an_error_with_a_suggestion(tmp_path, monkeypatch, cli):
    install_fake_plugin(tmp_path, monkeypatch, "typo", """
        from conceptctl.hookspecs import hookimpl

        @hookimpl
        def register_backbone(register):
            pass
    """)
    result = cli("plugins")
    assert result.code == 1
    assert "'typo' implements 'register_backbone'" in result.err
    assert "did you mean 'register_backbones'" in result.err
    assert "CONCEPTCTL_PLUGINS" in result.err


def test_hook_with_unknown_argument_is_an_error():
    class WrongArgs:
        @hookimpl
        def register_backbones(self, register, colour):
            pass

    with pytest.raises(PluginError, match="'wrong-args' does not match"):
        register_plugin(WrongArgs(), "wrong-args")


@pytest.mark.parametrize("bad", ["Has Caps", "under_score", "", "-dash-first", None])
def test_component_names_must_be_kebab_case(bad):
    class BadName:
        @hookimpl
        def register_backbones(self, register):
            register(BackboneSpec(name=bad))

    register_plugin(BadName(), "bad-name")
    try:
        with pytest.raises(PluginError, match="kebab-case"):
            get_registry("backbone")
    finally:
        unregister_plugin("bad-name")


def test_unknown_component_lists_what_is_available():
    with pytest.raises(UnknownComponentError) as info:
        get_registry("backbone").get("sd-9")
    assert "sd-1.4, sd-1.5, sd-2.1, sd-2.1-base" in str(info.value)


def test_plugin_can_add_a_command(cli):
    class Hello:
        @hookimpl
        def register_commands(self, app):
            @app.command("hello")
            def hello(name: str = "world"):
                """Say hello."""
                print(f"hello {name}")

    register_plugin(Hello(), "hello-plugin")
    try:
        result = cli("hello", "--name", "erasure")
        assert (result.code, result.out.strip()) == (0, "hello erasure")
        data = json.loads(cli("plugins", "--json").out)
        hello = next(p for p in data["plugins"] if p["name"] == "hello-plugin")
        assert hello["registers"] == {"command": ["hello"]}
    finally:
        unregister_plugin("hello-plugin")
