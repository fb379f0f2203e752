"""``--retain-refine``: after training, the key/value edit is pulled back on the retain prompts'
token states in closed form (conceptctl.erasure.refine). Checked against a least-squares solve
written independently, then as users run it: only the key/value tensors change, the retain
prompts' projections come back towards the model the run started from (the base's, when
stacking), and the settings that cannot use it are refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conceptctl.erasure.refine import refine, refined_names

RETAIN = ("a photo of a dog", "a red boat on the sea", "a cat on a chair", "a house")


@pytest.fixture
def backbone(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone

    return open_backbone(str(tiny_sd1), device="cpu", dtype="float32")


def _states(backbone, prompts) -> torch.Tensor:
    """Every token state of ``prompts`` as rows (tokens, width), float64."""
    from conceptctl.backbones.soft_prompt import PromptEncoder

    with torch.no_grad():
        states = backbone.token_states(PromptEncoder(backbone, list(prompts))())
    return states.double().flatten(0, 1)


def _kv(backbone) -> dict:
    from conceptctl.erasure.params import select_parameters

    return select_parameters(backbone, "cross-attn-kv")


def _trained(backbone, seed=0):
    """The key/value tensors moved by seeded noise, as a training run would leave them; the
    originals."""
    params = _kv(backbone)
    before = {n: p.detach().clone() for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    return params, before


@pytest.fixture
def sdxl(tiny_sdxl):
    from conceptctl.backbones.loading import open_backbone

    return open_backbone(str(tiny_sdxl), device="cpu", dtype="float32")


@pytest.mark.parametrize("flavor, scale", [("backbone", 0.05), ("backbone", 1.0),
                                           ("backbone", 30.0), ("sdxl", 1.0)])
def test_refine_is_the_least_squares_solution(flavor, scale, request):
    """W' minimises ‖W' − W‖² + s Σ_j ‖(W' − W₀) ĉ_j‖², ĉ_j the retain states scaled so that
    their Gram matrix has mean eigenvalue 1: solved here as one stacked least-squares problem
    (torch.linalg.lstsq), not through the normal equations refine() uses. SDXL: both encoders'
    states side by side, the pooled row left out (what its keys and values read)."""
    backbone = request.getfixturevalue(flavor)
    params, before = _trained(backbone)
    trained = {n: p.detach().double().clone() for n, p in params.items()}
    figures = refine(params, before, backbone, RETAIN, scale)
    c = _states(backbone, RETAIN)
    width = c.shape[1]
    assert c.shape == (len(RETAIN) * backbone.tokenizers[0].model_max_length,
                       backbone.text_width)
    c_hat = c * (width / c.square().sum()) ** 0.5
    for name, p in params.items():
        w, w0 = trained[name], before[name].double()
        a = torch.cat([torch.eye(width, dtype=torch.float64), scale ** 0.5 * c_hat])
        b = torch.cat([w.T, scale ** 0.5 * c_hat @ w0.T])
        expected = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=2e-5)
    assert figures["tensors"] == len(params) and figures["retain_prompts"] == len(RETAIN)
    assert figures["relative_edit_refined"] < figures["relative_edit_trained"]


def test_refine_at_scale_zero_changes_nothing_and_a_large_scale_restores_the_retain_outputs(
        backbone):
    params, before = _trained(backbone)
    trained = {n: p.detach().clone() for n, p in params.items()}
    refine(params, before, backbone, RETAIN, 0.0)
    for name, p in params.items():
        assert torch.equal(p, trained[name]), name
    c = _states(backbone, RETAIN)
    refine(params, before, backbone, RETAIN, 1e6)
    for name, p in params.items():
        w0 = before[name].double()
        moved = (c @ (trained[name].double() - w0).T).norm()
        left = (c @ (p.detach().double() - w0).T).norm()
        assert left < 1e-3 * moved, name
        # Off the retain span the trained edit stays: the weights are not simply W₀ again.
        assert not torch.allclose(p.detach().double(), w0, rtol=0, atol=1e-6), name


def test_refined_names_are_the_key_and_value_weights():
    names = ["unet.down.attn2.to_k.weight", "unet.down.attn2.to_v.weight",
             "unet.down.attn2.to_q.weight", "unet.down.attn1.to_k.weight",
             "unet.down.attn2.to_out.0.weight", "unet.down.attn2.to_out.0.bias"]
    assert refined_names(names) == names[:2]


def test_erase_with_retain_refine_changes_only_keys_and_values_towards_the_original(
        tiny_sd1, tmp_path):
    """Two runs alike but for --retain-refine: the same trained tensors everywhere else (the
    step comes after training), the keys and values closer to the original on the retain
    prompts, the step recorded in the manifest and the settings."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.artifact import read_artifact
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RETAIN) + "\n")
    plain = tiny_erase_config(tiny_sd1, params="cross-attn", retain_prompts=str(retain))
    # The plain run needs --retain-prompts to be legal only with --retain-refine: build it bare.
    erase(replace(plain, retain_prompts=None), tmp_path / "plain")
    erase(replace(plain, retain_refine=0.5), tmp_path / "refined")
    a = read_artifact(tmp_path / "plain").weights
    b = read_artifact(tmp_path / "refined").weights
    kv = refined_names(a)
    assert kv and set(a) == set(b) and len(kv) < len(a)
    for name in set(a) - set(kv):  # queries and outputs: untouched by the step
        assert torch.equal(a[name], b[name]), name
    original = {n: t.detach() for n, t in
                open_backbone(str(tiny_sd1), device="cpu", dtype="float32")
                .named_tensors().items()}
    c = _states(open_backbone(str(tiny_sd1), device="cpu", dtype="float32"), RETAIN)
    for name in kv:
        w0 = original[name].double()
        assert ((c @ (b[name].double() - w0).T).norm()
                < (c @ (a[name].double() - w0).T).norm()), name
    manifest = json.loads((tmp_path / "refined" / "conceptctl.json").read_text())
    assert manifest["refine"]["scale"] == 0.5
    assert manifest["refine"]["retain_prompts"] == len(RETAIN)
    assert manifest["refine"]["tensors"] == len(kv)
    assert manifest["hyperparameters"]["retain_refine"] == 0.5
    assert "refine" not in json.loads((tmp_path / "plain" / "conceptctl.json").read_text())
    card = (tmp_path / "refined" / "README.md").read_text()
    assert f"retain refinement | S 0.5, {len(RETAIN)} retain prompts" in card
    assert "retain refinement" not in (tmp_path / "plain" / "README.md").read_text()


