"""A battery of bad inputs, tried as a hostile user would: each ends with exit ≠ 0, one
'error:' line naming what is wrong (a hint where one helps), no traceback, never "this is a bug",
and nothing written at the output path."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from conceptctl.erasure.anchors import derive_target
from conceptctl.evaluation.attacks import paraphrases


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_sd1):
    """A real artifact of the tiny SD1 pipeline, copied fresh for each case that damages it."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.testing import write_test_artifact

    out = tmp_path_factory.mktemp("artifact") / "church"
    write_test_artifact(open_backbone(str(tiny_sd1), device="cpu"), out)
    return out


def _damaged(artifact, tmp_path, damage):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    damage(copy)
    return copy


def _json(text):
    return lambda art: (art / "conceptctl.json").write_text(text)


def _manifest_edit(edit):
    import json

    def damage(art):
        record = json.loads((art / "conceptctl.json").read_text())
        edit(record)
        (art / "conceptctl.json").write_text(json.dumps(record))
    return damage


def _weights(content):
    return lambda art: (art / "weights.safetensors").write_bytes(content)


def _fifo(art):
    (art / "weights.safetensors").unlink()
    os.mkfifo(art / "weights.safetensors")


DAMAGE = {
    "manifest not JSON": (_json("{not json"), "conceptctl.json is not valid JSON"),
    "manifest a list": (_json("[1, 2]"), "holds a JSON list, not an object"),
    "manifest 5000-digit number": (_json('{"format_version": 1' + "0" * 5000 + "}"),
                                   "is not valid JSON"),
    "manifest without base": (_manifest_edit(lambda r: r.pop("base")), "has no 'base' field"),
    "manifest without concept": (_manifest_edit(lambda r: r.pop("concept")),
                                 "has no 'concept' field"),
    "manifest base a string": (_manifest_edit(lambda r: r.update(base="sd")),
                               "'base' must be an object, not str"),
    "manifest tensors not a list": (_manifest_edit(lambda r: r["base"].update(tensors=3)),
                                    "'base.tensors' must be a list"),
    "weights empty": (_weights(b""), "as safetensors"),
    "weights truncated": (lambda art: (art / "weights.safetensors").write_bytes(
        (art / "weights.safetensors").read_bytes()[:100]), "as safetensors"),
    "weights garbage": (_weights(os.urandom(4096)), "as safetensors"),
    "weights missing": (lambda art: (art / "weights.safetensors").unlink(),
                        "weights.safetensors is missing"),
    "weights a FIFO": (_fifo, "is not a regular file"),
}


def _refused(result, phrase, out=None):
    lines = result.err.strip().splitlines()
    assert result.code != 0, result.err
    assert "Traceback" not in result.err + result.out
    assert "bug" not in result.err.lower(), result.err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.err
    assert phrase in errors[0], (phrase, errors[0])
    if out is not None:
        assert not out.exists()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_artifact_is_one_clear_line(cli, artifact, tmp_path, case):
    damage, phrase = DAMAGE[case]
    art = _damaged(artifact, tmp_path, damage)
    out = tmp_path / "samples"
    _refused(cli("sample", "a church", "--model", art, "-o", out, "--steps", "2"), phrase, out)


def test_a_manifest_with_a_byte_order_mark_still_reads(artifact, tmp_path):
    from conceptctl.erasure.artifact import read_artifact

    def bom(art):
        path = art / "conceptctl.json"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_artifact(_damaged(artifact, tmp_path, bom)).manifest["concept"] == "church"


@pytest.mark.parametrize("args, phrase", [
    (["erase", "red  church", "--anchor", " Red church"], "the anchor equals the concept"),
    (["erase", "church", "--anchor", "house", "--steps", "0"], "'--steps'"),
    (["sample", "a church", "-n", "0"], "'--num-images'"),
    (["config", "set", "device", "tpu"], "unknown device 'tpu'"),
    (["config", "set", "dtype", "float8"], "dtype must be one of"),
    (["config", "set", "colour", "red"], "unknown setting 'colour'"),
])
def test_bad_settings_are_refused_before_any_work(cli, tmp_path, args, phrase):
    out = tmp_path / "out"
    extra = ["-o", out] if args[0] in ("erase", "sample") else []
    _refused(cli(*args, *extra), phrase, out)


