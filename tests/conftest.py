"""Shared fixtures: an isolated settings home, fresh plugins per test, tiny SD-shaped pipelines
(SD1, SD2, SDXL)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from conceptctl.cli import main
from conceptctl.plugins import reset_plugins

# Libraries must never reach for the network in tests; an offline failure is then immediate.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own settings/cache folder and a plugin manager built afresh."""
    home = tmp_path / "conceptctl-home"
    monkeypatch.setenv("CONCEPTCTL_HOME", str(home))
    monkeypatch.delenv("CONCEPTCTL_PLUGINS", raising=False)
    monkeypatch.delenv("CONCEPTCTL_DEBUG", raising=False)
    # A run under 'accelerate launch' sets it; erase would then train in that precision.
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    reset_plugins()
    yield home
    reset_plugins()


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """A saved SD1-like (epsilon, CLIP quick-GELU) diffusers folder."""
    from conceptctl.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A saved SD2-like (v-prediction, linear projections, wider text encoder) folder."""
    from conceptctl.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd2", "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A saved SDXL-like folder: two text encoders (32 and 64 wide), pooled and size/crop
    conditioning, transformer depth 2, Euler."""
    from conceptctl.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_sd1_artifact(tmp_path_factory, tiny_sd1):
    """One artifact of ``tiny_erase_config(tiny_sd1)``, erased once for every test that only
    reads it (tests that change an artifact erase their own). Its anchor cache goes to a
    home of its own, never the user's."""
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    root = tmp_path_factory.mktemp("shared-artifact")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONCEPTCTL_HOME", str(root / "home"))
        mp.delenv("ACCELERATE_MIXED_PRECISION", raising=False)  # as isolated_home
        reset_plugins()
        erase(tiny_erase_config(tiny_sd1), root / "art")
    reset_plugins()
    return root / "art"


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run ``conceptctl ARGS…`` in process through the real error boundary."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
