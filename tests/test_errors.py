"""The single error boundary: known errors are one line, bugs point at CONCEPTCTL_DEBUG."""

import pytest

from conceptctl.cli import main
from conceptctl.hookspecs import hookimpl
from conceptctl.plugins import register_plugin, unregister_plugin


@pytest.fixture
def crashing_command():
    class Crash:
        @hookimpl
        def register_commands(self, app):
            @app.command("crash")
            def crash():
                raise RuntimeError("something broke\nover two lines")

    register_plugin(Crash(), "crash")
    yield
    unregister_plugin("crash")


def test_unexpected_error_is_one_line_and_exit_1(cli, crashing_command):
    result = cli("crash")
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert lines[0] == "error: unexpected RuntimeError: something broke over two lines"
    assert "CONCEPTCTL_DEBUG=1" in lines[1]
    assert len(lines) == 2


def test_debug_variable_shows_the_traceback(crashing_command, monkeypatch):
    monkeypatch.setenv("CONCEPTCTL_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["crash"])


def test_unknown_command_and_option(cli):
    result = cli("erase-everything")
    assert result.code == 2 and "No such command" in result.err
    result = cli("sample", "--colour", "red")
    assert result.code == 2 and "No such option" in result.err