@pytest.mark.parametrize("args, phrase", [
    (["export", "{missing}", "--format", "diffusers"], "is not a conceptctl artifact"),
    (["export", "{art}", "--format", "zip"], "unknown exporter 'zip'"),
    (["eval", "{art}", "--attacks", "bogus"], "unknown attack 'bogus'"),
    (["eval", "{art}", "--images-per-prompt", "0"], "'--images-per-prompt'"),
])
def test_bad_export_and_eval_requests(cli, artifact, tmp_path, args, phrase):
    out = tmp_path / "out"
    args = [a.format(art=artifact, missing=tmp_path / "missing") for a in args]
    _refused(cli(*args, "-o", out), phrase, out)


def test_an_anchor_prompt_file_that_is_not_text(cli, tmp_path):
    prompts = tmp_path / "anchors.txt"
    prompts.write_bytes(b"\xff\xfe a photo of a house\n")
    out = tmp_path / "out"
    _refused(cli("erase", "church", "--anchor", "house", "--anchor-prompts", prompts,
                 "-o", out), "is not UTF-8 text", out)


def test_a_prompt_csv_with_a_column_twice(cli, artifact, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,evaluation_seed,case_number,prompt\na church,1,0,a house\n")
    out = tmp_path / "eval"
    _refused(cli("eval", artifact, "--prompts", prompts, "-o", out), "appear more than once",
             out)


def test_user_text_is_never_a_regex_template():
    """Backslashes in a concept are text: 'c\\1' once crashed ('invalid group reference') and
    'x\\g<0>' silently rewrote target prompts."""
    assert derive_target("a photo of a house", r"c\1", "house", "object") == r"a photo of a c\1"
    assert derive_target("a house by a lake", r"x\g<0>", "house", "object") == (
        r"a x\g<0> by a lake")
    assert r"a photo of a c\1" in paraphrases(r"a photo of a c\1", r"c\1")


def test_checkpoints_get_the_usual_permissions(tmp_path):
    import torch

    from conceptctl.erasure.checkpoints import save_checkpoint

    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, 1, trainable={"w": torch.zeros(2)}, optimizers={},
                               modules={}, generator=torch.Generator(), history=[], keep=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


@pytest.mark.parametrize("code, phrase", [
    ("ENOSPC", "no space left on the device holding /data/out/weights.safetensors"),
    ("EROFS", "/data/out/weights.safetensors is on a read-only file system"),
    ("EACCES", "permission denied: /data/out/weights.safetensors"),
])
def test_what_the_file_system_refuses_is_one_line_not_a_bug(cli, code, phrase):
    """A full disk, a read-only or forbidden folder, met anywhere (here: a plugin's command)."""
    import errno

    from conceptctl.hookspecs import hookimpl
    from conceptctl.plugins import register_plugin, unregister_plugin

    class Disk:
        @hookimpl
        def register_commands(self, app):
            @app.command("fill")
            def fill():
                number = getattr(errno, code)
                raise OSError(number, os.strerror(number), "/data/out/weights.safetensors")

    register_plugin(Disk(), "disk")
    try:
        _refused(cli("fill"), phrase)
    finally:
        unregister_plugin("disk")


def test_eval_of_a_toy_artifact_whose_concept_the_toy_does_not_know(cli, tmp_path):
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.testing import write_test_artifact

    art = write_test_artifact(open_backbone("toy", device="cpu"), tmp_path / "dragon",
                              concept="dragon", anchor="house")
    out = tmp_path / "eval"
    _refused(cli("eval", art, "-o", out), "'dragon' is not a style or object of the toy world",
             out)


def test_the_report_escapes_a_note_once():
    """A metric's note with HTML characters shows as written ('&lt;', not '&amp;lt;')."""
    from types import SimpleNamespace

    from conceptctl.evaluation.report import render_html

    result = {"artifact": {"concept": "c<1>", "anchor": "a", "method": "m"}, "backbone": "toy",
              "verdict": {"status": "unknown", "text": "no detector"},
              "metrics": [{"metric": "fd", "group": "general", "value": None,
                           "direction": "lower", "images": 0, "details": {},
                           "note": "needs <scipy> & more"}],
              "attacks": [], "suite": {}, "draw": {}, "detector": None, "versions": {}}
    run = SimpleNamespace(suite=SimpleNamespace(groups=lambda: []))
    page = render_html(result, run, [])
    assert "needs &lt;scipy&gt; &amp; more" in page
    assert "&amp;lt;" not in page and "c&lt;1&gt;" in page


def test_what_a_killed_run_left_is_cleared_by_the_next_one(tmp_path):
    """Staging folders and temporary files of a SIGKILLed run are removed when the same output
    is next written; an old output moved aside is put back if its replacement never arrived."""
    from conceptctl.fileio import atomic_directory, atomic_file

    (tmp_path / ".out.tmp-k1ll3d").mkdir()
    (tmp_path / ".out.tmp-k1ll3d" / "weights.safetensors").write_bytes(b"half")
    (tmp_path / ".delta.safetensors.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / ".other.tmp-keep").mkdir()  # another output's: not ours to touch now
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("new")
    with atomic_file(tmp_path / "delta.safetensors") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.tmp-keep", "delta.safetensors", "out"]

    # Killed between moving the old output aside and renaming the new one in: restored.
    (tmp_path / ".kept.old-x1").mkdir()
    (tmp_path / ".kept.old-x1" / "old").mkdir()
    (tmp_path / ".kept.old-x1" / "old" / "report.json").write_text("{}")
    from conceptctl.fileio import clear_leftovers

    clear_leftovers(tmp_path / "kept")
    assert (tmp_path / "kept" / "report.json").is_file()
    assert not (tmp_path / ".kept.old-x1").exists()


def test_images_the_judge_cannot_read(cli, tmp_path):
    """A decompression bomb (a tiny PNG declaring 400 M pixels) and a file that is no image."""
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)
    _refused(cli("toy", "judge", bomb), f"cannot read {bomb} as an image")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    _refused(cli("toy", "judge", text), f"cannot read {text} as an image")


def test_a_pipeline_folder_with_an_empty_model_index(cli, tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    out = tmp_path / "s"
    _refused(cli("sample", "a church", "--backbone", folder, "-o", out),
             f"cannot load the diffusers folder {folder}", out)


def test_a_damaged_or_unwritable_anchor_cache_does_not_stop_an_erase(tiny_sd1, tmp_path,
                                                                     isolated_home):
    """A truncated cache file is drawn again (and rewritten); a cache that cannot be written
    (here 'anchors' is a file, as a full or read-only disk would refuse) is skipped. Both say
    so in a warning and end with the same weights as a clean run."""
    from safetensors.torch import load_file

    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    cfg = tiny_erase_config(tiny_sd1, steps=2)
    clean = erase(cfg, tmp_path / "clean")
    cache = next((isolated_home / "cache" / "anchors").glob("*.safetensors"))
    cache.write_bytes(cache.read_bytes()[:64])
    redrawn = erase(cfg, tmp_path / "redrawn")
    assert not redrawn.anchors_cached and "drawing the images again" in redrawn.warnings[-1]
    assert load_file(cache)["latents"].dim() == 4  # rewritten whole

    import shutil
    shutil.rmtree(isolated_home / "cache" / "anchors")
    (isolated_home / "cache" / "anchors").write_text("not a folder")
    skipped = erase(cfg, tmp_path / "skipped")
    assert "goes on without the cache" in skipped.warnings[-1]
    weights = [load_file(str(r.out_dir / "weights.safetensors")) for r in (clean, redrawn,
                                                                             skipped)]
    for name, tensor in weights[0].items():
        assert all(torch.equal(tensor, w[name]) for w in weights[1:]), name


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_a_symbolic_link(cli, tmp_path, overwrite):
    """A dangling link once crashed (NotADirectoryError); a link to a user's folder must never
    be written through, with or without --overwrite."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("keep me")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "linked").symlink_to(theirs)
    extra = ["--overwrite"] if overwrite else []
    for link in ("dangling", "linked"):
        _refused(cli("sample", "a church", "-n", "1", "-o", tmp_path / link, *extra),
                 "is a symbolic link")
    assert not (tmp_path / "nowhere").exists()
    assert [p.name for p in theirs.iterdir()] == ["thesis.tex"]
