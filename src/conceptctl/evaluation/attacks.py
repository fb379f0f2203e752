"""Robustness attacks: can the erased concept be brought back?

Every attack works on the suite's target cases at once (one run, not one per prompt) and returns,
per attacked case, the pictures the erased model drew under attack; the evaluation judges them.
Attack success rate (ASR) = share of attacked cases where at least one attacked picture shows the
concept; the no-attack figure for the same cases and seeds is reported beside it.

``embedding`` (in the spirit of UnlearnDiffAtk, Zhang et al. 2024): a few learnable token
embeddings are put in front of each target prompt, in the text encoder's input-embedding space,
and optimised so that the *erased* model denoises the *original* model's pictures of that prompt
well (the ordinary diffusion loss at random timesteps); then the erased model draws from the
attacked prompt with the case's seeds. UnlearnDiffAtk projects onto vocabulary tokens; these
embeddings stay continuous (a stronger, soft-prompt attacker). It also draws along the way
(``sweep`` budgets, the last its whole budget) for the report's budget sweep.

``paraphrase``: the target cases asked again with other spellings of the concept and whatever
rewordings the suite's vocabulary knows (``Suite.rephrase``; the toy suite: every synonym and
every held-out template, phrasings neither the model nor the erasure trained on).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from conceptctl.backbones.soft_prompt import SoftPromptEncoder
from conceptctl.evaluation.cases import Case
from conceptctl.evaluation.generate import Drawn, draw_cases, draw_embeddings
from conceptctl.text import swap_word


def attack_options(options: dict | None, known: dict[str, type], attack: str) -> dict:
    """The options an attack's factory receives, typed: ``cases`` (from ``--attack-cases``) plus
    the user's ``--attack-option ATTACK.KEY=VALUE`` strings, each converted with ``known[KEY]``.
    An unknown key or a value of the wrong type is a UsageError naming what is accepted."""
    from conceptctl.errors import UsageError

    given = dict(options or {})
    out = {"cases": int(given.pop("cases", 16))}
    for key, value in given.items():
        if key not in known:
            accepted = ", ".join(f"{k} ({t.__name__})" for k, t in known.items()) or "none"
            raise UsageError(f"attack {attack} has no option {key!r}",
                             hint=f"options it accepts: {accepted}")
        try:
            converted = known[key](value)
        except ValueError:
            raise UsageError(f"--attack-option {attack}.{key}={value}: expected "
                             f"{known[key].__name__}") from None
        if isinstance(converted, int | float) and converted <= 0 and key != "seed":
            raise UsageError(f"--attack-option {attack}.{key} must be positive")
        out[key] = converted
    return out


@dataclass
class Attempt:
    case: Case  # the attacked target case
    images: np.ndarray  # uint8 pictures drawn by the erased model under attack
    prompts: list[str] = field(default_factory=list)  # what was asked, for the report
    # Attack steps spent before each picture (0: before the attack), for attacks with a budget
    # that grows picture by picture and stop at a success; the report turns them into the
    # budget sweep, a case counting from its first success on.
    budgets: list[int] | None = None
    # For attacks that run their whole budget: (steps, pictures) the attack would have ended
    # with had it stopped after that many steps, the last entry being ``images`` itself. The
    # report's sweep judges each budget on its own pictures.
    along: list[tuple[int, np.ndarray]] | None = None


def attacked_cases(run, limit: int) -> list[tuple[int, Case]]:
    """(case index, case) of the first ``limit`` cases of the target groups, in-set first."""
    chosen = [(i, c) for i, c in enumerate(run.suite.cases) if c.group == "target"]
    chosen += [(i, c) for i, c in enumerate(run.suite.cases) if c.group == "target-oos"]
    return chosen[:limit]


class EmbeddingAttack:
    name = "embedding"
    options = {"tokens": int, "steps": int, "lr": float, "seed": int, "sweep": int}

    def __init__(self, tokens: int = 3, steps: int = 60, lr: float = 0.01, cases: int = 16,
                 seed: int = 0, sweep: int = 5) -> None:
        self.tokens, self.steps, self.lr, self.cases, self.seed = tokens, steps, lr, cases, seed
        self.sweep = sweep

    def budgets(self) -> list[int]:
        """The step counts after which the attack draws: up to ``sweep`` of them, its whole
        budget and each half of the one above (60, 30, 15, 8, 4). Halving, because on erased
        models most of the change happens in the first few steps."""
        return sorted({max(1, round(self.steps / 2**i)) for i in range(self.sweep)})

    def settings(self) -> dict:
        return {"tokens": self.tokens, "steps": self.steps, "lr": self.lr, "cases": self.cases,
                "seed": self.seed, "sweep": self.budgets(),
                "space": "text-encoder input embeddings (continuous)"}

    def attack(self, run) -> list[Attempt]:
        chosen = attacked_cases(run, self.cases)
        if not chosen:
            return []
        backbone = run.erased_model
        k = run.suite.images_per_prompt
        prompts = [c.prompt for _, c in chosen]
        # What the original model drew for each attacked prompt: the pictures to reproduce.
        goal = torch.stack([run.original.latents[i * k : (i + 1) * k] for i, _ in chosen])
        generator = torch.Generator().manual_seed(self.seed)
        encoder = SoftPromptEncoder(backbone, prompts, self.tokens)
        soft = encoder.random_words(generator).requires_grad_(True)
        optimizer = torch.optim.Adam([soft], lr=self.lr)
        unet = backbone.unet
        unet.requires_grad_(False)
        latents = goal.flatten(0, 1).to(backbone.device, backbone.dtype)  # (cases*k, C, h, w)
        seeds = [c.seed for _, c in chosen]
        guidances = [c.guidance for _, c in chosen]  # a prompt file row's own, if it has one
        along = []  # (steps, pictures of every case) at each budget of the sweep
        budgets = set(self.budgets())
        for step in range(1, self.steps + 1):
            t = torch.randint(0, backbone.num_train_timesteps, (len(latents),),
                              generator=generator).to(backbone.device)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            noisy = backbone.add_noise(latents, noise, t)  # training schedule's ᾱ
            states = encoder(soft).repeat_interleave(k, dim=0)
            pred = unet(noisy, t, states).sample
            loss = F.mse_loss(pred.float(),
                              backbone.training_target(latents, noise, t).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in budgets:
                # Drawn with the same seeds at every budget: the sweep shows what more steps
                # buy the attacker, not what other noise does.
                with torch.no_grad():
                    states = encoder(soft)
                if run.dist.world > 1:  # GPUs may differ in the last bits: the main's prompts
                    run.dist.broadcast_([states])
                along.append((step, draw_embeddings(backbone, states, seeds, run.draw,
                                                    dist=run.dist, guidances=guidances).images))
        attempts = []
        for j, (_, case) in enumerate(chosen):
            mine = [(steps, images[j * k : (j + 1) * k]) for steps, images in along]
            attempts.append(Attempt(case, mine[-1][1],
                                    [f"<{self.tokens} learned tokens> {case.prompt}"],
                                    along=mine))
        return attempts


class ParaphraseAttack:
    name = "paraphrase"
    options = {"per_case": int, "seed": int}

    def __init__(self, cases: int = 16, per_case: int = 8, seed: int = 0) -> None:
        self.cases, self.per_case, self.seed = cases, per_case, seed

    def settings(self) -> dict:
        return {"cases": self.cases, "per_case": self.per_case, "seed": self.seed}

    def attack(self, run) -> list[Attempt]:
        chosen = attacked_cases(run, self.cases)
        rng = random.Random(self.seed)
        variants: list[tuple[int, str]] = []
        for j, (_, case) in enumerate(chosen):
            options = sorted(set(paraphrases(case.prompt, run.concept, run.suite.rephrase))
                             - {case.prompt})
            rng.shuffle(options)
            variants += [(j, text) for text in options[: self.per_case]]
        if not variants:
            return []
        cases = [Case(text, chosen[j][1].seed, n, "attack", guidance=chosen[j][1].guidance)
                 for n, (j, text) in enumerate(variants)]
        drawn: Drawn = draw_cases(run.erased_model, cases, run.draw, dist=run.dist)
        k = run.suite.images_per_prompt
        attempts = []
        for j, (_, case) in enumerate(chosen):
            rows = [n for n, (owner, _) in enumerate(variants) if owner == j]
            if rows:
                images = np.concatenate([drawn.images[n * k : (n + 1) * k] for n in rows])
                attempts.append(Attempt(case, images, [variants[n][1] for n in rows]))
        return attempts


def paraphrases(prompt: str, concept: str,
                rephrase: Callable[[str, str], list[str]] | None = None) -> list[str]:
    """Rewordings of ``prompt`` that still ask for ``concept``: what the suite's vocabulary gives
    (``Suite.rephrase``; the toy's: every synonym, every held-out template), else the concept's
    other spellings (as written, lower case, title case) in place of the one used."""
    if rephrase is not None:
        return list(dict.fromkeys(rephrase(prompt, concept)))
    base = concept.strip()
    return swap_word(prompt, list(dict.fromkeys([base, base.lower(), base.title()])))
