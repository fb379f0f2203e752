"""A user's files are never moved or deleted, one writer per output, sizes bounded.

Each case starts from a reproduction of issue 12 (a careless or hostile invocation on the landed
main) and ends with: exit != 0, one error line and a hint, no traceback, the user's files intact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conceptctl.outputs import lock_path, written_by_conceptctl
from conceptctl.testing import tiny_erase_config


def _refused(result, *words: str) -> None:
    assert result.code != 0, result.err
    assert "Traceback" not in result.err + result.out and "bug" not in result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    # The last two lines (a run that fails midway has printed its progress before them).
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), result.err
    assert not any(line.startswith("error: ") for line in lines[:-2]), result.err
    for word in words:
        assert word in lines[-2], lines[-2]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory that holds a user's thesis, and a folder of their own beside it."""
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "thesis.tex").write_text("\\section{Four years of work}")
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="module")
def sd1_artifact(tiny_sd1, tmp_path_factory):
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.testing import write_test_artifact

    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    return write_test_artifact(model, tmp_path_factory.mktemp("art") / "art")


def _commands(tiny_sd1, artifact: Path) -> dict[str, tuple]:
    """Every command that writes, as (args before the output, output flag, args after)."""
    return {
        "erase": (("erase", "church", "-a", "house", "-b", tiny_sd1, "--steps", "4",
                   "--warmup", "1"), "-o"),
        "sample": (("sample", "a church", "-b", tiny_sd1, "-n", "1", "--steps", "1"), "-o"),
        "eval": (("eval", artifact, "--steps", "1"), "-o"),
        "export-folder": (("export", artifact, "--format", "diffusers"), "--out"),
        "toy-render": (("toy", "render", "--object", "church", "--style", "Monet", "--color",
                        "red"), "-o"),
        "toy-train": (("toy", "train", "--images-per-concept", "2", "--vae-steps", "1",
                       "--judge-steps", "1", "--unet-steps", "1"), "-o"),
    }


@pytest.mark.parametrize("command", ["erase", "sample", "eval", "export-folder", "toy-render",
                                     "toy-train"])
@pytest.mark.parametrize("output", [".", "", "..", "/"])
def test_working_directory_and_its_parents_are_never_outputs(cli, workdir, tiny_sd1,
                                                             sd1_artifact, command, output):
    # Reproduction: `conceptctl erase church -a house --steps 4 -o . --overwrite` emptied '.'.
    before = _tree(workdir)
    args, flag = _commands(tiny_sd1, sd1_artifact)[command]
    # (the parser itself refuses a folder where toy render writes one file)
    words = ("directory",) if command == "toy-render" else ("working directory",)
    _refused(cli(*args, flag, output, "--overwrite"), *words)
    assert _tree(workdir) == before
    assert not [p for p in os.listdir(workdir.parent) if p.startswith(".")]  # no ..old-*, lock


@pytest.mark.parametrize("command", ["erase", "sample", "eval", "export-folder", "toy-train"])
def test_overwrite_refuses_a_folder_conceptctl_did_not_write(cli, workdir, tiny_sd1,
                                                             sd1_artifact, command):
    before = _tree(workdir)
    args, flag = _commands(tiny_sd1, sd1_artifact)[command]
    _refused(cli(*args, flag, "src", "--overwrite"), "src", "conceptctl did not write")
    assert _tree(workdir) == before
    assert not written_by_conceptctl(workdir / "src")


@pytest.mark.parametrize("command", ["toy-render"])
def test_overwrite_refuses_a_file_conceptctl_did_not_write(cli, workdir, tiny_sd1, sd1_artifact,
                                                           command):
    (workdir / "photo.png").write_bytes(b"\x89PNG not really")
    before = _tree(workdir)
    args, flag = _commands(tiny_sd1, sd1_artifact)[command]
    _refused(cli(*args, flag, "photo.png", "--overwrite"), "conceptctl did not write")
    assert _tree(workdir) == before


