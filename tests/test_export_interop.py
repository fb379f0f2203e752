"""Our LoRA and diff files, read the way ComfyUI, Automatic1111 and kohya's sd-scripts read them.

None of the three can be installed here, so their key mapping and weight patching are
transcribed below (in our own words, logic unchanged) from the code that does it:

* ComfyUI ``comfy/lora.py`` (``model_lora_keys_unet``, ``model_lora_keys_clip``, ``load_lora``,
  ``calculate_weight``) and ``comfy/utils.py`` (``unet_to_diffusers``), commit 41444b5;
* Automatic1111 1.10 ``extensions-builtin/Lora``: ``networks.py``
  (``convert_diffusers_name_to_compvis``, ``assign_network_names_to_compvis_modules``,
  ``load_network``, ``network_apply_weights``), ``network.py`` (``detect_version``,
  ``finalize_updown``), ``network_lora.py``, ``network_full.py``; ``modules/hashes.py``
  (``addnet_hash_safetensors``);
* kohya's sd-scripts ``networks/merge_lora.py`` (``merge_to_sd_model``), ``networks/lora.py``
  (``LoRANetwork`` target modules) and ``library/train_util.py``
  (``precalculate_safetensors_hashes``).

The models are SD 1.x / 2.x-shaped (four levels of two layers, as A1111's converter assumes)
but tiny, and for ComfyUI also the tiny SDXL. Each UI's model is our original-layout conversion
of the pipeline (tests/test_original_layout.py checks it against diffusers' reader). A file
passes when every key is taken, lands on a tensor of the right shape, and the patched base
equals the erased model.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save

from conceptctl.backbones.backbone import TEXT_ENCODER_PREFIX
from conceptctl.backbones.loading import open_backbone
from conceptctl.erasure.artifact import apply_artifact, read_artifact
from conceptctl.erasure.params import PARAM_GROUPS, select_parameters
from conceptctl.export.run import export_artifact
from conceptctl.interop.original_layout import diffusers_to_original
from conceptctl.testing import build_tiny_pipeline, save_tiny_pipeline, write_test_artifact

# --- ComfyUI -----------------------------------------------------------------------------------

COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2",
                  "self_attn.k_proj": "self_attn_k_proj", "self_attn.q_proj": "self_attn_q_proj",
                  "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
_COMFY_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                 "skip_connection": "conv_shortcut", "in_layers.0": "norm1",
                 "out_layers.0": "norm2"}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_TRANSFORMER = (["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"]
                      + [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v",
                                                                   "to_out.0")])
_COMFY_BASIC = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
                "time_embed.0": "time_embedding.linear_1",
                "time_embed.2": "time_embedding.linear_2"}


def comfy_unet_config(unet) -> dict:
    """The UNet config ComfyUI detects for an SD checkpoint (its SD15 entry reads
    num_res_blocks [2]*4, transformer_depth [1]*6+[0]*2, transformer_depth_output
    [1]*9+[0]*3, the output list popped from the end, i.e. output block 0 last)."""
    layers = unet.config.layers_per_block
    down = [int(t.startswith("CrossAttn")) for t in unet.config.down_block_types]
    up = [int(t.startswith("CrossAttn")) for t in unet.config.up_block_types]
    return {"num_res_blocks": [layers] * len(down),
            "transformer_depth": [d for d in down for _ in range(layers)],
            "transformer_depth_output": [d for d in up for _ in range(layers + 1)][::-1],
            "transformer_depth_middle": 1}


def comfy_unet_to_diffusers(config: dict) -> dict[str, str]:
    """diffusers UNet module path -> original one (``unet_to_diffusers``, weights and biases
    folded into module paths as the key map uses them)."""
    blocks = len(config["num_res_blocks"])
    depth, depth_out = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    table = {}

    def transformer(src, dst, count):
        for b in _COMFY_ATTENTION:
            table[f"{src}.{b}"] = f"{dst}.{b}"
        for t in range(count):
            for b in _COMFY_TRANSFORMER:
                table[f"{src}.transformer_blocks.{t}.{b}"] = f"{dst}.transformer_blocks.{t}.{b}"

    for x in range(blocks):
        n = 1 + (config["num_res_blocks"][x] + 1) * x
        for i in range(config["num_res_blocks"][x]):
            for orig, diff in _COMFY_RESNET.items():
                table[f"down_blocks.{x}.resnets.{i}.{diff}"] = f"input_blocks.{n}.0.{orig}"
            count = depth.pop(0)
            if count:
                transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", count)
            n += 1
        table[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    transformer("mid_block.attentions.0", "middle_block.1", config["transformer_depth_middle"])
    for i, n in enumerate([0, 2]):
        for orig, diff in _COMFY_RESNET.items():
            table[f"mid_block.resnets.{i}.{diff}"] = f"middle_block.{n}.{orig}"
    res = list(reversed(config["num_res_blocks"]))
    for x in range(blocks):
        n, count_layers = (res[x] + 1) * x, res[x] + 1
        for i in range(count_layers):
            c = 1
            for orig, diff in _COMFY_RESNET.items():
                table[f"up_blocks.{x}.resnets.{i}.{diff}"] = f"output_blocks.{n}.0.{orig}"
            count = depth_out.pop()
            if count:
                c += 1
                transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", count)
            if i == count_layers - 1:
                table[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    table.update({diff: orig for orig, diff in _COMFY_BASIC.items()})
    return table


def comfy_key_map(config: dict | None, model_keys) -> dict[str, str]:
    """LoRA key -> model weight key: ``model_lora_keys_unet`` + ``model_lora_keys_clip``.
    ``config`` None (SDXL): the UNet's diffusers names are left out; SDXL files name its
    original modules, which the first loop keys (the diffusers-name table of SDXL's transformer
    depths is not transcribed)."""
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
    for diffusers_module, original in (comfy_unet_to_diffusers(config) if config else {}).items():
        target = f"diffusion_model.{original}.weight"
        key_map["lora_unet_" + diffusers_module.replace(".", "_")] = target
        for prefix in ("", "unet."):  # the only peft-style UNet names ComfyUI keys
            peft = prefix + diffusers_module.replace(".to_", ".processor.to_")
            key_map[peft.removesuffix(".0") if peft.endswith(".to_out.0") else peft] = target
    clip_l_present = False
    for b in range(32):
        for c, lora_c in COMFY_CLIP_MAP.items():
            k = f"clip_h.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model_keys:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
            k = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model_keys:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                key_map[f"lora_te1_text_model_encoder_layers_{b}_{lora_c}"] = k  # SDXL base
                key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
                clip_l_present = True
            k = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in model_keys:
                if clip_l_present:  # SDXL base: bigG is the second encoder
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{lora_c}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = k
                else:  # SDXL refiner: bigG alone
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_c}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
    return key_map


def comfy_load(lora: dict, key_map: dict) -> tuple[dict, list[str]]:
    """``load_lora``: the patches by model key, and the file keys it warns it did not load."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                         (f"{x}.lora_B.weight", f"{x}.lora_A.weight")):
            if up in lora:
                patches[target] = ("lora", lora[up], lora[down], alpha)
                loaded |= {up, down}
                break
        if f"{x}.diff" in lora:
            patches[target] = ("diff", lora[f"{x}.diff"])
            loaded.add(f"{x}.diff")
        if f"{x}.diff_b" in lora:
            patches[target.removesuffix(".weight") + ".bias"] = ("diff", lora[f"{x}.diff_b"])
            loaded.add(f"{x}.diff_b")
    return patches, [k for k in lora if k not in loaded]


