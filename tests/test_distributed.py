"""Data-parallel erasure: several processes started by accelerate must train what one process
trains on the whole batch (up to float summation order), and only the main one writes."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conceptctl.erasure.artifact import read_artifact
from conceptctl.erasure.distributed import DataParallel, SingleProcess
from conceptctl.erasure.surgery import DocoProjection
from conceptctl.erasure.trainer import TrainingData


def _ranks(world: int) -> list[DataParallel]:
    # Shares and shards are pure arithmetic: no process group is needed to check them.
    return [DataParallel(rank, world, "gloo", torch.device("cpu")) for rank in range(world)]


@pytest.mark.parametrize("size, world", [(8, 2), (3, 2), (7, 3), (1, 2)])
def test_shares_cover_the_batch_in_order(size, world):
    ranks = _ranks(world)
    shares = ranks[0].shares(size)
    assert sum(shares) == size and max(shares) - min(shares) <= 1
    rows = [i for r in ranks for i in range(size)[r.shard(size)]]
    assert rows == list(range(size))


def test_each_process_draws_its_share_of_the_same_global_batch():
    g = torch.Generator().manual_seed(0)
    data = TrainingData(latents=torch.randn(10, 4, 2, 2, generator=g),
                        prompt_index=torch.arange(10) % 3,
                        anchor_text=torch.randn(3, 5, 6, generator=g),
                        target_text=torch.randn(3, 5, 6, generator=g),
                        empty_text=torch.randn(1, 5, 6, generator=g))
    whole = data.batch(5, torch.Generator().manual_seed(1), "cpu", torch.float32)
    parts = [data.batch(5, torch.Generator().manual_seed(1), "cpu", torch.float32, dist=r)
             for r in _ranks(2)]
    for name in ("latents", "anchor_text", "target_text", "timesteps", "noise"):
        assert torch.equal(getattr(whole, name),
                           torch.cat([getattr(p, name) for p in parts])), name
    assert [p.share for p in parts] == [3 / 5, 2 / 5] and parts[0].sizes == (3, 2)
    assert whole.sizes is None and whole.share == 1.0 and SingleProcess().world == 1


def test_surgery_on_summed_gradients_is_not_the_sum_of_surgeries():
    """Why DoCo sums g_u and g_p over processes before surgery instead of after (what a DDP
    wrapper would do): the projection is not linear."""
    def surgery(u, p):  # the projection on a one-tensor set (no clip reached)
        return DocoProjection(1.0, max_grad_norm=1e30)({"w": u}, {"w": p})[0]["w"]

    u1, p1 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflict: projected
    u2, p2 = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])  # no conflict: kept
    per_process = (surgery(u1, p1) + surgery(u2, p2)) / 2
    on_averages = surgery((u1 + u2) / 2, (p1 + p2) / 2)
    assert not torch.allclose(per_process, on_averages)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher() -> list[str]:
    # --multi_gpu also on a CPU-only machine: '--cpu' would start a single process.
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [accelerate or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["doco", "ca"])
def test_two_processes_train_what_one_process_trains(cli, tiny_sd1, tmp_path, method):
    """accelerate launch, 2 CPU processes (gloo): same weights as one process within float
    tolerance; the artifact and checkpoints written once, by the main process."""
    prompts = tmp_path / "anchors.txt"  # three anchor images keep the test short
    prompts.write_text("a photo of a house\na house by a lake\na small house\n")
    args = ["erase", "church", "--anchor", "house", "-b", str(tiny_sd1), "--method", method,
            "--anchor-prompts", str(prompts),
            "--steps", "4", "--warmup", "1", "--batch-size", "3", "--anchor-images", "1",
            "--checkpointing-steps", "2", "--lr", "1e-3", "--d-lr", "1e-3", "--json"]
    single = cli(*args, "-o", tmp_path / "one")
    assert single.code == 0, single.err
    # A fresh cache for the two processes, so they draw the anchor images themselves (split).
    env = os.environ | {"CONCEPTCTL_HOME": str(tmp_path / "home2"), "OMP_NUM_THREADS": "1",
                        "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*_launcher(), "-m", "conceptctl", *args, "-o", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])  # printed once, by the main one
    assert summary["processes"] == 2 and summary["anchors_cached"] is False
    assert done.stdout.count('"output"') == 1

    one, two = read_artifact(tmp_path / "one"), read_artifact(tmp_path / "two")
    assert two.manifest["machine"]["processes"] == 2
    assert one.weights.keys() == two.weights.keys()
    base = {k: v for k, v in one.weights.items()}
    for name, value in two.weights.items():
        torch.testing.assert_close(value, base[name], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    history = {k: json.loads((tmp_path / k / "checkpoint-4" / "state.json").read_text())[
        "history"] for k in ("one", "two")}
    for a, b in zip(history["one"], history["two"], strict=True):
        for key in ("loss", "preserve_loss", "d_loss", "d_accuracy", "surgery_fired"):
            if key in a and a[key] == a[key]:  # NaN during warm-up
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])


def test_collectives_in_a_one_process_group(monkeypatch):
    """The bucketed sum, gather and broadcast on a real (gloo, one-process) group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = DataParallel(0, 1, "gloo", torch.device("cpu"))
        monkeypatch.setattr(DataParallel, "BUCKET", 5)  # several buckets for these tensors
        tensors = [torch.arange(6.0).view(2, 3), torch.ones(4, dtype=torch.float16),
                   torch.tensor(2.5)]
        expected = [t.clone() for t in tensors]
        group.sum_(tensors)
        assert all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))
        x = torch.randn(3, 2)
        assert torch.equal(group.gather(x, [3]), x)
        group.broadcast_([x])
        assert group.broadcast_object({"a": 1}) == {"a": 1} and group.max(3.0) == 3.0
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_evaluate_what_one_process_evaluates(cli, tiny_sd1, tmp_path):
    """accelerate launch, 2 CPU processes: each draws its share of the pictures (an odd count,
    so the shares differ) and of the attacked prompts; the report, written once, holds the
    pictures of a one-process run."""
    import numpy as np
    from PIL import Image

    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    art = tmp_path / "art"
    erase(tiny_erase_config(tiny_sd1, steps=2), art)
    prompts = tmp_path / "prompts.csv"
    # Rows of two guidance scales (and one of the run's): each process batches its share by
    # guidance, the attacks draw each case with its own.
    prompts.write_text("prompt,evaluation_seed,case_number,group,evaluation_guidance\n"
                       "a church,1,0,target,7\na church by a lake,2,1,target,3\n"
                       "a red church,3,2,target,7\na house,4,3,anchor,\na tree,5,4,general,3\n")
    args = ["eval", str(art), "--prompts", str(prompts), "--steps", "2", "-n", "1",
            "--batch-size", "2", "--attack-cases", "3", "--attacks", "embedding,paraphrase",
            "--json"]
    single = cli(*args, "-o", tmp_path / "one")
    assert single.code == 0, single.err
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*_launcher(), "-m", "conceptctl", *args, "-o", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"verdict"') == 1  # printed once, by the main process

    one, two = (json.loads((tmp_path / k / "report.json").read_text()) for k in ("one", "two"))
    assert (one["processes"], two["processes"]) == (1, 2)
    files = [(r[m]["file"]) for r in one["images"] for m in ("original", "erased")]
    files += [f for a in one["attacks"] for row in a["rows"] for f in row["files"]]
    assert files == [r[m]["file"] for r in two["images"] for m in ("original", "erased")] + [
        f for a in two["attacks"] for row in a["rows"] for f in row["files"]]
    assert len(files) == 10 + 3 + sum(len(r["files"]) for r in one["attacks"][1]["rows"])
    for name in files:
        a, b = (np.asarray(Image.open(tmp_path / k / name), dtype=int) for k in ("one", "two"))
        assert np.abs(a - b).max() <= 1, name  # batches differ: float rounding at most
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
def test_two_processes_compare_writes_one_comparison(tiny_sd1, tmp_path):
    """--compare under accelerate: the other process draws its shares of every artifact's
    pictures and writes nothing (no staging folder left behind); the main one writes it all."""
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    for method in ("doco", "ca"):
        erase(tiny_erase_config(tiny_sd1, steps=2, method=method), tmp_path / method)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed,case_number,group\n"
                       "a church,1,0,target\na house,2,1,anchor\na tree,3,2,general\n")
    out = tmp_path / "cmp"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([*_launcher(), "-m", "conceptctl", "eval", str(tmp_path / "doco"),
                           str(tmp_path / "ca"), "--compare", "--prompts", str(prompts),
                           "--steps", "2", "-n", "1", "--attacks", "none", "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("comparison") == 1
    table = json.loads((out / "compare.json").read_text())
    assert table["artifacts"] == ["doco", "ca"]
    for name in ("doco", "ca"):
        report = json.loads((out / name / "report.json").read_text())
        assert report["processes"] == 2 and len(report["images"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "cmp", "conceptctl-home",
                                                          "doco", "prompts.csv"]