def test_a_folder_that_only_looks_like_ours_is_refused(cli, workdir, tiny_sd1):
    # A user's own report.json (a common name) does not make the folder conceptctl's.
    (workdir / "src" / "report.json").write_text(json.dumps({"grade": "A"}))
    before = _tree(workdir)
    _refused(cli("sample", "x", "-b", tiny_sd1, "-n", "1", "--steps", "1", "-o", "src",
                 "--overwrite"), "conceptctl did not write")
    assert _tree(workdir) == before


def test_overwrite_replaces_what_conceptctl_wrote(workdir, tiny_sd1):
    from conceptctl.erasure.run import erase

    erase(tiny_erase_config(tiny_sd1), workdir / "art")
    assert written_by_conceptctl(workdir / "art")
    old = (workdir / "art" / "weights.safetensors").read_bytes()
    erase(tiny_erase_config(tiny_sd1, seed=1), workdir / "art", overwrite=True)
    assert (workdir / "art" / "weights.safetensors").read_bytes() != old
    assert json.loads((workdir / "art" / "conceptctl.json").read_text())["seed"] == 1
    assert (workdir / "src" / "thesis.tex").exists() and (workdir / "notes.txt").exists()
    assert sorted(p for p in os.listdir(workdir) if p.startswith(".")) == []


def test_a_killed_run_folder_is_ours_to_replace(workdir):
    run = workdir / "killed"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "state.json").write_text(json.dumps({"step": 2}))
    assert written_by_conceptctl(run)
    (run / "checkpoint-2" / "state.json").write_text("not json")
    assert not written_by_conceptctl(run)


def _failing_method_plugin():
    from conceptctl.components import Component
    from conceptctl.errors import ConceptctlError
    from conceptctl.hookspecs import hookimpl

    class Failing:
        def __init__(self, context, config):
            pass

        def training_step(self, batch, step):
            raise ConceptctlError("the test method gave up", hint="none needed")

    class Plugin:
        @hookimpl
        def register_methods(self, register):
            register(Component("failing", Failing, "test method that fails at its first step"))

    return Plugin()


def test_a_failed_overwrite_leaves_the_old_artifact(workdir, tiny_sd1):
    from conceptctl.erasure.run import erase
    from conceptctl.errors import ConceptctlError
    from conceptctl.plugins import register_plugin, unregister_plugin

    erase(tiny_erase_config(tiny_sd1), workdir / "art")
    before = _tree(workdir / "art")
    register_plugin(_failing_method_plugin(), "failing-plugin")
    try:
        with pytest.raises(ConceptctlError, match="the test method gave up"):
            erase(tiny_erase_config(tiny_sd1, method="failing"), workdir / "art",
                  overwrite=True)
    finally:
        unregister_plugin("failing-plugin")
    assert _tree(workdir / "art") == before
    assert sorted(p for p in os.listdir(workdir) if p.startswith(".")) == []


def test_resume_into_a_users_folder_is_refused(cli, workdir, tiny_sd1):
    before = _tree(workdir)
    _refused(cli("erase", "church", "-a", "house", "-b", tiny_sd1, "--steps", "4", "--warmup",
                 "1", "-o", "src", "--resume", "latest"), "conceptctl did not write")
    assert _tree(workdir) == before


# --- one writer per output ------------------------------------------------------------------

def _plant_lock(target: Path, pid: int, host: str | None = None) -> Path:
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                "started": time.time(), "command": "conceptctl erase …"}))
    return lock


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["erase", "sample", "eval", "export-folder", "toy-render"])
def test_a_second_writer_is_refused_naming_the_holder(cli, workdir, tiny_sd1, sd1_artifact,
                                                      live_process, command):
    out = "out.png" if command == "toy-render" else "out"
    lock = _plant_lock(workdir / out, live_process)
    args, flag = _commands(tiny_sd1, sd1_artifact)[command]
    _refused(cli(*args, flag, out, "--overwrite"), out, "being written by another",
             f"pid {live_process}")
    assert lock.exists()  # the holder's lock is left to the holder
    assert not (workdir / out).exists()


