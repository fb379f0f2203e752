"""The `unlearndiffatk` attack: its parts against a transcription of the authors' code
(OPTML-Group/Diffusion-MU-Attack, attackers/text_grad_.py), and a run end to end on the toy."""

import json

import numpy as np
import pytest
import torch

from conceptctl.evaluation.run import budget_sweep
from conceptctl.evaluation.unlearndiffatk import (
    _DrawWord,
    project_to_simplex,
    stage_timesteps,
    typeable_tokens,
)


# --- transcription of the reference (TextGrad.bisection / projection, STERandSelect) ---------
def _reference_bisection(a, eps, xi=1e-5, ub=1):
    pa = torch.clip(a, 0, ub)
    if np.abs(torch.sum(pa).item() - eps) <= xi:
        return pa
    mu_l = torch.min(a - 1).item()
    mu_u = torch.max(a).item()
    while np.abs(mu_u - mu_l) > xi:
        mu_a = (mu_u + mu_l) / 2
        gu = torch.sum(torch.clip(a - mu_a, 0, ub)) - eps
        gu_l = torch.sum(torch.clip(a - mu_l, 0, ub)) - eps + 1e-8
        gu_u = torch.sum(torch.clip(a - mu_u, 0, ub)) - eps
        if gu == 0:
            break
        elif gu_l == 0:
            mu_a = mu_l
            break
        elif gu_u == 0:
            mu_a = mu_u
            break
        if gu * gu_l < 0:
            mu_u = mu_a
        elif gu * gu_u < 0:
            mu_l = mu_a
        else:
            raise AssertionError("bisection lost its bracket")
    return torch.clip(a - mu_a, 0, ub)


def _reference_projection(curr_var, xi=1e-5):
    curr_var = torch.squeeze(curr_var, dim=0)
    rows = [_reference_bisection(curr_var[i], eps=1, xi=xi, ub=1) for i in range(len(curr_var))]
    return torch.stack(rows, dim=0).unsqueeze(0)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform-after-a-step", "spread", "one-large", "negative"])
def test_projection_onto_the_simplex_matches_the_reference_bisection(kind):
    g = torch.Generator().manual_seed(0)
    vocab = 2000
    if kind == "uniform-after-a-step":  # the attack's first step from the uniform start
        values = torch.full((3, vocab), 1 / vocab) + 0.01 * torch.randn(3, vocab, generator=g)
    elif kind == "spread":
        values = torch.rand(3, vocab, generator=g)
    elif kind == "one-large":
        values = torch.rand(3, vocab, generator=g) * 1e-3
        values[:, 7] = 1.5
    else:
        values = torch.randn(3, vocab, generator=g) - 0.5
    values = values.double()
    ours = project_to_simplex(values)
    theirs = _reference_projection(values.unsqueeze(0))[0]
    assert torch.all(ours >= 0) and torch.allclose(ours.sum(-1), torch.ones(3, dtype=ours.dtype))
    assert (ours - theirs).abs().max() < 1e-4  # the reference stops bisecting at 1e-5
    # A point already on the simplex stays where it is.
    assert torch.allclose(project_to_simplex(ours), ours, atol=1e-12)


def test_drawn_words_are_one_hot_samples_with_a_clipped_straight_through_gradient():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]],
                         requires_grad=True)
    g = torch.Generator().manual_seed(0)
    one_hot = _DrawWord.apply(probs, g)
    assert one_hot[0].tolist() == [0, 1, 0] and one_hot[1].tolist() == [0, 0, 1]
    assert one_hot[2].sum() == 1 and one_hot[2, 2] == 0
    upstream = torch.tensor([[3.0, -0.2, -7.0]] * 3)
    (one_hot * upstream).sum().backward()
    assert torch.equal(probs.grad, torch.tensor([[1.0, -0.2, -1.0]] * 3))  # hardtanh of it
    # The same generator seed draws the same words.
    again = _DrawWord.apply(probs, torch.Generator().manual_seed(0))
    assert torch.equal(again, one_hot)


def test_timesteps_are_the_authors_sampled_t():
    assert stage_timesteps(1000, 50) == list(range(10, 1000, 20))
    assert stage_timesteps(1000, 4) == [125, 375, 625, 875]


