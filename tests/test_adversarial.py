"""Adversarial erasure (--adversarial): the inner attack against a transcription of AdvUnlearn's
attack step, what it leaves alone, the attacked rows each method erases on, resumption, and the
settings' checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conceptctl.erasure.anchors import AnchorSet, retain_prompts
from conceptctl.erasure.artifact import read_artifact
from conceptctl.erasure.methods import Batch, PriorBatch, retain_loss, with_attacked_rows
from conceptctl.erasure.run import erase, prepare_training
from conceptctl.testing import tiny_erase_config

PROMPTS = ["a photo of a church", "a church at night", "an old church"]


@pytest.fixture
def backbone(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone

    return open_backbone(str(tiny_sd1), device="cpu", dtype="float32")


def _adversarial_training(backbone, tiny_sd1, **overrides):
    cfg = tiny_erase_config(tiny_sd1, adversarial=True, **overrides)
    training = prepare_training(backbone, cfg, prompts=PROMPTS)
    # Move the student away from the original, as erasure does, so there is something to find.
    with torch.no_grad():
        for p in training.params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return training


def _inputs(backbone, rows: list[int]):
    g = torch.Generator().manual_seed(5)
    x_t = torch.randn((len(rows), backbone.latent_channels, 8, 8), generator=g)
    t = torch.randint(0, backbone.num_train_timesteps, (len(rows),), generator=g)
    return x_t, t, torch.tensor(rows), backbone.encode_prompts([PROMPTS[i] for i in rows])


def reference_attack_step(student, frozen, encode, adv_embedding, z, t, emb_p, lr):
    """Transcription of AdvUnlearn's ``SoftPromptAttack.attack`` loop body (OPTML-Group, prefix_k,
    word_embd, attack_method 'pgd') for one step from ``attack_init='latest'``: e_p is the frozen
    model's prediction for the plain prompt, e_n the model's for the prompt with the adversarial
    word embeddings, loss = MSE(e_n, e_p), then Adam (created for this attack) steps the
    embeddings. ``encode`` stands for construct_embd + text_encoder."""
    adv_embedding = adv_embedding.clone().requires_grad_(True)
    attack_opt = torch.optim.Adam([adv_embedding], lr=lr)
    with torch.no_grad():
        e_p = frozen(z, t, encoder_hidden_states=emb_p).sample
    input_adv_condition_embedding = encode(adv_embedding)
    e_n = student(z, t, encoder_hidden_states=input_adv_condition_embedding).sample
    e_p.requires_grad = False
    loss = torch.nn.MSELoss()(e_n, e_p)
    loss.backward()
    attack_opt.step()
    return adv_embedding.detach()


def test_one_attack_step_is_the_reference_step(backbone, tiny_sd1):
    training = _adversarial_training(backbone, tiny_sd1, adversarial_steps=1,
                                     adversarial_lr=0.05)
    adversary = training.context.adversary
    rows = [2, 0]
    x_t, t, prompts, text = _inputs(backbone, rows)
    before = adversary.words.clone()
    expected = reference_attack_step(
        backbone.unet, training.frozen, lambda e: adversary._encoder(e, rows), before[rows],
        x_t, t, text, lr=0.05)
    # Ours adds one thing after the step: no token longer than the vocabulary's longest word.
    norms = expected.norm(dim=-1, keepdim=True)
    expected = expected * (adversary.max_norm / norms).clamp(max=1.0)
    adversary(x_t, t, prompts, text, step=1)
    torch.testing.assert_close(adversary.words[rows], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(adversary.words[1], before[1])  # a prompt not in the batch is untouched


def test_the_attack_brings_the_concept_back_and_leaves_the_trained_tensors_alone(
        backbone, tiny_sd1):
    training = _adversarial_training(backbone, tiny_sd1, adversarial_steps=10,
                                     adversarial_lr=0.1)
    adversary = training.context.adversary
    rows = [0, 1, 2, 1]  # a prompt twice: one set of words for it
    x_t, t, prompts, text = _inputs(backbone, rows)
    with torch.no_grad():
        goal = training.frozen(x_t, t, text).sample

    def distance(states):
        with torch.no_grad():
            return F.mse_loss(backbone.unet(x_t, t, states).sample, goal).item()

    initial = distance(adversary._encoder(adversary.words[rows], rows))
    attacked = adversary(x_t, t, prompts, text, step=1)
    assert attacked.shape == text.shape and not attacked.requires_grad
    assert distance(attacked) < 0.8 * initial
    assert all(p.grad is None for p in training.params.values())
    assert all(not p.requires_grad for p in backbone.text_encoder.parameters())


def test_the_attack_runs_every_k_steps_and_starts_from_its_last_words(backbone, tiny_sd1):
    training = _adversarial_training(backbone, tiny_sd1, adversarial_steps=2,
                                     adversarial_every=3)
    adversary = training.context.adversary
    x_t, t, prompts, text = _inputs(backbone, [0, 1])
    seen = [adversary.words.clone()]
    for step in range(1, 6):
        adversary(x_t, t, prompts, text, step=step)
        seen.append(adversary.words.clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:], strict=False)]
    assert changed == [True, False, False, True, False]  # steps 1 and 4


def test_no_attacked_token_grows_longer_than_the_longest_word(backbone, tiny_sd1):
    training = _adversarial_training(backbone, tiny_sd1, adversarial_steps=5,
                                     adversarial_lr=1.0)  # a rate that would blow them up
    adversary = training.context.adversary
    x_t, t, prompts, text = _inputs(backbone, [0, 1])
    adversary(x_t, t, prompts, text, step=1)
    longest = backbone.text_encoder.get_input_embeddings().weight.norm(dim=-1).max()
    assert adversary.words[:2].norm(dim=-1).max() <= longest * (1 + 1e-5)
    assert adversary.words[:2].norm(dim=-1).max() >= longest * (1 - 1e-5)


def test_attacked_rows_double_the_batch_and_keep_the_prior(backbone, tiny_sd1):
    training = _adversarial_training(backbone, tiny_sd1)
    ctx = training.context
    x_t, t, prompts, text = _inputs(backbone, [1, 2])
    noise = torch.randn_like(x_t)
    prior = PriorBatch(latents=x_t, text=text + 1, timesteps=t, noise=noise)
    batch = Batch(latents=x_t, anchor_text=text * 0, target_text=text,
                  empty_text=text[:1].expand(2, -1, -1), timesteps=t, noise=noise,
                  prompts=prompts, prior=prior)
    more, x2, n2, t2 = with_attacked_rows(ctx, batch, x_t, noise, t, step=1)
    assert len(more.latents) == len(x2) == len(n2) == len(t2) == 4
    assert torch.equal(x2[2:], x_t) and torch.equal(t2[2:], t) and torch.equal(n2[2:], noise)
    student = more.for_student()
    assert torch.equal(student.target_text[:2], text)
    assert not torch.equal(student.target_text[2:], text)  # the attacked prompts
    # The frozen model keeps the plain prompt on the attacked rows (AdvUnlearn's goal).
    assert torch.equal(more.target_text, torch.cat([text, text]))
    assert torch.equal(more.anchor_text[2:], batch.anchor_text)
    assert torch.equal(student.anchor_text, more.anchor_text)
    assert more.prior is prior and torch.equal(student.prior_text, prior.text)
    training.context.adversary = None
    assert with_attacked_rows(ctx, batch, x_t, noise, t, step=1)[0] is batch


def test_replaced_rows_keep_the_batch_and_put_the_attacked_prompt_in_place(backbone, tiny_sd1):
    training = _adversarial_training(backbone, tiny_sd1, adversarial_rows="replaced")
    ctx = training.context
    x_t, t, prompts, text = _inputs(backbone, [1, 2])
    noise = torch.randn_like(x_t)
    batch = Batch(latents=x_t, anchor_text=text * 0, target_text=text,
                  empty_text=text[:1].expand(2, -1, -1), timesteps=t, noise=noise,
                  prompts=prompts)
    more, x2, n2, t2 = with_attacked_rows(ctx, batch, x_t, noise, t, step=1)
    assert x2 is x_t and n2 is noise and t2 is t and more.latents is batch.latents
    student = more.for_student()
    assert student.target_text.shape == text.shape
    assert not torch.equal(student.target_text, text)  # the attacked prompts, in place
    assert torch.equal(more.target_text, text)  # the frozen model's goal keeps the plain prompt
    assert torch.equal(student.anchor_text, batch.anchor_text)


@pytest.mark.parametrize("method", ["doco", "ca", "esd-x"])
def test_every_method_erases_on_the_attacked_prompts(tiny_sd1, tmp_path, method):
    extra = dict(batch_size=1, warmup=0, params="cross-attn",
                 esd_sampling_steps=4) if method == "esd-x" else {}
    plain = tiny_erase_config(tiny_sd1, method=method, **extra)
    erase(plain, tmp_path / "plain")
    adversarial = plain.with_overrides(adversarial=True, adversarial_steps=2)
    erase(adversarial, tmp_path / "adv")
    erase(adversarial.with_overrides(adversarial_rows="replaced"), tmp_path / "replaced")
    a, b, c = (read_artifact(tmp_path / name) for name in ("plain", "adv", "replaced"))
    assert a.weights.keys() == b.weights.keys() == c.weights.keys()
    assert all(torch.isfinite(v).all() for v in [*b.weights.values(), *c.weights.values()])
    # Same seed, same batches: only the attacked rows can make the difference, and added rows
    # are not replaced ones.
    for one, other in ((a, b), (a, c), (b, c)):
        assert any(not torch.equal(one.weights[k], other.weights[k]) for k in a.weights)
    hyper = b.manifest["hyperparameters"]
    assert hyper["adversarial"] is True and hyper["adversarial_steps"] == 2
    assert hyper["adversarial_rows"] == "added"
    assert c.manifest["hyperparameters"]["adversarial_rows"] == "replaced"
    assert a.manifest["hyperparameters"]["adversarial"] is False


def test_an_adversarial_run_resumes_bit_identically(tiny_sd1, tmp_path):
    cfg = tiny_erase_config(tiny_sd1, adversarial=True, adversarial_every=2,
                            adversarial_steps=2, steps=5, checkpointing_steps=3)
    erase(cfg, tmp_path / "a")
    erase(cfg.with_overrides(steps=3), tmp_path / "b")
    from safetensors.torch import load_file

    saved = [p for p in (tmp_path / "b" / "checkpoint-3").iterdir() if "adversary" in p.name]
    assert saved, "the checkpoint keeps the attacked prompts"
    assert any(v.shape[1] == 3 for f in saved for v in load_file(f).values())
    erase(cfg, tmp_path / "b", resume="latest")
    a, b = read_artifact(tmp_path / "a"), read_artifact(tmp_path / "b")
    for name, tensor in a.weights.items():
        assert torch.equal(tensor, b.weights[name]), name


def test_a_resume_with_another_attack_budget_is_refused(cli, tiny_sd1, tmp_path):
    args = ["erase", "church", "--anchor", "house", "-b", tiny_sd1, "--steps", "2",
            "--warmup", "0", "--batch-size", "1", "--anchor-images", "1",
            "--anchor-prompt-count", "2", "--checkpointing-steps", "1", "--adversarial",
            "-o", tmp_path / "out"]
    assert cli(*args).code == 0
    result = cli(*args, "--adversarial-steps", "9", "--steps", "3", "--resume", "latest")
    assert result.code != 0
    assert "adversarial-steps 4 != 9" in result.err.strip().splitlines()[0]


@pytest.mark.parametrize("flag, value, message", [
    ("--adversarial-lr", "nan", "adversarial-lr must be a finite number"),
    ("--adversarial-lr", "0", "adversarial-lr must be a finite number above 0"),
    ("--adversarial-steps", "0", "adversarial-steps"),
    ("--adversarial-every", "0", "adversarial-every"),
    ("--adversarial-tokens", "0", "adversarial-tokens"),
    ("--adversarial-rows", "both", "unknown adversarial rows 'both'; use added, replaced"),
])
def test_bad_attack_settings_are_one_clear_line(cli, tiny_sd1, tmp_path, flag, value, message):
    result = cli("erase", "church", "--anchor", "house", "-b", tiny_sd1, "--steps", "2",
                 "--warmup", "1", "--adversarial", flag, value, "-o", tmp_path / "out")
    assert result.code != 0
    assert result.err.splitlines()[0].startswith("error:")
    assert message in result.err.splitlines()[0]
    assert not (tmp_path / "out").exists()


def test_the_settings_are_recorded_in_the_run_record(tiny_sd1, tmp_path):
    cfg = tiny_erase_config(tiny_sd1, adversarial=True, adversarial_tokens=2, steps=2,
                            checkpointing_steps=2)
    erase(cfg, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "checkpoint-2" / "config.json").read_text())
    assert record["config"]["adversarial_tokens"] == 2


def test_the_retain_loss_holds_the_original_predictions_for_retain_prompts(backbone, tiny_sd1):
    cfg = tiny_erase_config(tiny_sd1, adversarial=True)
    training = prepare_training(backbone, cfg, prompts=PROMPTS,
                                retain=("a photo of a dog", "a photo of a cat"))
    adversary, ctx = training.context.adversary, training.context
    x_t, t, _, _ = _inputs(backbone, [0, 1])
    # The model is still the original: nothing to hold yet.
    assert adversary.retain_loss(x_t, t, torch.Generator().manual_seed(0)).item() == 0.0
    with torch.no_grad():
        for p in training.params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    # with_attacked_rows doubles the batch: the retain loss takes the batch's own rows only.
    loss = retain_loss(ctx, torch.cat([x_t, x_t]), torch.cat([t, t]))
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in training.params.values())
    off = prepare_training(backbone, cfg.with_overrides(adversarial_retain=0.0), prompts=PROMPTS,
                           retain=("a photo of a dog",))
    assert off.context.adversary.retain_loss(x_t, t, torch.Generator()) is None


def test_the_retain_prompts_come_from_the_file_the_selector_or_coco(tmp_path):
    chosen = AnchorSet(("a painting",), ("a painting, in the style of Monet",),
                       retain=("a cat by Monet", "a photo of a dog"))
    assert retain_prompts(chosen, "Monet") == ("a photo of a dog",)  # never the concept
    bare = AnchorSet(("a photo of a house",), ("a photo of a dog",))
    coco = retain_prompts(bare, "dog")
    # "dog" and "hot dog" name the concept's word: both dropped.
    assert len(coco) == 78 and "a photo of a cat" in coco and "an apple" not in coco
    assert "a photo of an apple" in coco and not any("dog" in p.split() for p in coco)
    file = tmp_path / "keep.txt"
    file.write_text("\ufeff# styles to keep\na painting by Monet\n\na painting by Picasso\n")
    assert retain_prompts(chosen, "Van Gogh", str(file)) == ("a painting by Monet",
                                                              "a painting by Picasso")


def test_the_toy_retain_set_is_its_world_without_the_concept():
    from conceptctl.toy.anchors import toy_anchor_set
    from conceptctl.toy.world import STYLE_WORDS

    style = toy_anchor_set("Van Gogh", "painting", "style")
    assert len(style.retain) == 6 * 3 * 5  # objects x the other styles x colours
    assert not any(word.lower() in p.lower() for p in style.retain
                   for word in STYLE_WORDS["van-gogh"])
    assert any("Picasso" in p for p in style.retain) and any("Monet" in p for p in style.retain)
    obj = toy_anchor_set("church", "house", "object")
    assert len(obj.retain) == 5 * 4 * 5
    assert not any("church" in p or "chapel" in p for p in obj.retain)


@pytest.mark.parametrize("extra, message", [
    ([], "--retain-prompts is only used by adversarial erasure"),
    (["--adversarial"], "retain prompt file not found"),
])
def test_bad_retain_prompts_are_one_clear_line(cli, tiny_sd1, tmp_path, extra, message):
    result = cli("erase", "church", "--anchor", "house", "-b", tiny_sd1, "--steps", "2",
                 "--retain-prompts", tmp_path / "missing.txt", *extra, "-o", tmp_path / "out")
    assert result.code != 0
    assert result.err.strip().splitlines()[0].startswith("error:")
    assert message in result.err.strip().splitlines()[0]
    assert not (tmp_path / "out").exists()
