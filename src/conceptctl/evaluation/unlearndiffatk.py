"""UnlearnDiffAtk (Zhang et al., ECCV 2024, "To Generate or Not? Safety-Driven Unlearned
Diffusion Models Are Still Easy to Generate Unsafe Images ... For Now"), as its code runs it
(OPTML-Group/Diffusion-MU-Attack, ``attackers/text_grad_.py`` with ``tasks/classifier_.py``).

Per attacked prompt, ``tokens`` words are put right after the start token. Each word is a
probability vector over the vocabulary; a word is *drawn* from it (a one-hot row, straight-
through: the backward pass hands the gradient, clipped to [-1, 1], to the probabilities), looked
up in the text encoder's embedding table, and the *erased* UNet is asked to denoise the original
model's picture of that prompt, noised at timestep t: the loss is the ordinary diffusion loss.
Adam (lr 0.01, weight decay 0.1) steps the probabilities, which are projected back onto the
probability simplex after every step. The timesteps are taken in order, ``stages`` of them evenly
spread (SD: t = 10, 30, ..., 990), ``steps`` iterations each; after each stage the most likely
word of every vector is taken (a prompt of real words, as a user could type it) and the erased
model draws it. The attack on a prompt succeeds if that picture shows the concept at any stage —
or already before the attack (the original prompt's picture), which the authors count as a
success too: ASR = pre-attack successes + post-attack successes.

Where this differs from the authors' code, and why (docs/evaluate.md says the same):

* the vocabulary is the words a user can type: special tokens and pieces that do not come back
  as themselves when the decoded word is tokenised again (BERT's ``##`` pieces and ``[unused]``
  slots, CLIP's word-inner pieces) are left out, so the recorded prompt draws exactly the tokens
  that were optimised;
* the picture to reproduce is the original model's latent for the case (image 0, the case's
  seed) rather than the VAE mean of that picture re-encoded, and the target is the backbone's
  training target (the noise for epsilon models; v for v-prediction, where the authors' code
  only knows SD 1.x);
* all attacked prompts are optimised in one batch, each with its own noise; a prompt leaves the
  batch when it succeeds (the authors stop there too) if a detector is there to say so.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from conceptctl.backbones.soft_prompt import SoftPromptEncoder
from conceptctl.evaluation.attacks import Attempt, attacked_cases
from conceptctl.evaluation.cases import Case
from conceptctl.evaluation.generate import draw_cases


def project_to_simplex(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row onto {u >= 0, sum(u) = 1} (sort-based, exact).

    The authors bisect for the same threshold to 1e-5 (``TextGrad.bisection``, with an upper
    bound of 1 that never binds on the simplex); a test compares the two."""
    ordered, _ = torch.sort(values, dim=-1, descending=True)
    excess = ordered.cumsum(-1) - 1
    ranks = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    support = (ordered - excess / ranks > 0).sum(-1, keepdim=True)
    threshold = excess.gather(-1, support - 1) / support.to(values.dtype)
    return (values - threshold).clamp_min(0)