@pytest.mark.parametrize("which", ["toy", "tiny-clip"])
def test_typeable_words_tokenise_back_to_themselves_in_a_prompt(which):
    if which == "toy":
        from conceptctl.toy.model import load_text_encoder

        _, tok = load_text_encoder()
    else:
        from conceptctl.testing import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
    vocab = typeable_tokens(tok)
    assert not set(vocab.tolist()) & set(tok.all_special_ids)
    if which == "toy":
        kept = set(tok.convert_ids_to_tokens(vocab.tolist()))
        assert "church" in kept and "##ing" not in kept and "[unused0]" not in kept
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        words = vocab[torch.randint(0, len(vocab), (3,), generator=g)].tolist()
        prompt = f"{tok.decode(words).strip()} a red church"
        ids = tok(prompt).input_ids
        plain = tok("a red church").input_ids
        assert ids == plain[:1] + words + plain[1:]


def test_budget_sweep_counts_a_case_from_its_first_success_on():
    spent = [[(0, False), (40, False), (80, True)],  # succeeds at 80 and leaves the attack
             [(0, True)],  # already shows the concept before the attack
             [(0, False), (40, False), (80, False), (120, False)]]
    assert budget_sweep(spent) == [
        {"steps": 0, "success_rate": pytest.approx(1 / 3)},
        {"steps": 40, "success_rate": pytest.approx(1 / 3)},
        {"steps": 80, "success_rate": pytest.approx(2 / 3)},
        {"steps": 120, "success_rate": pytest.approx(2 / 3)}]


@pytest.mark.slow
def test_toy_eval_runs_the_attack_counts_pre_attack_successes_and_records_prompts(cli, tmp_path):
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config
    from conceptctl.toy.judge import Judge, load_images

    art = tmp_path / "church"
    erase(tiny_erase_config("toy", steps=2, checkpointing_steps=2, warmup=1,
                            anchor_images_per_prompt=1, anchor_steps=4), art)
    prompts = tmp_path / "church.csv"
    prompts.write_text("prompt,evaluation_seed,case_number\na red church,0,0\n"
                       "a blue church in the style of Monet,1,1\n"
                       # No church to find before the attack: the attack runs its stages.
                       "a green house,2,2\n")
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = cli("eval", art, "--prompts", prompts, "--steps", "3", "-n", "1",
                     "--metrics", "erasure",
                     "--attacks", "unlearndiffatk", "--attack-cases", "3",
                     "--attack-option", "unlearndiffatk.stages=2",
                     "--attack-option", "unlearndiffatk.steps=2", "-o", out)
        assert result.code == 0, result.err
        runs.append(json.loads((out / "report.json").read_text())["attacks"][0])
    attack = runs[0]
    assert attack["attack"] == "unlearndiffatk" and attack["cases"] == 3
    assert attack["settings"]["budget_steps"] == 4 and attack["settings"]["tokens"] == 3
    assert [r["attacked_prompts"] for r in runs[0]["rows"]] == [
        r["attacked_prompts"] for r in runs[1]["rows"]]  # deterministic
    judge = Judge.load()
    firsts = []
    for row in attack["rows"]:
        prompts = row["attacked_prompts"]
        assert prompts[0] == row["prompt"]  # the picture before the attack comes first
        for text in prompts[1:]:  # three vocabulary words, then the prompt
            assert text.endswith(" " + row["prompt"]) and len(
                text[: -len(row["prompt"])].split()) == 3
        shown = [v.labels["object"] == "church"
                 for v in judge.judge(load_images([tmp_path / "a" / f for f in row["files"]]))]
        assert len(shown) == len(prompts) and not any(shown[:-1])  # it stops at a success
        assert len(shown) == 3 or shown[-1]
        firsts.append(next((b for b, s in zip((0, 2, 4), shown, strict=False) if s), None))
    assert attack["success_rate"] == pytest.approx(np.mean([f is not None for f in firsts]))
    assert any(len(r["attacked_prompts"]) > 1 for r in attack["rows"])  # it ran
    spent = sorted({b for r in attack["rows"] for b in (0, 2, 4)[:len(r["attacked_prompts"])]})
    assert "attack budget sweep" in (tmp_path / "a" / "report.html").read_text()
    # The same attack on the original model: before any step, its own pictures as judged.
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    before = np.mean([r["original"]["labels"]["object"] == "church" for r in report["images"]])
    assert attack["original_sweep"][0] == {"steps": 0, "success_rate": pytest.approx(before)}
    assert attack["sweep"] == [
        {"steps": b, "success_rate": pytest.approx(np.mean(
            [f is not None and f <= b for f in firsts]))} for b in spent]
