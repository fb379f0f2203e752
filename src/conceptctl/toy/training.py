"""Train the toy world from nothing: render a data set, then the VAE, the judge and the UNet.

One function, ``train_toy``, in the order the parts depend on each other:

1. render ``images_per_concept`` pictures of each of the 120 concepts (seeds 0..N-1);
2. train the VAE (L1 + L1 on image gradients, which keeps brush-stroke texture, + a tiny KL);
3. encode the data set once (latent means) and decode it (the judge also learns from these);
4. train the judge on rendered and VAE-round-tripped pictures;
5. encode a bank of captions once with the frozen text encoder;
6. train the UNet (epsilon prediction, min-SNR-5 weighting, EMA of the weights), with 10 % empty
   captions for classifier-free guidance and 15 % captions that leave the colour unsaid.

Everything is seeded; the same configuration on the same machine gives the same weights.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptctl.toy import model as toy_model
from conceptctl.toy.judge import Judge, JudgeNet, to_tensor
from conceptctl.toy.render import render_array
from conceptctl.toy.world import AXES, COLORS, OBJECTS, STYLES, Concept, all_concepts, caption

HELDOUT_SEED_BASE = 1_000_000  # judge test pictures never share a seed with training pictures


@dataclass
class ToyTrainConfig:
    out: Path
    images_per_concept: int = 200
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    judge_steps: int = 1500
    judge_batch: int = 96
    judge_lr: float = 2e-3
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    captions_per_concept: int = 24
    ema_decay: float = 0.999
    seed: int = 0
    workers: int = 2
    log_every: int = 50
    snapshot_every: int = 500

    def as_dict(self) -> dict:
        """The settings that shape the result (not where it is written)."""
        return {k: v for k, v in asdict(self).items() if k != "out"}


@dataclass
class _Log:
    fn: Callable[[str], None]
    start: float = field(default_factory=time.time)

    def __call__(self, message: str) -> None:
        self.fn(f"[{time.time() - self.start:7.1f}s] {message}")


def _render_chunk(args: tuple[list[tuple[str, str, str]], list[int]]) -> np.ndarray:
    triples, seeds = args
    return render_array([Concept(*t) for t in triples], seeds)


def render_dataset(
    images_per_concept: int, seed_base: int = 0, workers: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """All 120 concepts x ``images_per_concept`` seeds -> (uint8 images, concept indices)."""
    concepts = all_concepts()
    index = np.repeat(np.arange(len(concepts)), images_per_concept)
    seeds = np.tile(np.arange(images_per_concept) + seed_base, len(concepts))
    triples = [(c.object, c.style, c.color) for c in concepts]
    jobs = [([triples[i] for i in index[s : s + 500]], seeds[s : s + 500].tolist())
            for s in range(0, len(index), 500)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    return np.concatenate(parts), index


def concept_labels(index: np.ndarray) -> dict[str, torch.Tensor]:
    concepts = all_concepts()
    return {
        "object": torch.tensor([OBJECTS.index(concepts[i].object) for i in index]),
        "style": torch.tensor([STYLES.index(concepts[i].style) for i in index]),
        "color": torch.tensor([COLORS.index(concepts[i].color) for i in index]),
    }


def _image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(images: np.ndarray, cfg: ToyTrainConfig, log: _Log):
    vae = toy_model.new_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(1, cfg.vae_steps + 1):
        lr = cfg.vae_lr * min(1.0, step / 100) * (0.1 + 0.9 * (1 - step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        # bfloat16 autocast halves the VAE's step time on CPUs with AMX/AVX512-BF16.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample.float()
        gy, gx = _image_gradients(recon)
        ty, tx = _image_gradients(x)
        loss = (F.l1_loss(recon, x) + F.l1_loss(gy, ty) + F.l1_loss(gx, tx)
                + 1e-6 * posterior.kl().float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def encode_dataset(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, np.ndarray]:
    """Latent means of every picture, and the pictures decoded back (uint8)."""
    latents, decoded = [], []
    for start in range(0, len(images), batch):
        x = to_tensor(images[start : start + batch])
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample.clamp(-1, 1)
        latents.append(z)
        decoded.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return torch.cat(latents), np.concatenate(decoded)


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    dy, dx = torch.randint(-3, 4, (2,), generator=gen).tolist()
    return torch.roll(x, (dy, dx), dims=(2, 3))


def train_judge(images: np.ndarray, decoded: np.ndarray, index: np.ndarray,
                cfg: ToyTrainConfig, log: _Log) -> JudgeNet:
    net = JudgeNet().train()
    labels = concept_labels(index)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.judge_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    for step in range(1, cfg.judge_steps + 1):
        lr = cfg.judge_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.judge_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(images), (cfg.judge_batch,), generator=gen)
        use_decoded = torch.rand(cfg.judge_batch, generator=gen) < 0.5
        pics = np.where(use_decoded.numpy()[:, None, None, None], decoded[idx.numpy()],
                        images[idx.numpy()])
        x = _shift(to_tensor(pics), gen)
        x = x + 0.03 * torch.randn(x.shape, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        loss = sum(F.cross_entropy(out[axis].float(), labels[axis][idx]) for axis in AXES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.judge_steps:
            log(f"judge step {step}/{cfg.judge_steps} loss {loss.item():.4f}")
    return net.eval()


def judge_accuracy(judge: Judge, images: np.ndarray, index: np.ndarray) -> dict[str, float]:
    """Share of pictures whose judged value equals the rendered one, per axis."""
    labels = concept_labels(index)
    logits = judge.logits(images)
    return {axis: float((logits[axis].argmax(-1) == labels[axis]).float().mean())
            for axis in AXES}


@dataclass
class CaptionBank:
    """Embeddings of a fixed set of captions: per concept (with colour), per object+style
    (colour unsaid), and the empty caption."""

    embeddings: torch.Tensor
    with_color: dict[int, list[int]]
    without_color: dict[tuple[str, str], list[int]]
    empty: int
    texts: list[str]


@torch.no_grad()
def build_caption_bank(pipeline, per_concept: int, seed: int) -> CaptionBank:
    rng = random.Random(seed)
    texts: list[str] = [""]
    with_color: dict[int, list[int]] = {}
    without_color: dict[tuple[str, str], list[int]] = {}
    for i, concept in enumerate(all_concepts()):
        with_color[i] = []
        for _ in range(per_concept):
            with_color[i].append(len(texts))
            texts.append(caption(concept, rng))
        key = (concept.object, concept.style)
        if key not in without_color:
            without_color[key] = []
            for _ in range(per_concept // 2):
                without_color[key].append(len(texts))
                texts.append(caption(concept, rng, with_color=False))
    chunks = [pipeline.encode_prompt(texts[s : s + 256], torch.device("cpu"), 1, False)[0]
              for s in range(0, len(texts), 256)]
    return CaptionBank(torch.cat(chunks), with_color, without_color, 0, texts)


def _pick_captions(bank: CaptionBank, index: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    concepts = all_concepts()
    roll = torch.rand(len(index), generator=gen).tolist()
    picks = []
    for i, r in zip(index.tolist(), roll, strict=True):
        if r < 0.10:
            picks.append(bank.empty)
            continue
        c = concepts[i]
        options = (bank.without_color[(c.object, c.style)] if r < 0.25 else bank.with_color[i])
        picks.append(options[int(torch.randint(len(options), (1,), generator=gen))])
    return bank.embeddings[torch.tensor(picks)]


def train_unet(latents: torch.Tensor, index: np.ndarray, bank: CaptionBank,
               cfg: ToyTrainConfig, log: _Log, snapshot: Callable | None = None):
    from diffusers import DDPMScheduler

    unet = toy_model.new_unet().train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler(**toy_model.SCHEDULE)
    abar = noise_schedule.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    warmup = min(200, cfg.unet_steps // 10 + 1)
    for step in range(1, cfg.unet_steps + 1):
        progress = step / cfg.unet_steps
        lr = cfg.unet_lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(latents), (cfg.unet_batch,), generator=gen)
        x0 = latents[idx]
        text = _pick_captions(bank, index[idx.numpy()], gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (cfg.unet_batch,),
                          generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_schedule.add_noise(x0, noise, t)
        pred = unet(xt, t, text).sample
        # Min-SNR-5 weighting (Hang et al. 2023) for epsilon prediction: min(SNR, 5) / SNR.
        snr = abar[t] / (1 - abar[t])
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        if step % cfg.log_every == 0 or step == cfg.unet_steps:
            log(f"unet step {step}/{cfg.unet_steps} loss {loss.item():.4f} lr {lr:.2e}")
        if snapshot is not None and step % cfg.snapshot_every == 0 and step < cfg.unet_steps:
            snapshot(ema, step)
    return ema


def train_toy(cfg: ToyTrainConfig, log_fn: Callable[[str], None] = print) -> dict:
    """Train everything and write ``cfg.out/toy-model/``, ``cfg.out/judge.safetensors`` and
    ``cfg.out/training.json``. Returns the report written to ``training.json``."""
    from safetensors.torch import save_file

    from conceptctl.runtime import quiet_libraries

    quiet_libraries()
    log = _Log(log_fn)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name: str, started: float) -> None:
        timings[name] = round(time.time() - started, 1)
        log(f"{name} done in {timings[name]} s")

    t = time.time()
    images, index = render_dataset(cfg.images_per_concept, 0, cfg.workers)
    timed("render", t)

    t = time.time()
    vae = train_vae(images, cfg, log)
    latents, decoded = encode_dataset(vae, images)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    timed("vae", t)

    t = time.time()
    judge = Judge(train_judge(images, decoded, index, cfg, log))
    test_images, test_index = render_dataset(10, HELDOUT_SEED_BASE, cfg.workers)
    judge_acc = judge_accuracy(judge, test_images, test_index)
    log(f"judge held-out accuracy {judge_acc}")
    timed("judge", t)

    t = time.time()
    pipeline = toy_model.assemble_pipeline(toy_model.new_unet(), vae)
    bank = build_caption_bank(pipeline, cfg.captions_per_concept, cfg.seed)
    timed("captions", t)

    def snapshot(ema, step: int) -> None:
        pipeline.unet = ema
        toy_model.save_toy_model(pipeline, out / "snapshots" / f"step-{step}")

    t = time.time()
    pipeline.unet = train_unet(latents * scaling, index, bank, cfg, log, snapshot)
    timed("unet", t)

    toy_model.save_toy_model(pipeline, out / "toy-model")
    report = {
        "config": cfg.as_dict(),
        "seconds": timings,
        "total_seconds": round(time.time() - log.start, 1),
        "judge_heldout_accuracy": judge_acc,
        "latent_scaling": scaling,
        "captions_in_bank": len(bank.texts),
        "torch": torch.__version__,
    }
    meta = {"conceptctl": json.dumps({"heldout_accuracy": judge_acc, "axes": AXES})}
    save_file({k: v.contiguous() for k, v in judge.net.state_dict().items()},
              str(out / "judge.safetensors"), metadata=meta)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    return report
