"""The template plugin in plugins/ installs like any package and is discovered end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "conceptctl-example"


@pytest.mark.slow
def test_example_plugin_installs_registers_and_samples(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(PLUGIN)],
        check=True, capture_output=True,
    )
    env = os.environ | {"PYTHONPATH": str(site)}

    def conceptctl(*args):
        return subprocess.run([sys.executable, "-m", "conceptctl", *args], env=env,
                              capture_output=True, text=True)

    listed = conceptctl("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    example = next(p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "example")
    assert (example["package"], example["builtin"]) == ("conceptctl-example", False)
    assert example["registers"] == {"backbone": ["example-tiny"]}

    drawn = conceptctl("sample", "a church", "-b", "example-tiny", "-n", "2", "--steps", "2",
                       "-o", str(tmp_path / "out"), "--json")
    assert drawn.returncode == 0, drawn.stderr
    sidecar = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert sidecar["backbone"]["name"] == "example-tiny"
    assert len(sidecar["images"]) == 2

    # Without it in CONCEPTCTL_PLUGINS it is not loaded, and the name is then unknown.
    env["CONCEPTCTL_PLUGINS"] = ""
    hidden = conceptctl("sample", "x", "-b", "example-tiny")
    assert hidden.returncode == 1 and "unknown backbone 'example-tiny'" in hidden.stderr