def comfy_apply(patches: dict, model: dict) -> dict:
    """``add_patches`` (model keys only) then ``calculate_weight`` at strength 1."""
    out = dict(model)
    for key, patch in patches.items():
        assert key in model, f"ComfyUI has no tensor {key}"
        weight = model[key].float()
        if patch[0] == "diff":
            assert patch[1].shape == weight.shape, f"ComfyUI: shape mismatch, not merged: {key}"
            out[key] = weight + patch[1].float()
        else:
            _, up, down, alpha = patch
            scale = 1.0 if alpha is None else alpha / down.shape[0]
            out[key] = weight + scale * (up.float().flatten(1) @ down.float().flatten(1)
                                         ).reshape(weight.shape)
    return out


def comfy_model(pipe) -> tuple[dict, dict | None]:
    """ComfyUI's state dict of an SD or SDXL checkpoint (its CLIPs in transformers names:
    SDXL's as ``clip_l`` and ``clip_g``) and the UNet config it detects (None for SDXL, see
    :func:`comfy_key_map`)."""
    encoder_2 = getattr(pipe, "text_encoder_2", None)
    original = diffusers_to_original(pipe.unet, pipe.vae, pipe.text_encoder, encoder_2)
    model = {"diffusion_model." + k.removeprefix("model.diffusion_model."): v
             for k, v in original.items() if k.startswith("model.diffusion_model.")}
    if encoder_2 is not None:
        encoders = (("clip_l", pipe.text_encoder), ("clip_g", encoder_2))
    else:
        clip = "clip_h" if pipe.text_encoder.config.hidden_act == "gelu" else "clip_l"
        encoders = ((clip, pipe.text_encoder),)
    for clip, encoder in encoders:
        for k, v in encoder.state_dict().items():
            if k == "text_projection.weight":  # ComfyUI keeps it beside text_model
                model[f"{clip}.transformer.{k}"] = v
            else:
                model[f"{clip}.transformer.text_model.{k.removeprefix('text_model.')}"] = v
    return model, None if encoder_2 is not None else comfy_unet_config(pipe.unet)


