"""User settings: CONCEPTCTL_HOME, config set/show/unset, bad files and values."""

import json

from conceptctl.settings import config_file, load_settings


def test_home_variable_moves_config_and_cache(isolated_home):
    assert config_file() == isolated_home / "config.toml"
    assert load_settings().cache_dir == isolated_home / "cache"


def test_set_show_unset_round_trip(cli, isolated_home, tmp_path):
    assert cli("config", "set", "dtype", "bfloat16").code == 0
    assert cli("config", "set", "device", "cuda:1").code == 0
    assert cli("config", "set", "backbone-path.sd-1.5", tmp_path).code == 0
    data = json.loads(cli("config", "show", "--json").out)
    assert data["file"] == str(isolated_home / "config.toml")
    assert data["settings"]["dtype"] == "bfloat16"
    assert data["settings"]["device"] == "cuda:1"
    assert data["settings"]["backbone-paths"] == {"sd-1.5": str(tmp_path.resolve())}
    assert cli("config", "unset", "dtype").code == 0
    assert load_settings().dtype == "auto"
    assert "backbone-path.sd-1.5 = " in cli("config", "show").out


def test_bad_values_and_keys_are_refused(cli):
    result = cli("config", "set", "dtype", "float8")
    assert result.code == 2 and "dtype must be one of" in result.err
    result = cli("config", "set", "colour", "blue")
    assert result.code == 2 and "unknown setting 'colour'" in result.err
    assert not config_file().exists()


def test_broken_settings_file_is_named(cli, isolated_home):
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text("dtype = = 'x'\n")
    result = cli("config", "show")
    assert result.code == 1
    assert "cannot read settings file" in result.err and "config.toml" in result.err


def test_unknown_key_in_file_is_named(cli, isolated_home):
    isolated_home.mkdir(parents=True)
    (isolated_home / "config.toml").write_text('colour = "blue"\n')
    assert "unknown setting 'colour'" in cli("config", "show").err
