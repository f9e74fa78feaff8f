"""Tiny randomly initialised models, one per architecture people serve, built on the spot (no weights are
fetched): two to six layers of width 128 (heads of 64: the CPU attention kernels take no smaller), a 512-token vocabulary, a training context L of 256.

``build(arch, folder)`` writes a transformers checkpoint (safetensors and config, no tokenizer: engines run
with ``skip_tokenizer_init`` on token ids) that vLLM loads as the real architecture. Seeds are fixed, so
the same folder always holds the same weights. What each one exercises:

- ``Qwen2ForCausalLM``: attention biases; ``Qwen3ForCausalLM``: q/k norms before RoPE, explicit head_dim;
- ``MistralForCausalLM``: the Mistral code path (no sliding window);
- ``Gemma3ForCausalLM``: local (sliding-window) and global layers with two RoPE bases; only the global
  layers are scaled, as Gemma 3 configs do (``rope_parameters`` per layer type);
- ``Phi3ForCausalLM``: a partial rotary dimension (half the head);
- ``Qwen3MoeForCausalLM``: Qwen3's attention (q/k norms) with mixture-of-experts MLPs (4 experts, 2 per
  token; vLLM's fused MoE).

:data:`MROPES` are vision-language models whose language model takes multimodal rotary positions (mRoPE,
``[3, num_tokens]``): ``PaddleOCRVLForConditionalGeneration`` (Ernie 4.5, chunked sections 8/12/12 of a 64-wide
head; its vision tower one tiny SigLIP layer) and ``Qwen3VLForConditionalGeneration`` (Qwen3's text model,
interleaved sections; a two-block vision tower with a deepstack feature). Each comes with a word-level
tokenizer (``w7`` ... ``w511``, and the image markers) and the model's own transformers image processor, kept
to small images, so prompts with images run through vLLM's and transformers' own processing. :func:`variant`
gives them other text RoPE parameters over the same weights (transformers cannot build a dynamic rope type, so
configs are written, not built).

:data:`HYBRIDS` have the hybrid layout of Qwen3-Next and Qwen3.5: Gated DeltaNet (linear attention, no RoPE)
and gated full-attention layers alternating, the full-attention ones with a partial rotary dimension (a quarter
of the head, as the real models): ``Qwen3NextForCausalLM`` (MoE MLPs with a shared expert), and Qwen3.5's
``Qwen3_5ForConditionalGeneration`` (dense) and ``Qwen3_5MoeForConditionalGeneration``, whose text models keep
Qwen3.5's interleaved mRoPE (sections scaled to the tiny head) and who carry a tiny vision tower. vLLM CPU's
Gated DeltaNet runs in bfloat16 only, so they are tested in bfloat16 (``test_engine_hybrid.py``).

vLLM's Qwen3.5 and Qwen3-VL model files import torchvision; :func:`unloadable` says so where none loads.

:func:`mtp_target` gives a Qwen3-Next with its own MTP layer built the same way (``test_engine_mtp.py``).
:func:`eagle_pair` gives a Mistral target and an EAGLE drafter (vLLM's ``EagleLlamaForCausalLM``) made of the
target's own layers, which drafts what the target computes (so speculative acceptance measures whether the
drafter rotates at the target's scale).

:func:`rope_parameters` gives the ``hf_overrides`` that make one dynamic, or static YaRN (the oracle), in
each architecture's own layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

L = 256
HEAD = 64
ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Gemma3ForCausalLM",
                 "Phi3ForCausalLM", "Qwen3MoeForCausalLM")
HYBRID = "Qwen3NextForCausalLM"
# Qwen3.5's hybrid layout with its interleaved partial mRoPE (vLLM's model files need torchvision)
QWEN35, QWEN35_MOE = "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"
HYBRIDS = (HYBRID, QWEN35, QWEN35_MOE)
MROPE = "PaddleOCRVLForConditionalGeneration"
QWEN3VL = "Qwen3VLForConditionalGeneration"  # interleaved mRoPE, a vision tower with deepstack (needs torchvision)
MROPES = (MROPE, QWEN3VL)
# Each mRoPE model's text rotary layout: PaddleOCR-VL's chunked 8/12/12; Qwen3-VL's interleaved [24, 20, 20]
# and Qwen3.5's [11, 11, 10] (of a 32-wide rotary half) scaled to the tiny heads (Qwen3.5's rotary half is 8).
MROPE_LAYOUT: dict[str, dict[str, Any]] = {
    MROPE: {"mrope_section": [8, 12, 12]}, QWEN3VL: {"mrope_section": [12, 10, 10], "mrope_interleaved": True},
    **{arch: {"mrope_section": [3, 3, 2], "mrope_interleaved": True} for arch in (QWEN35, QWEN35_MOE)}}
# The vision-language models' special tokens: the first seven ids of the tiny vocabulary, the image's start,
# placeholder and end at 3, 4 and 5.
SPECIALS = {MROPE: ("<unk>", "<s>", "</s>", "<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|VIDEO|>"),
            QWEN3VL: ("<unk>", "<s>", "</s>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")}
PARTIAL_ROTARY = {"Phi3ForCausalLM": 0.5, HYBRID: 0.25, QWEN35: 0.25, QWEN35_MOE: 0.25}
BASES = {"Gemma3ForCausalLM": {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}}
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=512, max_position_embeddings=L, tie_word_embeddings=False)
# Qwen3-Next's and Qwen3.5's layers: a linear-attention layer after each full-attention one (its state depends
# on the scale), and their MoE MLPs with a shared expert
HYBRID_LAYERS = {"num_hidden_layers": 4, "head_dim": HEAD, "layer_types": ["linear_attention", "full_attention"] * 2,
                 "linear_num_value_heads": 2, "linear_num_key_heads": 1, "linear_key_head_dim": HEAD,
                 "linear_value_head_dim": HEAD, "linear_conv_kernel_dim": 4}
HYBRID_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
              "shared_expert_intermediate_size": 128}
# Qwen3-VL's and Qwen3.5's vision tower, tiny: 16-pixel patches merged 2 x 2
QWEN_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2,
               "temporal_patch_size": 2, "out_hidden_size": COMMON["hidden_size"], "num_position_embeddings": 64}


def _config(arch: str):
    import transformers

    if arch == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**COMMON, rope_theta=10_000.0)
    if arch == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(**COMMON, head_dim=HEAD, rope_theta=10_000.0)
    if arch == "MistralForCausalLM":
        return transformers.MistralConfig(**COMMON, head_dim=HEAD, rope_theta=10_000.0, sliding_window=None)
    if arch == "Gemma3ForCausalLM":
        return transformers.Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 6}, head_dim=HEAD, sliding_window=64, query_pre_attn_scalar=HEAD,
            layer_types=["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"],
            rope_parameters={t: {"rope_type": "default", "rope_theta": b} for t, b in BASES[arch].items()})
    if arch == "Phi3ForCausalLM":
        return transformers.Phi3Config(**COMMON, rope_theta=10_000.0, partial_rotary_factor=PARTIAL_ROTARY[arch],
                                       pad_token_id=0, sliding_window=None)
    if arch == "Qwen3MoeForCausalLM":
        return transformers.Qwen3MoeConfig(**COMMON, head_dim=HEAD, rope_theta=10_000.0, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1,
                                           norm_topk_prob=True, mlp_only_layers=[])
    if arch == HYBRID:
        return transformers.Qwen3NextConfig(
            **COMMON | HYBRID_LAYERS | HYBRID_MOE, decoder_sparse_step=1, mlp_only_layers=[],
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25})
    if arch in (QWEN35, QWEN35_MOE):  # Qwen3-Next's layers, with the mRoPE sections and a (tiny) vision tower
        text = COMMON | HYBRID_LAYERS | (HYBRID_MOE if arch == QWEN35_MOE else {})
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25,
                                   **MROPE_LAYOUT[arch]}
        ids = {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503}
        config = transformers.Qwen3_5MoeConfig if arch == QWEN35_MOE else transformers.Qwen3_5Config
        return config(text_config=text, vision_config=QWEN_VISION | {"depth": 1}, tie_word_embeddings=False, **ids)
    if arch in MROPES:
        text = {**COMMON, "head_dim": HEAD,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, **MROPE_LAYOUT[arch]}}
        ids = dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"),
                       range(3, 7), strict=True))
        if arch == QWEN3VL:
            vision = QWEN_VISION | {"depth": 2, "deepstack_visual_indexes": [0]}
            return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
        vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 56, "patch_size": 14}
        return transformers.PaddleOCRVLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"no tiny model for {arch}; known: {', '.join((*ARCHITECTURES, *HYBRIDS, *MROPES))}")


def build(arch: str, folder: Path) -> Path:
    """The tiny ``arch`` model in ``folder`` (built once; a complete folder is reused)."""

    done = folder / "config.json"
    if done.exists():
        return folder
    tmp = _save_random(arch, _config(arch), folder)
    if arch in MROPES:
        _mrope_processor(arch).save_pretrained(tmp)
    (tmp / "generation_config.json").unlink(missing_ok=True)
    tmp.rename(folder)
    return folder


def _save_random(arch: str, config, folder: Path) -> Path:
    """``arch`` randomly initialised from ``config`` (seed 0), saved beside ``folder`` (its ``.tmp`` sibling, which
    the caller completes and renames)."""
    import torch
    import transformers

    config.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).to(torch.float32)
    with torch.no_grad():  # random init is small: make the logits spread so greedy tokens are decisive
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def _drafting_weights(weights: dict, hidden: int) -> dict:
    """What makes a drafter compute its target's next token: the target's embeddings scaled to unit RMS (its
    norms of them then scale nothing), in place in ``weights``; returns the drafter's ``fc`` weight, which
    passes the embedding half of ``[embed(token), target_hidden]`` through."""
    import torch

    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = (embed / embed.pow(2).mean(-1, keepdim=True).sqrt()).contiguous()
    return {"fc.weight": torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1).contiguous()}


def _mrope_processor(arch: str):
    """The model's own processor over a word-level tokenizer of the tiny vocabulary (``w7`` ... ``w511`` and the
    special tokens); images of 4 to 16 merged patches (PaddleOCR-VL: 28 x 28 pixels each; Qwen3-VL: 32 x 32)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = SPECIALS[arch]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), COMMON["vocab_size"])})
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    marks = dict(zip(("vision_start_token", "image_token", "vision_end_token", "video_token"), specials[3:],
                     strict=True))
    if arch == QWEN3VL:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor,
        )

        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                                                         eos_token="</s>", extra_special_tokens=marks)
        patches = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
        images = transformers.Qwen2VLImageProcessor(**patches, size={"shortest_edge": 32 * 32 * 4,
                                                                     "longest_edge": 32 * 32 * 16})
        return transformers.Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer,
                                             video_processor=Qwen3VLVideoProcessor(**patches))
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": marks["image_token"]})
    images = PaddleOCRVLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    return transformers.PaddleOCRVLProcessor(image_processor=images, tokenizer=tokenizer)