# --- Automatic1111 -----------------------------------------------------------------------------

_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                 "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    """``convert_diffusers_name_to_compvis``."""
    def match(pattern):
        found = re.match(pattern, key)
        return found and [int(g) if re.match(r"\d+", g) else g for g in found.groups()]

    def suffix(kind, name):
        return _A1111_RESNET.get(name, name) if kind == "resnets" else name

    if m := match(r"lora_unet_conv_in(.*)"):
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if m := match(r"lora_unet_conv_out(.*)"):
        return f"diffusion_model_out_2{m[0]}"
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        return (f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_"
                f"{1 if m[1] == 'attentions' else 0}_{suffix(m[1], m[3])}")
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        return (f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_"
                f"{suffix(m[0], m[2])}")
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        return (f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_"
                f"{1 if m[1] == 'attentions' else 0}_{suffix(m[1], m[3])}")
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if not is_sd2:
            return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
        if "mlp_fc1" in m[1]:
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


def a1111_model(pipe) -> dict:
    """A1111's tensors by module path: ``sd_model.model`` (``diffusion_model.…``) and
    ``cond_stage_model.wrapped`` (``transformer.text_model.…`` for SD 1, OpenCLIP's
    ``model.transformer.resblocks.…`` for SD 2)."""
    original = diffusers_to_original(pipe.unet, pipe.vae, pipe.text_encoder)
    return {k.removeprefix("model.").removeprefix("cond_stage_model."): v
            for k, v in original.items() if not k.startswith("first_stage_model.")}


def a1111_load(lora: dict, model: dict) -> tuple[dict, list[str]]:
    """``load_network``: network modules by converted key, and the file keys that matched no
    module (A1111 logs those at debug level only)."""
    paths = {".".join(k.split(".")[:i]) for k in model for i in range(1, k.count(".") + 1)}
    mapping = {p.replace(".", "_"): p for p in paths}  # network_layer_mapping
    is_sd2 = "model_transformer_resblocks" in mapping
    matched, failed = {}, []
    for key_network, weight in lora.items():
        base, _, part = key_network.partition(".")
        key = a1111_compvis_name(base, is_sd2)
        module = mapping.get(key)
        if module is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            module = mapping.get(m.group(1))
        if module is None and "lora_unet" in base:
            key = base.replace("lora_unet", "diffusion_model")
            module = mapping.get(key)
        if module is None:
            failed.append(key_network)
            continue
        matched.setdefault(key, (module, {}))[1][part] = weight
    for key, (_, w) in matched.items():  # module_types: lora, ..., full
        assert {"lora_up.weight", "lora_down.weight"} <= set(w) or "diff" in w, (
            f"A1111: no module type accepts {sorted(w)} ({key})")
    return matched, failed


def _a1111_updown(w: dict, weight: torch.Tensor):
    """``calc_updown`` + ``finalize_updown`` at multiplier 1: (weight change, bias change)."""
    if "diff" in w:  # network_full
        bias = w.get("diff_b")
        return w["diff"].float().reshape(weight.shape), None if bias is None else bias.float()
    up, down = w["lora_up.weight"].float(), w["lora_down.weight"].float()  # network_lora
    scale = w["alpha"].item() / down.shape[0] if "alpha" in w else 1.0
    return (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale, None


def a1111_apply(matched: dict, model: dict) -> dict:
    """``network_apply_weights`` on every module whose forward runs."""
    out = {k: v.float() for k, v in model.items()}
    nets = {key: w for key, (_, w) in matched.items()}
    for path in {k.rpartition(".")[0] for k in model}:
        name = path.replace(".", "_")
        # An OpenCLIP MultiheadAttention: q/k/v/out patched together, only if all four exist.
        if f"{path}.in_proj_weight" in model:
            parts = [nets.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            if all(parts):
                chunks = out[f"{path}.in_proj_weight"].chunk(3)
                out[f"{path}.in_proj_weight"] = torch.cat(
                    [c + _a1111_updown(w, c)[0] for c, w in zip(chunks, parts[:3], strict=True)])
                updown, bias = _a1111_updown(parts[3], out[f"{path}.out_proj.weight"])
                out[f"{path}.out_proj.weight"] = out[f"{path}.out_proj.weight"] + updown
                if bias is not None:
                    out[f"{path}.out_proj.bias"] = out[f"{path}.out_proj.bias"] + bias
            continue
        # MultiheadAttention reads its out_proj's weight directly, never calling its forward.
        if path.endswith(".out_proj") and f"{path.rpartition('.')[0]}.in_proj_weight" in model:
            continue
        if name in nets and f"{path}.weight" in model:
            updown, bias = _a1111_updown(nets[name], out[f"{path}.weight"])
            out[f"{path}.weight"] = out[f"{path}.weight"] + updown
            if bias is not None:
                out[f"{path}.bias"] = out[f"{path}.bias"] + bias
    return out


def a1111_detect_version(metadata: dict) -> str:
    """``NetworkOnDisk.detect_version``: which checkpoints the Lora tab lists the file for."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def addnet_hash_safetensors(data: bytes) -> str:
    """``modules/hashes.py``: sha256 of everything after the safetensors header."""
    (length,) = struct.unpack_from("<Q", data)
    return hashlib.sha256(data[8 + length:]).hexdigest()


