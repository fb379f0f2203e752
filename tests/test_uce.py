"""``uce`` (Unified Concept Editing) against a transcription of the authors' ``edit_model``
(rohitgandikota/unified-concept-editing, train-scripts/train_erase.py, technique 'replace',
keys and values), and as users run it: seconds, no steps, several concepts at once."""

from __future__ import annotations

import json

import pytest
import torch

from conceptctl.erasure.config import EraseConfig, plan


@pytest.fixture
def backbone(tiny_sd1):
    from conceptctl.backbones.loading import open_backbone

    return open_backbone(str(tiny_sd1), device="cpu", dtype="float32")


def _reference_edit_model(pipe, old_texts, new_texts, ret_texts, lamb=0.5, erase_scale=1.0,
                          preserve_scale=0.1):
    """The authors' edit_model, transcribed (their layer order, their per-layer loop over the
    texts, their token alignment and torch.inverse), returning name -> new weight instead of
    setting them, and with the text encoder's attention mask passed where its config asks (the
    toy's MiniLM; CLIP ignores it either way)."""
    ca_layers = {name: module for name, module in pipe.unet.named_modules()
                 if name.endswith("attn2")}
    projections = [(f"{n}.to_v.weight", m.to_v) for n, m in ca_layers.items()] + \
        [(f"{n}.to_k.weight", m.to_k) for n, m in ca_layers.items()]
    use_mask = getattr(pipe.text_encoder.config, "use_attention_mask", False)

    def encode(texts):
        text_input = pipe.tokenizer(texts, padding="max_length",
                                    max_length=pipe.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
        mask = text_input.attention_mask if use_mask else None
        return text_input, pipe.text_encoder(text_input.input_ids, attention_mask=mask)[0]

    edited = {}
    with torch.no_grad():
        for name, layer in projections:
            mat1 = lamb * layer.weight
            mat2 = lamb * torch.eye(layer.weight.shape[1], dtype=layer.weight.dtype)
            for old_text, new_text in zip(old_texts, new_texts, strict=True):
                text_input, text_embeddings = encode([old_text, new_text])
                final_token_idx = text_input.attention_mask[0].sum().item() - 2
                final_token_idx_new = text_input.attention_mask[1].sum().item() - 2
                farthest = max([final_token_idx_new, final_token_idx])
                old_emb = text_embeddings[0]
                old_emb = old_emb[final_token_idx:len(old_emb) - max(0, farthest
                                                                     - final_token_idx)]
                new_emb = text_embeddings[1]
                new_emb = new_emb[final_token_idx_new:len(new_emb) - max(0, farthest
                                                                         - final_token_idx_new)]
                context = old_emb.detach()
                value = layer(new_emb).detach()
                context_vector = context.reshape(context.shape[0], context.shape[1], 1)
                context_vector_T = context.reshape(context.shape[0], 1, context.shape[1])
                value_vector = value.reshape(value.shape[0], value.shape[1], 1)
                mat1 = mat1 + erase_scale * (value_vector @ context_vector_T).sum(dim=0)
                mat2 = mat2 + erase_scale * (context_vector @ context_vector_T).sum(dim=0)
            for old_text, new_text in zip(ret_texts, ret_texts, strict=True):
                _, text_embeddings = encode([old_text, new_text])
                old_emb, new_emb = text_embeddings
                context = old_emb.detach()
                value = layer(new_emb[:]).detach()
                context_vector = context.reshape(context.shape[0], context.shape[1], 1)
                context_vector_T = context.reshape(context.shape[0], 1, context.shape[1])
                value_vector = value.reshape(value.shape[0], value.shape[1], 1)
                mat1 = mat1 + preserve_scale * (value_vector @ context_vector_T).sum(dim=0)
                mat2 = mat2 + preserve_scale * (context_vector @ context_vector_T).sum(dim=0)
            edited[name] = mat1 @ torch.inverse(mat2)
    return edited


def _uce(backbone, concepts, retain, **scales):
    from conceptctl.erasure.config import Erasure
    from conceptctl.erasure.run import prepare_training

    entries = [Erasure(c, a, "object") for c, a in concepts]
    cfg = EraseConfig(concept=entries[0].concept, anchor=entries[0].anchor,
                      concept_type="object", backbone="x", method="uce",
                      concepts=tuple(map(tuple, entries)) if len(entries) > 1 else (),
                      **{f"uce_{k}": v for k, v in scales.items()})
    training = prepare_training(backbone, cfg)
    with torch.no_grad():
        figures = training.method.edit([(e, None) for e in entries], tuple(retain))
    return training.params, figures


@pytest.mark.parametrize("flavor", ["tiny_sd1", "tiny_sd2"])
def test_uce_equals_the_authors_edit_model(flavor, request):
    from conceptctl.backbones.loading import open_backbone

    path = str(request.getfixturevalue(flavor))
    backbone = open_backbone(path, device="cpu", dtype="float32")
    concepts = [("church", "house"), ("Van Gogh", "painting")]
    retain = ["a photo of a dog", "a red boat on the sea", ""]
    # The reference in float64, so that what differs is our arithmetic, not its rounding (in
    # float32 its torch.inverse alone moves weights by up to 1e-4).
    pipe = open_backbone(path, device="cpu", dtype="float32").pipeline.to(torch.float64)
    reference = _reference_edit_model(pipe, [c for c, _ in concepts], [a for _, a in concepts],
                                      retain)
    params, figures = _uce(backbone, concepts, retain)
    assert set(reference) == set(params) and len(params) > 0
    for name, weight in reference.items():
        assert torch.allclose(params[name].double(), weight, rtol=0, atol=2e-6), name
    assert figures["edited_prompts"] == [["church", "house"], ["Van Gogh", "painting"]]
    assert figures["retain_prompts"] == 3


def test_uce_moves_the_concept_to_its_anchor_and_keeps_the_retain_prompts(backbone):
    """What the solve is for: the concept's tokens now project (nearly) as the anchor's did,
    and the retain prompts' projections barely move."""
    from conceptctl.backbones.soft_prompt import PromptEncoder
    from conceptctl.erasure.uce import aligned_states

    original = {n: p.detach().clone() for n, p in backbone.named_tensors().items()}
    retain = ["a photo of a dog", "a red boat on the sea", "a cat on a chair"]
    params, _ = _uce(backbone, [("church", "house")], retain, erase_scale=10.0)
    encoder = PromptEncoder(backbone, ["church", "house"])
    c, c_star = aligned_states(encoder(), encoder.mask, 0, 1)
    kept = PromptEncoder(backbone, retain)().flatten(0, 1)
    for name, weight in params.items():
        w = original[name]
        before = (c @ w.T - c_star @ w.T).norm()
        after = (c @ weight.T - c_star @ w.T).norm()
        assert after < 0.5 * before, name
        drift = (kept @ weight.T - kept @ w.T).norm() / (kept @ w.T).norm()
        assert drift < 0.2, name


def test_uce_refuses_tensors_it_does_not_edit(backbone):
    from conceptctl.erasure.run import prepare_training
    from conceptctl.errors import UsageError

    cfg = EraseConfig(concept="church", anchor="house", concept_type="object", backbone="x",
                      method="uce", params="full")
    with pytest.raises(UsageError, match="key and value weights only"):
        prepare_training(backbone, cfg)


def test_erase_with_uce_writes_an_artifact_without_steps(tiny_sd1, tmp_path, cli):
    """`conceptctl erase church --anchor house --method uce`: no anchor images, no steps, the
    edit recorded; the artifact loads for sampling like any other."""
    out = tmp_path / "uce"
    result = cli("erase", "church", "airplane", "--anchor", "house", "--method", "uce",
                 "--backbone", str(tiny_sd1), "--output", str(out), "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["steps"] == 0 and summary["seconds"]["anchors"] == 0
    manifest = json.loads((out / "conceptctl.json").read_text())
    assert manifest["method"] == "uce"
    assert [c["concept"] for c in manifest["concepts"]] == ["church", "airplane"]
    assert manifest["edit"]["edited_prompts"] == [["church", "house"], ["airplane", "house"]]
    assert manifest["anchors"]["cache_file"] is None
    card = (out / "README.md").read_text()
    assert "closed form: church → house, airplane → house" in card
    assert "**church**" in card and "**airplane**" in card
    sampled = cli("sample", "a church", "--model", str(out), "--backbone", str(tiny_sd1),
                  "--steps", "2", "--out", str(tmp_path / "pics"), "--json")
    assert sampled.code == 0, sampled.err


def test_uce_with_adversarial_is_refused_in_one_line(tiny_sd1, tmp_path, cli):
    result = cli("erase", "church", "--anchor", "house", "--method", "uce", "--adversarial",
                 "--backbone", str(tiny_sd1), "--output", str(tmp_path / "x"))
    assert result.code != 0
    assert "closed form" in result.err and not (tmp_path / "x").exists()


def test_plan_takes_several_concepts():
    from conceptctl.erasure.config import Erasure

    cfg = plan([Erasure("Van Gogh", "painting"), Erasure("church", "house")], backbone="toy")
    assert cfg.concept == "Van Gogh" and cfg.concept_type == "style"
    assert cfg.erasures() == (Erasure("Van Gogh", "painting", "style"),
                              Erasure("church", "house", "object"))
    assert cfg.for_erasure(cfg.erasures()[1]).concept == "church"


def test_uce_aligns_from_the_first_word_token_where_the_encoder_reads_ahead(backbone, cli,
                                                                              tmp_path):
    """CLIP (tiny SD) reads only the words before a token: the authors' alignment. The toy's
    MiniLM reads both ways, and there Monet's name is spread over `Mon` `##et`: edited from its
    first word token, uce makes the toy forget Monet and still draw Van Gogh (from the last
    word token, Monet stayed in 20 of 20 pictures, docs/erase.md)."""
    from conceptctl.backbones.loading import open_backbone
    from conceptctl.erasure.uce import reads_ahead
    from conceptctl.toy.judge import Judge, load_images

    assert not reads_ahead(backbone)
    assert reads_ahead(open_backbone("toy", device="cpu", dtype="float32"))
    art = tmp_path / "monet"
    made = cli("erase", "Monet", "--anchor", "painting", "--method", "uce", "-o", str(art))
    assert made.code == 0, made.err
    edit = json.loads((art / "conceptctl.json").read_text())["edit"]
    assert edit["aligned_from"] == "first word token"
    prompts = ["a red boat in the style of Monet", "a blue house, painted by Claude Monet",
               "a green tree in the style of Van Gogh", "a yellow boat in the style of Van Gogh"]
    drawn = cli("sample", *prompts, "-n", "2", "--model", str(art), "-o", str(tmp_path / "s"))
    assert drawn.code == 0, drawn.err
    styles = [v.labels["style"] for v in Judge.load().judge(load_images(
        sorted((tmp_path / "s").glob("0*.png"))))]
    assert len(styles) == 8
    assert styles[:4].count("monet") <= 1 and styles[4:].count("van-gogh") >= 3