def eagle_pair(root: Path) -> tuple[Path, Path]:
    """A tiny Mistral target and its EAGLE drafter, in ``root`` (built once).

    vLLM's EAGLE-1 drafter computes ``fc([embed(token), target_hidden])``, then its decoder layers (the first
    without an input norm), and reads the logits from the last hidden state without a final norm. With ``fc``
    passing the embedding through, the target's layers copied, and a target whose embeddings have unit RMS
    and whose first input norm and final norm weigh 1 (so those norms are a positive scale, which moves no
    argmax), the drafter computes the target's own next token, one position shifted (EAGLE drafts token
    ``t + 1`` at position ``t``; RoPE is relative), without the first token. Greedy drafts are then accepted
    as long as the drafter's rotary embedding is the target's, at the request's scale."""
    import torch
    from safetensors.torch import load_file, save_file

    target, eagle = root / "eagle-target", root / "eagle"
    if (eagle / "config.json").exists():
        return target, eagle
    base = build("MistralForCausalLM", root / "mistral")
    weights = load_file(str(base / "model.safetensors"))
    fc = _drafting_weights(weights, COMMON["hidden_size"])
    for norm in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
        weights[norm] = torch.ones_like(weights[norm])
    config = json.loads((base / "config.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    drafter = {name.removeprefix("model."): w for name, w in weights.items()
               if name.startswith("model.layers.") and name != "model.layers.0.input_layernorm.weight"} | fc
    tmp = eagle.with_name(eagle.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(drafter, str(tmp / "model.safetensors"))
    config.update(architectures=["EagleLlamaForCausalLM"], model_type="llama")
    config.pop("sliding_window", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(eagle)
    return target, eagle


def mtp_target(root: Path) -> Path:
    """A tiny Qwen3-Next whose own MTP layer (vLLM's ``Qwen3NextMTP``) computes what the target computes, in
    ``root`` (built once).

    The target: a DeltaNet layer that adds nothing (its output and MLP down-projections zero), then a gated
    full-attention layer with sharp attention (q/k norms x 3: the tokens depend on the rotation). The MTP layer
    computes ``fc([norm(embed(token)), norm(hidden)])``, then one full-attention layer and the final norm; with
    ``fc`` passing the embedding through, embeddings of unit RMS (Qwen3-Next's norms are zero-centred: weight 0
    is the identity) and the layer a copy of the target's, it drafts the target's own next token, one position
    shifted (RoPE is relative), without the first token. Its drafts are then accepted as long as its rotary
    embedding is the target's, at the request's scale."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = root / "mtp-target"
    if (folder / "config.json").exists():
        return folder
    config = _config(HYBRID)
    config.num_hidden_layers, config.layer_types = 2, ["linear_attention", "full_attention"]
    tmp = _save_random(HYBRID, config, folder)
    weights = load_file(str(tmp / "model.safetensors"))
    hidden = COMMON["hidden_size"]
    weights |= {"mtp." + name: w for name, w in _drafting_weights(weights, hidden).items()}
    for name in weights:
        if name.startswith("model.layers.0.") and name.endswith(("out_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
        if name.startswith("model.layers.1.self_attn.") and name.endswith(("q_norm.weight", "k_norm.weight")):
            weights[name] = torch.full_like(weights[name], 2.0)  # scores x (1 + 2)^2
    weights |= {"mtp." + name.removeprefix("model.").replace("layers.1.", "layers.0."): w.clone()
                for name, w in weights.items() if name.startswith(("model.layers.1.", "model.norm."))}
    weights["mtp.pre_fc_norm_embedding.weight"] = torch.zeros(hidden)
    weights["mtp.pre_fc_norm_hidden.weight"] = torch.zeros(hidden)
    save_file(weights, str(tmp / "model.safetensors"))
    saved = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps(saved | {"mtp_num_hidden_layers": 1}, indent=2))
    (tmp / "generation_config.json").unlink(missing_ok=True)
    tmp.rename(folder)
    return folder


def unloadable(arch: str) -> str | None:
    """Why vLLM's model file for ``arch`` cannot load here, or None. Qwen3.5's and Qwen3-VL's import
    torchvision (Qwen3-VL's vision tower and transformers' image processors); the registries hold only
    CUDA-linked torchvision wheels, which fail beside the CPU torch (scripts/install_torchvision_cpu.sh)."""
    if arch not in (QWEN35, QWEN35_MOE, QWEN3VL):
        return None
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 (a CUDA-linked build fails with a RuntimeError, none with ImportError)
        return (f"vLLM's {arch} imports torchvision, which does not load here ({type(e).__name__}: {e}); "
                "scripts/setup.sh installs a CPU build from ../shared/torchvision-cpu where there is one")
    return None


def variant(folder: Path, dest: Path, text_rope_parameters: dict[str, Any], max_position_embeddings: int) -> Path:
    """``folder``'s model (its files linked, not copied) with other RoPE parameters in its text config (the
    config itself for a text-only model): for engines that read the file, not ``hf_overrides`` (a
    speculative draft model's config, a multimodal model's text config)."""
    if not (dest / "config.json").exists():
        dest.mkdir(parents=True, exist_ok=True)
        for file in folder.iterdir():
            if file.name != "config.json":
                (dest / file.name).unlink(missing_ok=True)
                (dest / file.name).hardlink_to(file)
        config = json.loads((folder / "config.json").read_text())
        config.get("text_config", config).update(rope_parameters=text_rope_parameters,
                                                 max_position_embeddings=max_position_embeddings)
        (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def rope_parameters(arch: str, rope_type: str, factor: float, **extra: Any) -> dict[str, Any]:
    """``hf_overrides`` giving ``arch`` the RoPE scaling ``rope_type`` (``dynamic_yarn`` for the plugin,
    ``yarn`` for stock static YaRN) up to ``factor`` on the layers its family scales, serving L * factor."""
    scaled = {"rope_type": rope_type, "factor": float(factor), "original_max_position_embeddings": L, **extra}
    if arch == "Gemma3ForCausalLM":
        params: dict[str, Any] = {
            "full_attention": {**scaled, "rope_theta": BASES[arch]["full_attention"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": BASES[arch]["sliding_attention"]}}
    else:
        params = {**scaled, "rope_theta": 10_000.0}
        if arch in PARTIAL_ROTARY:
            params["partial_rotary_factor"] = PARTIAL_ROTARY[arch]
        if arch in (QWEN35, QWEN35_MOE):  # the hybrid test's layouts (the mRoPE test writes its own)
            params |= MROPE_LAYOUT[arch]
    return {"rope_parameters": params, "max_position_embeddings": int(L * factor)}


def describe(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["architectures"][0]