# --- kohya's sd-scripts ------------------------------------------------------------------------


def kohya_merge(lora: dict, pipe) -> dict:
    """``merge_to_sd_model`` into the diffusers-named weights: LoRA modules are the Linear and
    Conv2d children of Transformer2DModel / ResnetBlock2D / Downsample2D / Upsample2D (UNet,
    kohya's own UNet keeps diffusers' names) and of CLIPAttention / CLIPMLP (its transformers
    4 text encoder, whose paths start with text_model.)."""
    targets = {"unet": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
               "text_encoder": ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")}
    name_to_module = {}
    for part, prefix in (("text_encoder", "lora_te"), ("unet", "lora_unet")):
        root = getattr(pipe, part)
        for name, module in root.named_modules():
            if type(module).__name__ not in targets[part]:
                continue
            for child_name, child in module.named_modules():
                if type(child).__name__ in ("Linear", "Conv2d"):
                    path = f"{name}.{child_name}"
                    named = path if part == "unet" or path.startswith("text_model.") \
                        else "text_model." + path
                    tensor = (TEXT_ENCODER_PREFIX if part == "text_encoder" else "") + path
                    name_to_module[f"{prefix}.{named}".replace(".", "_")] = tensor
    params = {**{k: v.detach() for k, v in pipe.unet.named_parameters()},
              **{TEXT_ENCODER_PREFIX + k: v.detach()
                 for k, v in pipe.text_encoder.named_parameters()}}
    out = {}
    for key in lora:
        if "lora_down" not in key:
            continue
        module = ".".join(key.split(".")[:-2])
        assert module in name_to_module, f"kohya: no module found for LoRA weight {key}"
        down, up = lora[key].float(), lora[key.replace("lora_down", "lora_up")].float()
        alpha = lora.get(key[:key.index("lora_down")] + "alpha", down.shape[0])
        scale = float(alpha) / down.shape[0]
        weight = params[name_to_module[module] + ".weight"].float()
        out[name_to_module[module] + ".weight"] = weight + (
            up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
    return out


# --- the models and files ----------------------------------------------------------------------


def _sd_shaped_unet(cross_attention_dim: int, sd2: bool) -> UNet2DConditionModel:
    """SD's UNet topology (three cross-attention levels and a plain one, two layers each), with
    a few thousand channels in all."""
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(16, 32, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 4, 4) if sd2 else 2, use_linear_projection=sd2,
        norm_num_groups=8)


@pytest.fixture(scope="module")
def sd_shaped(tmp_path_factory):
    """flavor -> (base folder, {params group: artifact}) for SD 1- and SD 2-shaped models."""
    made = {}
    for flavor in ("sd1", "sd2"):
        pipe = build_tiny_pipeline(flavor)
        torch.manual_seed(1)
        pipe.unet = _sd_shaped_unet(pipe.unet.config.cross_attention_dim, flavor == "sd2")
        root = tmp_path_factory.mktemp(f"{flavor}-shaped")
        pipe.save_pretrained(root / "base", safe_serialization=True)
        model = open_backbone(str(root / "base"), device="cpu", dtype="float32")
        groups = {group: sorted(select_parameters(model, group))
                  for group in ("cross-attn-kv", "text-encoder", "full")}
        # One projection of one attention layer: A1111 patches SD 2's fused q/k/v/out only
        # when all four are in the file.
        groups["one-q"] = [n for n in groups["text-encoder"] if "self_attn.q_proj" in n][:1]
        made[flavor] = root / "base", {
            group: write_test_artifact(model, root / group, names=names)
            for group, names in groups.items()}
    return made


def _pipes(base, artifact):
    """(base, erased) pipelines in float32."""
    plain = open_backbone(str(base), device="cpu", dtype="float32").pipeline
    erased = open_backbone(str(base), device="cpu", dtype="float32")
    apply_artifact(erased, read_artifact(artifact))
    return plain, erased.pipeline


def _erased_tensors(artifact, erased_pipe) -> dict:
    """The changed tensors, by name, in the erased pipeline."""
    params = {**dict(erased_pipe.unet.named_parameters()),
              **{TEXT_ENCODER_PREFIX + k: v for k, v in erased_pipe.text_encoder
                 .named_parameters()}}
    return {name: params[name].detach() for name in read_artifact(artifact).weights}


def _check_ui(before: dict, after: dict, erased: dict, exact: bool, what: str):
    """Every tensor of the patched model equals the erased model's: the changed ones (exactly
    for a diff, to float rounding for a full-rank LoRA) and all the others."""
    assert any(not torch.equal(before[k], erased[k]) for k in erased), "nothing to load"
    for key, value in erased.items():
        if exact:
            assert torch.equal(after[key].float(), value.float()), f"{what}: {key}"
        else:
            torch.testing.assert_close(after[key].float(), value.float(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, key=key: f"{what}: {key}: {m}")


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
@pytest.mark.parametrize(("fmt", "group"), [("lora", "cross-attn-kv"), ("lora", "text-encoder"),
                                            ("diff", "full"), ("diff", "text-encoder"),
                                            ("diff", "one-q")])
def test_every_key_loads_in_comfyui_a1111_and_kohya(sd_shaped, flavor, fmt, group, tmp_path):
    base, artifacts = sd_shaped[flavor]
    out = tmp_path / f"{group}.safetensors"
    # The default LoRA naming, at full rank (exact but for float rounding).
    export_artifact(artifacts[group], fmt, out, options={"rank": "1000"} if fmt == "lora" else {})
    lora = load_file(out)
    plain, erased = _pipes(base, artifacts[group])
    exact = fmt == "diff"

    model, config = comfy_model(plain)
    patches, not_loaded = comfy_load(lora, comfy_key_map(config, model))
    assert not not_loaded, f"ComfyUI: lora key not loaded: {not_loaded[:3]}"
    _check_ui(model, comfy_apply(patches, model), comfy_model(erased)[0], exact, "ComfyUI")
    if fmt == "diff":  # biases and norms too
        assert any(k.endswith(".diff_b") for k in lora) == (group == "full")

    model = a1111_model(plain)
    matched, failed = a1111_load(lora, model)
    assert not failed, f"A1111 matched no module for {failed[:3]}"
    _check_ui(model, a1111_apply(matched, model), a1111_model(erased), exact, "A1111")

    merged = kohya_merge(lora, plain)
    if fmt == "diff":  # kohya's scripts merge LoRA keys only
        assert merged == {}
        return
    wanted = _erased_tensors(artifacts[group], erased)
    assert merged.keys() == wanted.keys()
    for name, value in wanted.items():
        torch.testing.assert_close(merged[name], value.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
def test_the_peft_naming_loads_in_neither_ui(sd_shaped, flavor, tmp_path):
    """What --lora-format diffusers' help says: ComfyUI keys none of its UNet layers (only the
    text encoder's, under peft names), A1111 and kohya's merge none at all."""
    base, artifacts = sd_shaped[flavor]
    plain = open_backbone(str(base), device="cpu", dtype="float32").pipeline
    for group in ("cross-attn-kv", "text-encoder"):
        out = tmp_path / f"{group}.safetensors"
        export_artifact(artifacts[group], "lora", out, options={"lora_format": "diffusers"})
        lora = load_file(out)
        model, config = comfy_model(plain)
        patches, not_loaded = comfy_load(lora, comfy_key_map(config, model))
        if group == "cross-attn-kv":
            assert not patches and len(not_loaded) == len(lora)
        else:
            assert not not_loaded and all(k.startswith("clip_") for k in patches)
        matched, failed = a1111_load(lora, a1111_model(plain))
        assert not matched and len(failed) == len(lora)
        assert kohya_merge(lora, plain) == {}  # it merges lora_down/lora_up keys only


@pytest.mark.parametrize(("flavor", "v2", "version", "architecture", "prediction"), [
    ("sd1", "False", "sd_v1", "stable-diffusion-v1/lora", "epsilon"),
    ("sd2", "True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v")])
def test_default_lora_is_kohya_named_with_kohyas_metadata(sd_shaped, flavor, v2, version,
                                                          architecture, prediction, tmp_path):
    base, artifacts = sd_shaped[flavor]
    out = tmp_path / "church.safetensors"
    report = export_artifact(artifacts["cross-attn-kv"], "lora", out,
                             options={"rank": "2"}).report
    assert report["lora_format"] == "kohya"
    lora = load_file(out)
    kv = [n.removesuffix(".weight") for n in read_artifact(artifacts["cross-attn-kv"]).weights]
    assert len(kv) == 2 * 16  # to_k and to_v of SD's 16 cross-attention blocks
    assert set(lora) == {f"lora_unet_{m.replace('.', '_')}.{p}" for m in kv
                         for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert {k: metadata[k] for k in ("ss_v2", "ss_base_model_version", "ss_network_module",
                                     "ss_network_dim", "ss_network_alpha", "ss_network_args",
                                     "modelspec.architecture", "modelspec.prediction_type",
                                     "modelspec.implementation")} == {
        "ss_v2": v2, "ss_base_model_version": version, "ss_network_module": "networks.lora",
        "ss_network_dim": "2", "ss_network_alpha": "2.0", "ss_network_args": "{}",
        "modelspec.architecture": architecture, "modelspec.prediction_type": prediction,
        "modelspec.implementation": "diffusers"}
    assert metadata["modelspec.sai_model_spec"] and metadata["modelspec.title"]
    assert metadata["ss_sd_model_name"] == str(base)
    assert a1111_detect_version(metadata) == flavor.upper()
    assert json.loads(metadata["conceptctl"])["kind"] == "lora"  # our record stays
    # The hashes as kohya precomputes them: A1111 shows this one instead of hashing the file.
    data = out.read_bytes()
    assert metadata["sshs_model_hash"] == addnet_hash_safetensors(data)
    ss_only = save(lora, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["sshs_legacy_hash"] == legacy
    # rank auto gives layers different ranks: kohya calls the dimension "Dynamic".
    export_artifact(artifacts["cross-attn-kv"], "lora", tmp_path / "auto.safetensors",
                    options={"max_error": 0.3})
    with safe_open(str(tmp_path / "auto.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_alpha_is_float32_whatever_the_export_dtype(sd_shaped, tmp_path):
    from conceptctl.export.lora import LayerFactors, kohya_state_dict

    base, artifacts = sd_shaped["sd1"]
    out = tmp_path / "bf16.safetensors"
    export_artifact(artifacts["cross-attn-kv"], "lora", out, dtype="bfloat16")
    lora = load_file(out)
    assert {v.dtype for k, v in lora.items() if k.endswith(".alpha")} == {torch.float32}
    assert {v.dtype for k, v in lora.items() if ".lora_" in k} == {torch.bfloat16}
    # An odd alpha above 256 (the most common rank of a large model's layers) survives.
    layer = LayerFactors("down_blocks.0.attentions.0.proj_in", torch.zeros(4, 267,
                         dtype=torch.bfloat16), torch.zeros(267, 4, dtype=torch.bfloat16),
                         267.0, 267, 1.0, 0.0)
    alpha = kohya_state_dict([layer])["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]
    assert alpha.dtype == torch.float32 and alpha.item() == 267.0
    assert torch.tensor(267.0, dtype=torch.bfloat16).item() == 268.0  # what bfloat16 made of it


# --- the diff in diffusers terms ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("diff-bases")
    return {flavor: save_tiny_pipeline(root / flavor, flavor) for flavor in ("sd1", "sd2")}


def _diffusers_names(pipe) -> dict[str, str]:
    """kohya module name -> diffusers module path, from the pipeline's own modules (as
    diffusers and SD.Next resolve kohya names), plus the one module written under its
    original-layout name (docs/export.md)."""
    names = {"lora_unet_out_0": "conv_norm_out"}
    for name, _ in pipe.unet.named_modules():
        names["lora_unet_" + name.replace(".", "_")] = name
    for name, _ in pipe.text_encoder.named_modules():
        named = name if name.startswith("text_model.") else "text_model." + name
        names["lora_te_" + named.replace(".", "_")] = TEXT_ENCODER_PREFIX + name
    return names


@pytest.mark.parametrize("flavor", ["sd1", "sd2"])
@pytest.mark.parametrize("group", list(PARAM_GROUPS))
def test_diff_round_trip_gives_the_erased_weights(tiny_bases, flavor, group, tmp_path):
    base = tiny_bases[flavor]
    model = open_backbone(str(base), device="cpu", dtype="float32")
    artifact = write_test_artifact(model, tmp_path / "art",
                                   names=sorted(select_parameters(model, group)))
    out = tmp_path / "church.diff.safetensors"
    report = export_artifact(artifact, "diff", out).report
    assert report["max_reapply_error"] == 0.0

    params = {**dict(model.unet.named_parameters()),
              **{TEXT_ENCODER_PREFIX + k: v for k, v in model.text_encoder.named_parameters()}}
    names = _diffusers_names(model.pipeline)
    restored = {}
    for key, value in load_file(out).items():
        module, _, suffix = key.partition(".")
        name = f"{names[module]}.{ {'diff': 'weight', 'diff_b': 'bias'}[suffix] }"
        assert value.dtype == torch.float32 and value.shape == params[name].shape, key
        restored[name] = params[name].detach() + value
    erased = read_artifact(artifact).weights
    moved = {n for n, v in erased.items() if not torch.equal(v, params[n].detach())}
    assert moved and moved <= restored.keys()
    for name, value in restored.items():  # exact; unchanged tensors get zeros, never others
        assert torch.equal(value, erased.get(name, params[name].detach())), name
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["conceptctl"])["base"]["tensors"] == sorted(moved)
    assert a1111_detect_version(metadata) == flavor.upper()
    assert metadata["sshs_model_hash"] == addnet_hash_safetensors(out.read_bytes())
    # diffusers has no SD 1.x / 2.x reader for diff files: it refuses, it does not ignore.
    with pytest.raises(ValueError, match="not been correctly renamed"):
        model.pipeline.load_lora_weights(str(out))


# --- SDXL in ComfyUI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_shaped(tiny_sdxl, tmp_path_factory):
    """{params group: artifact} of the tiny SDXL (test perturbations)."""
    root = tmp_path_factory.mktemp("sdxl-shaped")
    model = open_backbone(str(tiny_sdxl), device="cpu", dtype="float32")
    return {group: write_test_artifact(model, root / group,
                                       names=sorted(select_parameters(model, group)))
            for group in ("cross-attn-kv", "text-encoder", "full")}


@pytest.mark.parametrize(("fmt", "group"), [("lora", "cross-attn-kv"), ("lora", "text-encoder"),
                                            ("diff", "full"), ("diff", "text-encoder")])
def test_sdxl_keys_all_load_in_comfyui(tiny_sdxl, sdxl_shaped, fmt, group, tmp_path):
    """kohya's SDXL names (original UNet modules, lora_te1_ / lora_te2_) are what ComfyUI keys
    for an SDXL checkpoint; A1111 lists the files for SDXL checkpoints."""
    out = tmp_path / f"{group}.safetensors"
    export_artifact(sdxl_shaped[group], fmt, out,
                    options={"rank": "1000"} if fmt == "lora" else {})
    lora = load_file(out)
    plain, erased = _pipes(tiny_sdxl, sdxl_shaped[group])
    model, config = comfy_model(plain)
    patches, not_loaded = comfy_load(lora, comfy_key_map(config, model))
    assert not not_loaded, f"ComfyUI: lora key not loaded: {not_loaded[:3]}"
    after = comfy_apply(patches, model)
    _check_ui(model, after, comfy_model(erased)[0], fmt == "diff", "ComfyUI")
    if group == "text-encoder":  # both encoders patched
        assert {k.split(".")[0] for k in patches} == {"clip_l", "clip_g"}
    with safe_open(str(out), "pt") as f:
        assert a1111_detect_version(f.metadata()) == "SDXL"
