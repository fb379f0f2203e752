"""Plugin discovery and the registry's contract: names, duplicates, broken and misspelled."""

import json
import sys
import textwrap
from typing import Annotated

import pytest
import typer

from conceptctl.backbones import BackboneSpec
from conceptctl.errors import PluginError, UnknownComponentError
from conceptctl.hookspecs import hookimpl
from conceptctl.plugins import (
    plugin_failures,
    plugin_infos,
    register_plugin,
    reset_plugins,
    unregister_plugin,
)
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
        "sd-1.4", "sd-1.5", "sd-2.1", "sd-2.1-base", "sdxl-1.0"]
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
    # A name nothing provides (a typo, an uninstalled package) is reported, not ignored.
    failures = {f.name: f.error for f in plugin_failures()}
    assert "no installed package provides" in failures["other"]
    assert "good" not in failures


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


def assert_only_that_plugin_fails(cli, plugin: str) -> dict[str, str]:
    """How each reproduction below ends: built-in commands still work, ``conceptctl plugins``
    names the failed plugin, nothing prints a traceback. Returns failed plugin -> error."""
    shown = cli("config", "show")
    assert shown.code == 0, shown.err
    listed = cli("plugins")
    assert listed.code == 0, listed.err
    assert f"plugin {plugin} failed" in listed.err
    assert "CONCEPTCTL_PLUGINS" in listed.err  # the hint: how to leave it out
    for result in (shown, listed):
        assert "Traceback" not in result.out + result.err
    data = json.loads(cli("plugins", "--json").out)
    return {f["name"]: f["error"] for f in data["failed"]}


def test_plugin_that_calls_sys_exit_at_import_is_isolated(tmp_path, monkeypatch, cli):
    install_fake_plugin(tmp_path, monkeypatch, "good", GOOD)
    install_fake_plugin(tmp_path, monkeypatch, "quitter", "import sys\nsys.exit(3)\n")
    failed = assert_only_that_plugin_fails(cli, "quitter")
    assert failed["quitter"] == "SystemExit: 3"
    assert "fake-good" in get_registry("backbone")


@pytest.mark.parametrize("raised", ["SystemExit(4)", "GeneratorExit()", "Fatal('no way')"])
@pytest.mark.parametrize("hook", ["register_commands", "register_backbones"])
def test_hook_raising_a_base_exception_is_isolated(tmp_path, monkeypatch, cli, hook, raised):
    install_fake_plugin(tmp_path, monkeypatch, "fatal", f"""
        from conceptctl.backbones import BackboneSpec
        from conceptctl.hookspecs import hookimpl

        class Fatal(BaseException):
            pass

        @hookimpl
        def register_commands(app):
            app.command("half-added")(lambda: None)
            if {hook == "register_commands"}:
                raise {raised}

        @hookimpl
        def register_backbones(register):
            register(BackboneSpec(name="half-done"))
            if {hook == "register_backbones"}:
                raise {raised}
    """)
    assert cli("backbones").code == 0
    failed = assert_only_that_plugin_fails(cli, "fatal")
    assert failed["fatal"].startswith(f"{hook} raised {raised.split('(')[0]}")
    # Nothing from the failed hook is used.
    if hook == "register_commands":
        assert cli("half-added").code == 2
    else:
        assert "half-done" not in get_registry("backbone")


@pytest.mark.parametrize("where", ["import", "hook"])
def test_ctrl_c_in_a_plugin_still_aborts(tmp_path, monkeypatch, cli, where):
    source = ("raise KeyboardInterrupt\n" if where == "import" else
              "from conceptctl.hookspecs import hookimpl\n\n@hookimpl\n"
              "def register_commands(app):\n    raise KeyboardInterrupt\n")
    install_fake_plugin(tmp_path, monkeypatch, "slow", source)
    result = cli("config", "show")
    assert (result.code, result.err.strip()) == (130, "aborted")


SHADOWS = {
    "command": """
        @app.command("greet")
        def greet():
            print("hi")

        @app.command("erase")
        def erase():
            print("shadowed")
    """,
    "group": """
        import typer

        sub = typer.Typer()

        @sub.command("show")
        def show():
            print("shadowed")

        app.add_typer(sub, name="config")
    """,
    "unnamed group": """
        import typer

        sub = typer.Typer()

        @sub.command("erase")
        def erase():
            print("shadowed")

        app.add_typer(sub)
    """,
}


@pytest.mark.parametrize("how", list(SHADOWS))
def test_command_named_like_a_builtin_is_refused(tmp_path, monkeypatch, cli, how):
    body = textwrap.indent(textwrap.dedent(SHADOWS[how]), "    ")
    install_fake_plugin(tmp_path, monkeypatch, "shadow", "from conceptctl.hookspecs import "
                        f"hookimpl\n\n@hookimpl\ndef register_commands(app):\n{body}")
    failed = assert_only_that_plugin_fails(cli, "shadow")
    name = "config" if how == "group" else "erase"
    assert failed["shadow"] == (
        f"command {name!r} is registered twice: by plugin 'builtin-commands' and by plugin "
        "'shadow'; the commands of 'shadow' are left out")
    assert "--anchor" in cli("erase", "--help").out  # the built-in erase, not the plugin's
    assert cli("greet").code == 2  # none of the refused plugin's commands are added
    data = json.loads(cli("plugins", "--json").out)
    shadow = next(p for p in data["plugins"] if p["name"] == "shadow")
    assert shadow["registers"] == {}
    builtin = next(p for p in data["plugins"] if p["name"] == "builtin-commands")
    assert {"erase", "config"} <= set(builtin["registers"]["command"])