class _DrawWord(torch.autograd.Function):
    """One-hot rows drawn from the probability rows; straight-through gradient clipped to [-1, 1]
    (the authors' ``STERandSelect``)."""

    @staticmethod
    def forward(ctx, probs, generator):
        picked = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return F.one_hot(picked, probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


def typeable_tokens(tokenizer) -> torch.Tensor:
    """Ids of the vocabulary words a user can type: not special, and tokenised back to
    themselves when decoded alone (so a prompt of such words, joined by spaces, tokenises to
    exactly those ids)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    words = [tokenizer.decode([i]).strip() for i in ids]
    again = tokenizer(words, add_special_tokens=False).input_ids
    keep = [i for i, word, back in zip(ids, words, again, strict=True)
            if word and back == [i]]
    return torch.tensor(keep, dtype=torch.long)


def stage_timesteps(num_train_timesteps: int, stages: int) -> list[int]:
    """The authors' ``sampled_t``: ``stages`` timesteps evenly spread, in increasing order."""
    stride = num_train_timesteps // stages
    return list(range(stride // 2, num_train_timesteps, stride))[:stages]


class UnlearnDiffAttack:
    name = "unlearndiffatk"
    options = {"tokens": int, "steps": int, "stages": int, "lr": float, "weight_decay": float,
               "seed": int}

    def __init__(self, tokens: int = 3, steps: int = 40, stages: int = 50, lr: float = 0.01,
                 weight_decay: float = 0.1, cases: int = 16, seed: int = 0) -> None:
        self.tokens, self.steps, self.stages, self.lr = tokens, steps, stages, lr
        self.weight_decay, self.cases, self.seed = weight_decay, cases, seed

    def settings(self) -> dict:
        return {"tokens": self.tokens, "steps": self.steps, "stages": self.stages,
                "lr": self.lr, "weight_decay": self.weight_decay, "cases": self.cases,
                "seed": self.seed, "budget_steps": self.steps * self.stages,
                "space": "vocabulary words (discrete), put after the start token"}

    def attack(self, run) -> list[Attempt]:
        chosen = attacked_cases(run, self.cases)
        if not chosen:
            return []
        k = run.suite.images_per_prompt
        # Before the attack: the case's own picture (image 0, the case's seed), as the authors
        # judge the unattacked prompt first and count it when it already shows the concept.
        pictures = [[run.erased.images[i * k]] for i, _ in chosen]
        prompts = [[case.prompt] for _, case in chosen]
        budgets = [[0] for _ in chosen]
        done = self._shown(run, np.stack([p[0] for p in pictures]))
        state = _Search(run, chosen, self)
        draw = dataclasses.replace(run.draw, images_per_prompt=1)
        for stage, t in enumerate(stage_timesteps(run.erased_model.num_train_timesteps,
                                                  self.stages)):
            active = [j for j in range(len(chosen)) if not done[j]]
            if not active:
                break
            state.optimise(active, t, self.steps)
            words = state.words(active)
            attacked = [f"{words[n]} {chosen[j][1].prompt}" for n, j in enumerate(active)]
            cases = [Case(text, chosen[j][1].seed, n, "attack", guidance=chosen[j][1].guidance)
                     for n, (j, text) in enumerate(zip(active, attacked, strict=True))]
            images = draw_cases(run.erased_model, cases, draw, dist=run.dist).images
            shown = self._shown(run, images)
            for n, j in enumerate(active):
                pictures[j].append(images[n])
                prompts[j].append(attacked[n])
                budgets[j].append((stage + 1) * self.steps)
                done[j] = shown[n]
        return [Attempt(case, np.stack(pictures[j]), prompts[j], budgets[j])
                for j, (_, case) in enumerate(chosen)]

    @staticmethod
    def _shown(run, images: np.ndarray) -> list[bool]:
        """Whether each picture shows the concept; all False without a detector (then every
        prompt is attacked for the whole budget, and the evaluation leaves ASR unmeasured)."""
        if run.detector is None:
            return [False] * len(images)
        return [bool(run.detector.shows(label, run.concept))
                for label in run.detector.judge(images)]


class _Search:
    """The word probabilities of every attacked prompt and their optimiser."""

    def __init__(self, run, chosen: list[tuple[int, Case]], attack: UnlearnDiffAttack) -> None:
        backbone = self.backbone = run.erased_model
        self.generator = torch.Generator().manual_seed(attack.seed)
        self.encoder = SoftPromptEncoder(backbone, [case.prompt for _, case in chosen],
                                         attack.tokens)
        self.vocab = typeable_tokens(backbone.tokenizer)
        table = self.encoder.table()  # SDXL: both encoders' embeddings of each word
        self.table = table[self.vocab.to(table.device)].detach()
        k = run.suite.images_per_prompt
        self.goal = torch.stack([run.original.latents[i * k] for i, _ in chosen]).to(
            backbone.device, backbone.dtype)
        # The authors start every word from the uniform distribution (rand_init false).
        self.probs = torch.full((len(chosen), attack.tokens, len(self.vocab)),
                                1 / len(self.vocab), requires_grad=True)
        self.optimizer = torch.optim.Adam([self.probs], lr=attack.lr,
                                          weight_decay=attack.weight_decay)
        self.dist = run.dist

    def optimise(self, active: list[int], t: int, steps: int) -> None:
        backbone = self.backbone
        backbone.unet.requires_grad_(False)
        goal = self.goal[active]
        timesteps = torch.full((len(active),), t, device=backbone.device)
        for _ in range(steps):
            rows = self.probs[active]
            one_hot = _DrawWord.apply(rows.flatten(0, 1), self.generator).view(rows.shape)
            embeds = one_hot.to(self.table.dtype) @ self.table
            states = self.encoder(embeds, rows=active)
            noise = torch.randn(goal.shape, generator=self.generator).to(goal)
            pred = backbone.unet(backbone.add_noise(goal, noise, timesteps), timesteps,
                                 states).sample
            target = backbone.training_target(goal, noise, timesteps)
            # Each prompt's own mean loss, summed: a prompt's gradient does not depend on how
            # many others share the batch.
            loss = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1)
            grad, = torch.autograd.grad(loss.mean(1).sum(), [self.probs])
            self.probs.grad = grad
            self.optimizer.step()
            with torch.no_grad():
                self.probs.copy_(project_to_simplex(self.probs))

    def words(self, active: list[int]) -> list[str]:
        """The most likely word of every vector, decoded: the attack's prompt prefixes."""
        picked = self.probs.detach()[active].argmax(-1)
        if self.dist.world > 1:  # GPUs may differ in the last bits: draw the main's words
            self.dist.broadcast_([picked])
        ids = self.vocab[picked.cpu()]
        return [self.backbone.tokenizer.decode(row.tolist()).strip() for row in ids]