def test_a_lock_from_another_host_is_refused_with_how_to_clear_it(cli, workdir, tiny_sd1):
    lock = _plant_lock(workdir / "out", 1, host="elsewhere.example")
    result = cli("sample", "x", "-b", tiny_sd1, "-n", "1", "--steps", "1", "-o", "out")
    _refused(result, "on elsewhere.example")
    assert str(lock) in result.err


def test_a_stale_lock_is_taken_over_with_a_note(cli, workdir, tiny_sd1):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = _plant_lock(workdir / "out", int(done.stdout))  # that process has ended
    result = cli("sample", "x", "-b", tiny_sd1, "-n", "1", "--steps", "1", "-o", "out")
    assert result.code == 0, result.err
    assert "took over the stale lock" in result.err
    assert not lock.exists() and (workdir / "out" / "samples.json").exists()


def test_an_erase_takes_over_a_stale_lock(workdir, tiny_sd1):
    from conceptctl.erasure.run import EraseReporter, erase

    lock = _plant_lock(workdir / "out", 2**22 + 1)  # above pid_max's default: no such process
    notes = []
    erase(tiny_erase_config(tiny_sd1), workdir / "out",
          reporter=EraseReporter(message=notes.append))
    assert any("took over the stale lock" in n for n in notes)
    assert not lock.exists() and (workdir / "out" / "conceptctl.json").exists()


@pytest.mark.slow
def test_two_erases_into_one_folder(workdir, tiny_sd1, cli):
    # Reproduction: two erases into one -o both exited 0 and both claimed the artifact; an
    # --overwrite erase deleted the folder another erase was writing.
    env = {**os.environ, "CONCEPTCTL_HOME": os.environ["CONCEPTCTL_HOME"]}
    first = subprocess.Popen(
        [sys.executable, "-m", "conceptctl", "erase", "church", "-a", "house", "-b",
         str(tiny_sd1), "--steps", "400", "--warmup", "1", "--anchor-images", "1",
         "--anchor-prompt-count", "4",
         "--checkpointing-steps", "2", "-o", "out"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (workdir / "out").is_dir() and time.time() < deadline:
            time.sleep(0.2)
        assert (workdir / "out").is_dir(), "the first erase did not start"
        for extra in ((), ("--overwrite",)):
            result = cli("erase", "boat", "-a", "house", "-b", tiny_sd1, "--steps", "2",
                         "--warmup", "1", "-o", "out", *extra)
            _refused(result, "being written by another", f"pid {first.pid}")
        assert first.poll() is None and (workdir / "out").is_dir()  # still training
    finally:
        first.terminate()
        first.wait(timeout=60)


# --- sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (("--resolution", "100000"), ("resolution 100000", "limit of 256 px")),
    (("--batch-size", "100000"), ("batch size 100000",)),
    (("-n", "100000000"), ("pictures", "GiB")),
])
def test_sizes_are_bounded_before_any_allocation(cli, workdir, args, words):
    # Reproduction: `sample --resolution 100000` was OOM-killed (exit 137) instead of refused.
    started = time.time()
    result = cli("sample", "a red church", *args, "-o", "out")
    _refused(result, *words)
    assert args[0] in result.err.splitlines()[-1]  # the hint names the option to change
    assert not (workdir / "out").exists()
    assert time.time() - started < 30  # refused before the model loads, not after sampling


def test_sizes_are_bounded_by_the_loaded_backbone_too(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.errors import UsageError
    from conceptctl.sampling import SampleSettings, sample_images

    model = open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
    limit = 4 * model.resolution
    with pytest.raises(UsageError, match=f"limit of {limit} px"):
        next(sample_images(model, SampleSettings(prompts=("x",), resolution=limit + 8)))


@pytest.mark.parametrize("args, words", [
    (("--batch-size", "100000"), ("batch size 100000", "limit of 256")),
    (("--anchor-images", "100000000"), ("anchor images", "GiB")),
])
def test_erase_sizes_are_bounded_before_the_anchors_are_drawn(cli, workdir, args, words):
    result = cli("erase", "church", "-a", "house", *args, "-o", "out")
    _refused(result, *words)
    assert not (workdir / "out").exists() and not list(workdir.glob(".*"))