def test_command_clash_between_two_plugins_keeps_the_first(cli):
    class First:
        @hookimpl
        def register_commands(self, app):
            app.command("hello")(lambda: print("first"))

    class Second:
        @hookimpl
        def register_commands(self, app):
            app.command("hello")(lambda: print("second"))

    register_plugin(First(), "first")
    register_plugin(Second(), "second")
    try:
        assert cli("hello").out.strip() == "first"
        failed = assert_only_that_plugin_fails(cli, "second")
        assert "'hello' is registered twice: by plugin 'first' and by plugin 'second'" in (
            failed["second"])
    finally:
        unregister_plugin("second")
        unregister_plugin("first")


def test_plugin_that_removes_a_builtin_command_is_refused(cli):
    class Thief:
        @hookimpl
        def register_commands(self, app):
            app.registered_commands.clear()

    register_plugin(Thief(), "thief")
    try:
        failed = assert_only_that_plugin_fails(cli, "thief")
        assert failed["thief"].startswith("removed commands that other plugins registered")
    finally:
        unregister_plugin("thief")


def test_command_typer_cannot_build_disables_only_that_plugin(cli):
    class Unbuildable:
        @hookimpl
        def register_commands(self, app):
            @app.command("odd")
            def odd(value: Annotated[int, typer.Option(), typer.Option()] = 1):
                pass

    register_plugin(Unbuildable(), "unbuildable")
    try:
        failed = assert_only_that_plugin_fails(cli, "unbuildable")
        assert failed["unbuildable"].startswith(
            "added a command typer cannot build: MultipleTyperAnnotationsError")
    finally:
        unregister_plugin("unbuildable")


def test_misspelled_hook_disables_that_plugin_with_a_suggestion(tmp_path, monkeypatch, cli):
    install_fake_plugin(tmp_path, monkeypatch, "good", GOOD)
    install_fake_plugin(tmp_path, monkeypatch, "typo", """
        from conceptctl.backbones import BackboneSpec
        from conceptctl.hookspecs import hookimpl

        @hookimpl
        def register_backbone(register):
            pass

        @hookimpl
        def register_methods(register):
            raise AssertionError("a disabled plugin's hooks are never called")
    """)
    failed = assert_only_that_plugin_fails(cli, "typo")
    assert failed["typo"] == ("plugin 'typo' implements 'register_backbone', which is not a "
                              "conceptctl hook (did you mean 'register_backbones'?)")
    assert "typo" not in {info["name"] for info in json.loads(cli("plugins", "--json").out)[
        "plugins"]}
    assert "fake-good" in get_registry("backbone")
    assert "doco" in get_registry("method")


def test_hook_with_unknown_argument_disables_that_plugin(tmp_path, monkeypatch, cli):
    install_fake_plugin(tmp_path, monkeypatch, "wrong-args", """
        from conceptctl.hookspecs import hookimpl

        @hookimpl
        def register_commands(app, colour):
            pass
    """)
    failed = assert_only_that_plugin_fails(cli, "wrong-args")
    assert failed["wrong-args"].startswith("plugin 'wrong-args' does not match conceptctl's hooks")
    assert "colour" in failed["wrong-args"]


def test_hook_with_unknown_argument_is_an_error_in_process():
    class WrongArgs:
        @hookimpl
        def register_backbones(self, register, colour):
            pass

    class Fixed:
        @hookimpl
        def register_backbones(self, register):
            pass

    with pytest.raises(PluginError, match="'wrong-args' does not match"):
        register_plugin(WrongArgs(), "wrong-args")
    register_plugin(Fixed(), "wrong-args")  # nothing was left behind under that name
    unregister_plugin("wrong-args")


def test_misspelled_hook_is_an_error_in_process():
    class Typo:
        @hookimpl
        def register_metric(self, register):
            pass

    with pytest.raises(PluginError, match="did you mean 'register_metrics'"):
        register_plugin(Typo(), "typo")
    assert "typo" not in {info.name for info in plugin_infos()}


def test_plugin_registered_twice_is_an_error_in_process():
    class Twice:
        pass

    plugin = Twice()
    register_plugin(plugin, "twice")
    try:
        with pytest.raises(PluginError, match="'twice' has the name of a plugin that is already"):
            register_plugin(Twice(), "twice")
        with pytest.raises(PluginError, match="'again' is already loaded, as plugin 'twice'"):
            register_plugin(plugin, "again")
    finally:
        unregister_plugin("twice")


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
