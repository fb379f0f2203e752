"""Adversarial erasure (``--adversarial``): an attack inside training, in the spirit of AdvUnlearn
(Zhang et al., NeurIPS 2024, OPTML-Group/AdvUnlearn).

Every ``every`` generator steps, an inner attacker looks for prompts that bring the concept back
on the model *as it is now*: ``tokens`` input embeddings put after the start token of each target
prompt of the batch (continuous, in the text encoder's input-embedding space, as AdvUnlearn's
``prefix_k`` word-embedding attack), stepped ``steps`` times by Adam so that the student's
prediction for the attacked prompt matches the original model's prediction for the plain target
prompt on the batch's own x_t: the concept as the original drew it. The outer step then erases
on the attacked prompts as extra target rows, next to the usual ones (same anchor latents, t and
ε); preservation keeps its own prior batch, and adds AdvUnlearn's retain loss: on the batch's
x_t, the model's prediction for a random retain prompt (one without the concept) is held to the
original model's, with weight ``retain_weight`` (AdvUnlearn's ``retain_loss_w``, 1).

Each target prompt keeps its attack between refreshes and the next attack starts from it
(AdvUnlearn's ``--attack_init latest``): an adversary that follows the model through training
for the cost of a few steps per refresh. These embeddings are part of the run's state
(checkpointed and resumed with it); they are not part of the artifact.

With ``--params text-encoder`` (AdvUnlearn's own setting) the attacked and retain prompts are
encoded by the text encoder being trained, with gradients, so the outer step trains the encoder
on them; the original model's side keeps the original encoder's embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conceptctl.backbones.soft_prompt import PromptEncoder, SoftPromptEncoder
from conceptctl.erasure.params import trains_text_encoder
from conceptctl.errors import UsageError

# Where the attacked prompts go in the outer step: "added", one more row per row of the batch
# (the plain target prompt keeps its row), or "replaced", in place of the plain prompt's row, as
# AdvUnlearn's outer loss takes the adversarial prompt alone once the warm-up is over.
ADVERSARIAL_ROWS = ("added", "replaced")


class PromptAdversary(torch.nn.Module):
    """The inner attacker: one set of ``tokens`` embeddings per target prompt (a buffer, so the
    checkpoint carries it)."""

    def __init__(self, backbone, frozen_unet: torch.nn.Module, prompts: list[str], *,
                 tokens: int, steps: int, every: int, lr: float, seed: int,
                 world: int = 1, retain: tuple[str, ...] = (),
                 retain_weight: float = 1.0, trains_text_encoder: bool = False,
                 rows: str = "added") -> None:
        super().__init__()
        if world > 1:
            raise UsageError("--adversarial runs in one process only",
                             hint="run it without 'accelerate launch'")
        # Plain attributes, not submodules: their weights must stay out of this state_dict.
        self.__dict__["_backbone"] = backbone
        self.__dict__["_frozen"] = frozen_unet
        self.__dict__["_encoder"] = SoftPromptEncoder(backbone, prompts, tokens)
        self.tokens, self.steps, self.every, self.lr = tokens, steps, every, lr
        if rows not in ADVERSARIAL_ROWS:
            raise ValueError(f"rows must be one of {ADVERSARIAL_ROWS}, not {rows!r}")
        self.replaces = rows == "replaced"
        self.retain_weight = retain_weight if retain else 0.0
        # The original model's side, encoded once by the original text encoder (this runs
        # before any step, and before a resumed run's weights load); not state: the settings
        # rebuild them. The student's side: the same prompts, afresh when the encoder trains.
        with torch.no_grad():
            self.__dict__["_retain"] = backbone.encode_prompts(list(retain)) if retain else None
        self.__dict__["_retain_student"] = (PromptEncoder(backbone, list(retain))
                                            if retain and trains_text_encoder else None)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("words", self._encoder.random_words(generator))
        # The attack stays among word-sized embeddings: no soft token longer than the longest
        # word of the vocabulary. Unbounded, the warm-started tokens drift to several times
        # that (measured: 3.3 against words' 1.07 on the toy), far from any prompt a user can
        # type. (The bound alone did not stop DoCo moving other styles; see docs/erase.md.)
        table = self._encoder.table()  # SDXL: both encoders' embeddings of each word
        self.max_norm = float(table.detach().float().norm(dim=-1).max())

    def due(self, step: int) -> bool:
        """Whether the attack runs before generator step ``step`` (it runs at the first one)."""
        return (step - 1) % self.every == 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompts: torch.Tensor,
                target_text: torch.Tensor, step: int) -> torch.Tensor:
        """Encoder states of the attacked target prompts (one per row of the batch), after
        refreshing the attack on these rows when it is due. Gradients flow out to the text
        encoder's weights when they train, never to the attack's embeddings."""
        rows = prompts.cpu()
        if self.due(step):
            self._refresh(x_t, t, rows, target_text)
        return self._encoder(self.words[rows], rows.tolist()).to(target_text.dtype)

    def retain_loss(self, x_t: torch.Tensor, t: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor | None:
        """``retain_weight`` × MSE between the model's and the original's predictions for one
        random retain prompt per row on ``x_t``; None without retain prompts or weight."""
        if not self.retain_weight:
            return None
        pick = torch.randint(0, len(self._retain), (len(x_t),), generator=generator)
        text = self._retain[pick].to(device=x_t.device, dtype=x_t.dtype)
        with torch.no_grad():
            goal = self._frozen(x_t, t, text).sample
        if self._retain_student is not None:
            text = self._retain_student(pick).to(x_t.dtype)
        pred = self._backbone.unet(x_t, t, text).sample
        return self.retain_weight * F.mse_loss(pred.float(), goal.float())

    def _refresh(self, x_t, t, rows: torch.Tensor, target_text) -> None:
        backbone = self._backbone
        unet = backbone.unet
        # What the original model predicts for the plain target prompt: the concept to recover.
        with torch.no_grad():
            goal = self._frozen(x_t, t, target_text).sample.float()
        unique, inverse = rows.unique(return_inverse=True)
        soft = self.words[unique].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([soft], lr=self.lr)  # afresh each refresh, as AdvUnlearn
        listed = rows.tolist()
        for _ in range(self.steps):
            states = self._encoder(soft[inverse], listed)
            pred = unet(x_t, t, states.to(x_t.dtype)).sample
            loss = F.mse_loss(pred.float(), goal)
            # Only the embeddings' gradient: the trained tensors must not collect any.
            (grad,) = torch.autograd.grad(loss, [soft])
            soft.grad = grad
            optimizer.step()
            with torch.no_grad():
                norms = soft.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                soft.mul_((self.max_norm / norms).clamp(max=1.0))
        self.words[unique] = soft.detach()


def build_adversary(backbone, frozen_unet, cfg, prompts: list[str], world: int = 1,
                    retain: tuple[str, ...] = ()):
    """The run's inner attacker, or None without ``--adversarial``."""
    if not cfg.adversarial:
        return None
    return PromptAdversary(backbone, frozen_unet, prompts, tokens=cfg.adversarial_tokens,
                           steps=cfg.adversarial_steps, every=cfg.adversarial_every,
                           lr=cfg.adversarial_lr, seed=cfg.seed, world=world, retain=retain,
                           retain_weight=cfg.adversarial_retain,
                           trains_text_encoder=trains_text_encoder(cfg.params),
                           rows=cfg.adversarial_rows)