def test_a_stacked_run_refines_towards_its_base_not_the_original(tiny_sd1, tmp_path):
    """Stacking: W₀ is the model the run starts from. With a very large scale the keys and
    values give the base's projections on the retain prompts, not the original's."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.artifact import read_artifact
    from conceptctl.erasure.run import erase
    from conceptctl.testing import tiny_erase_config

    erase(tiny_erase_config(tiny_sd1, method="uce"), tmp_path / "A")
    retain = tmp_path / "retain.txt"
    retain.write_text("\n".join(RETAIN) + "\n")
    stacked = tiny_erase_config(tiny_sd1, concept="airplane", anchor="tree",
                                base_artifact=str(tmp_path / "A"), retain_refine=1e6,
                                retain_prompts=str(retain))
    erase(stacked, tmp_path / "B")
    base = read_artifact(tmp_path / "A").weights
    top = read_artifact(tmp_path / "B", follow_chain=False).weights
    original = open_backbone(str(tiny_sd1), device="cpu", dtype="float32").named_tensors()
    c = _states(open_backbone(str(tiny_sd1), device="cpu", dtype="float32"), RETAIN)
    for name in refined_names(top):
        from_base = (c @ (top[name].double() - base[name].double()).T).norm()
        base_edit = (c @ (base[name].double() - original[name].detach().double()).T).norm()
        assert from_base < 1e-2 * base_edit, name


@pytest.mark.parametrize("extra, message", [
    (["--method", "uce", "--retain-refine", "0.1"], "--retain-refine refines a trained edit"),
    (["--params", "text-encoder", "--retain-refine", "0.1"],
     "--retain-refine refines the cross-attention key/value projections"),
    (["--retain-refine", "-1"], "retain-refine must be a finite number, 0 or more"),
    (["--retain-refine", "nan"], "retain-refine must be a finite number"),
])
def test_settings_that_cannot_refine_are_one_clear_line(cli, tiny_sd1, tmp_path, extra, message):
    result = cli("erase", "church", "--anchor", "house", "-b", tiny_sd1, "--steps", "2",
                 *extra, "-o", tmp_path / "out")
    assert result.code != 0
    first = result.err.strip().splitlines()[0]
    assert first.startswith("error:") and message in first, result.err
    assert not (tmp_path / "out").exists()
