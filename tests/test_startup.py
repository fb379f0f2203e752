"""The CLI must start fast: listing commands or plugins never imports torch or diffusers."""

import json
import subprocess
import sys

PROBE = (
    "import sys\n"
    "from conceptctl.cli import main\n"
    "code = main({args!r})\n"
    "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
    "print('HEAVY=' + ','.join(heavy))\n"
)


def _heavy_modules_after(args: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True,
                         text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_help_does_not_import_torch():
    assert _heavy_modules_after(["--help"]) == "HEAVY="
    assert _heavy_modules_after(["export", "--help"]) == "HEAVY="


def test_plugins_and_backbones_listing_do_not_import_torch():
    assert _heavy_modules_after(["plugins"]) == "HEAVY="
    assert _heavy_modules_after(["backbones", "--json"]) == "HEAVY="


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "conceptctl", "--version"],
                            capture_output=True, text=True)
    from conceptctl import __version__

    assert result.returncode == 0
    assert result.stdout.strip() == f"conceptctl {__version__}"


def test_no_arguments_shows_help(cli):
    result = cli()
    assert result.code == 0
    for command in ("sample", "plugins", "backbones", "config", "toy"):
        assert command in result.out


def test_backbones_json_lists_known_names(cli):
    result = cli("backbones", "--json")
    assert result.code == 0
    rows = {row["name"]: row for row in json.loads(result.out)["backbones"]}
    assert rows["sd-1.4"]["source"] == "CompVis/stable-diffusion-v1-4"
    assert rows["sd-2.1"]["prediction_type"] == "v_prediction"
    assert rows["sd-2.1"]["resolution"] == 768
    assert rows["sd-2.1-base"]["text_width"] == 1024
    assert rows["toy"]["default"] is True and rows["sd-1.5"]["default"] is False
    assert rows["toy"]["plugin"] == "builtin-toy"
