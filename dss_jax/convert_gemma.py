"""Hugging Face T5Gemma and T5Gemma 2 checkpoints: configs both ways, the name map, the tensors import drops.

The dss_jax trees (``dss_jax.gemma``) follow Hugging Face's module names, so the map is 1:1 (kernels
transposed). T5Gemma 2's vision tower (``vision_tower.*``, ``multi_modal_projector.*``) is dropped on import
with a notice; an exported T5Gemma 2 directory carries a tiny placeholder ``vision_config``. ``dss_jax.convert``
(the CLI, T5, T5X and the safetensors files) calls these for a GemmaConfig.
"""

from __future__ import annotations

import logging
from typing import Any

from dss_jax.gemma import GemmaConfig, GemmaStack
from dss_jax.params import Flat

log = logging.getLogger(__name__)


GEMMA_MODEL_TYPES = ("t5gemma", "t5gemma2")
_GEMMA_STACK_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "query_pre_attn_scalar",
    "rms_norm_eps",
    "attn_logit_softcapping",
)
# A placeholder vision tower for exported T5Gemma 2 dirs: transformers needs a vision_config to build the class.
_PLACEHOLDER_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 28,
    "patch_size": 14,
}


def _rope_from_hf(sub: dict[str, Any], family: str, where: str) -> dict[str, float]:
    """RoPE bases of one HF stack config: T5Gemma has one base; T5Gemma 2 one per layer type."""
    rp = sub.get("rope_parameters") or {}
    if family == "t5gemma":
        if rp.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: {where}.rope_parameters.rope_type={rp['rope_type']!r} is not supported (default)")
        theta = float(rp.get("rope_theta", sub.get("rope_theta", 10_000.0)))
        return {"rope_theta": theta, "rope_local_base_freq": theta}
    full = rp.get("full_attention") or {}
    local = rp.get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"config.json: {where}.rope_parameters.sliding_attention.rope_type must be default")
    factor = 1.0
    kind = full.get("rope_type", "default")
    if kind == "linear":
        factor = float(full["factor"])
    elif kind != "default":
        raise ValueError(
            f"config.json: {where}.rope_parameters.full_attention.rope_type={kind!r} is not supported (default, linear)"
        )
    return {
        "rope_theta": float(full.get("rope_theta", sub.get("rope_theta", 1_000_000.0))),
        "rope_local_base_freq": float(local.get("rope_theta", sub.get("rope_local_base_freq", 10_000.0))),
        "rope_scaling_factor": factor,
    }


def _stack_from_hf(sub: dict[str, Any], family: str, where: str) -> GemmaStack:
    act = sub.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"config.json: {where}.hidden_activation={act!r} is not supported (gelu_pytorch_tanh)")
    if sub.get("attention_bias"):
        raise ValueError(f"config.json: {where}.attention_bias=true is not supported")
    kwargs: dict[str, Any] = {k: sub[k] for k in _GEMMA_STACK_FIELDS if k in sub and sub[k] is not None}
    if "layer_types" in sub and sub["layer_types"] is not None:
        kwargs["layer_types"] = tuple(sub["layer_types"])
    kwargs.update(_rope_from_hf(sub, family, where))
    try:
        return GemmaStack(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json: {where}: {e}") from None


def gemma_config_from_hf(hf: dict[str, Any], **overrides: Any) -> GemmaConfig:
    """GemmaConfig from a T5Gemma or T5Gemma 2 ``config.json`` (its text parts; any vision config is ignored)."""
    family = hf["model_type"]
    enc = hf.get("encoder") or {}
    if family == "t5gemma2":
        enc = enc.get("text_config") or {}
    dec = hf.get("decoder") or {}
    kwargs: dict[str, Any] = {
        "family": family,
        "encoder": _stack_from_hf(enc, family, "encoder" if family == "t5gemma" else "encoder.text_config"),
        "decoder": _stack_from_hf(dec, family, "decoder"),
        "vocab_size": dec.get("vocab_size", hf.get("vocab_size", 256_000 if family == "t5gemma" else 262_144)),
        "final_logit_softcapping": dec.get("final_logit_softcapping", 30.0 if family == "t5gemma" else None),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "dropout_rate": float(hf.get("dropout_rate", 0.0)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
        "pad_token_id": dec.get("pad_token_id", hf.get("pad_token_id", 0)),
        "eos_token_id": dec.get("eos_token_id", hf.get("eos_token_id", 1)),
        "bos_token_id": dec.get("bos_token_id", hf.get("bos_token_id", 2)),
    }
    if isinstance(kwargs["eos_token_id"], list):
        kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
    if family == "t5gemma2":
        kwargs["eoi_token_index"] = int(hf.get("eoi_token_index") or (hf.get("encoder") or {}).get("eoi_token_index", 256_000))
        if enc.get("vocab_size", kwargs["vocab_size"]) != kwargs["vocab_size"]:
            raise ValueError("config.json: encoder.text_config.vocab_size differs from decoder.vocab_size")
    if family == "t5gemma2" and not kwargs["tie_word_embeddings"]:
        raise ValueError("config.json: T5Gemma 2 with tie_word_embeddings=false is not supported")
    kwargs.update(overrides)
    try:
        return GemmaConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json: {e}") from None


def _stack_to_hf(s: GemmaStack, cfg: GemmaConfig) -> dict[str, Any]:
    d = {k: getattr(s, k) for k in _GEMMA_STACK_FIELDS}
    d.update(
        {
            "layer_types": list(s.layer_types),
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "vocab_size": cfg.vocab_size,
            "pad_token_id": cfg.pad_token_id,
            "eos_token_id": cfg.eos_token_id,
            "bos_token_id": cfg.bos_token_id,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "dropout_rate": cfg.dropout_rate,
            "attention_dropout": cfg.attention_dropout,
        }
    )
    if cfg.family == "t5gemma":
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": s.rope_theta}
    else:
        full: dict[str, Any] = {"rope_type": "default", "rope_theta": s.rope_theta}
        if s.rope_scaling_factor != 1.0:
            full.update({"rope_type": "linear", "factor": s.rope_scaling_factor})
        d["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": s.rope_local_base_freq},
        }
    return d


def gemma_config_to_hf(cfg: GemmaConfig) -> dict[str, Any]:
    """A ``config.json`` dict for ``T5GemmaForConditionalGeneration`` / ``T5Gemma2ForConditionalGeneration``."""
    enc, dec = _stack_to_hf(cfg.encoder, cfg), _stack_to_hf(cfg.decoder, cfg)
    top = {
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "dropout_rate": cfg.dropout_rate,
        "attention_dropout": cfg.attention_dropout,
        "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id,
        "bos_token_id": cfg.bos_token_id,
        "use_cache": True,
    }
    if cfg.family == "t5gemma":
        enc.update({"model_type": "t5_gemma_module", "is_decoder": False})
        dec.update({"model_type": "t5_gemma_module", "is_decoder": True, "cross_attention_hidden_size": cfg.encoder.hidden_size})
        return {
            "architectures": ["T5GemmaForConditionalGeneration"],
            "model_type": "t5gemma",
            "encoder": enc,
            "decoder": dec,
            **top,
        }
    enc["model_type"] = "t5gemma2_text"
    dec["model_type"] = "t5gemma2_decoder"
    encoder = {
        "model_type": "t5gemma2_encoder",
        "text_config": enc,
        "vision_config": dict(_PLACEHOLDER_VISION),
        "mm_tokens_per_image": 1,
        "eoi_token_index": cfg.eoi_token_index,
        "boi_token_index": cfg.eoi_token_index - 1,
        "image_token_index": cfg.eoi_token_index + 1,
        "tie_word_embeddings": True,
    }
    return {
        "architectures": ["T5Gemma2ForConditionalGeneration"],
        "model_type": "t5gemma2",
        "encoder": encoder,
        "decoder": dec,
        "eoi_token_index": cfg.eoi_token_index,
        "image_token_index": cfg.eoi_token_index + 1,
        **top,
    }


def gemma_generation_config(cfg: GemmaConfig) -> dict[str, Any]:
    return {
        "bos_token_id": cfg.bos_token_id,
        "decoder_start_token_id": cfg.decoder_start_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }


def gemma_layer_map(cfg: GemmaConfig) -> list[tuple[str, str, bool]]:
    """(HF name, dss path, transpose) for every text tensor of a T5Gemma / T5Gemma 2 model."""
    rows: list[tuple[str, str, bool]] = []
    if cfg.shared_embedding:
        rows.append(("model.encoder.embed_tokens.weight", "embed_tokens/embedding", False))
        rows.append(("model.encoder.embed_tokens.eoi_embedding", "embed_tokens/eoi_embedding", False))
    else:
        rows.append(("model.encoder.embed_tokens.weight", "encoder/embed_tokens/embedding", False))
        rows.append(("model.decoder.embed_tokens.weight", "decoder/embed_tokens/embedding", False))

    def attn(hf: str, dss: str) -> list[tuple[str, str, bool]]:
        out = [(f"{hf}.{p}_proj.weight", f"{dss}/{p}_proj/kernel", True) for p in "qkvo"]
        if cfg.family == "t5gemma2" and hf.endswith("self_attn"):
            out += [(f"{hf}.{n}_norm.weight", f"{dss}/{n}_norm/scale", False) for n in "qk"]
        return out

    def norms(hf: str, dss: str, names: tuple[str, ...]) -> list[tuple[str, str, bool]]:
        return [(f"{hf}.{n}.weight", f"{dss}/{n}/scale", False) for n in names]

    for stack, s in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        cross = stack == "decoder" and cfg.family == "t5gemma"
        names: tuple[str, ...] = (
            "pre_self_attn_layernorm",
            "post_self_attn_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
        if cross:
            names += ("pre_cross_attn_layernorm", "post_cross_attn_layernorm")
        for i in range(s.num_hidden_layers):
            hf, dss = f"model.{stack}.layers.{i}", f"{stack}/layers_{i}"
            rows += attn(f"{hf}.self_attn", f"{dss}/self_attn")
            if cross:
                rows += attn(f"{hf}.cross_attn", f"{dss}/cross_attn")
            rows += norms(hf, dss, names)
            rows += [(f"{hf}.mlp.{m}.weight", f"{dss}/mlp/{m}/kernel", True) for m in ("gate_proj", "up_proj", "down_proj")]
        rows.append((f"model.{stack}.norm.weight", f"{stack}/norm/scale", False))
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.out_proj.weight", "decoder/lm_head/kernel", True))
    return rows


def gemma_tied_copies(cfg: GemmaConfig) -> tuple[str, ...]:
    """Tensors a T5Gemma(2) file may hold as copies of mapped ones (equal to them when present)."""
    head = ("lm_head.out_proj.weight",) if cfg.tie_word_embeddings else ()
    if cfg.shared_embedding:
        return ("model.decoder.embed_tokens.weight", "model.decoder.embed_tokens.eoi_embedding", *head)
    return head


_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")


def drop_gemma_extras(state: Flat, cfg: GemmaConfig, source: str) -> Flat:
    """Drops T5Gemma 2's vision tower and projector, with a one-line notice."""
    vision = [k for k in state if k.startswith(_VISION_PREFIXES)]
    if not vision:
        return state
    log.warning("%s: dropped the vision tower and projector (%d tensors): dss_jax students are text-only", source, len(vision))
    return {k: v for k, v in state.items() if not k.startswith(_VISION_PREFIXES)}


# ----------------------------------------------------------------------------- T5X
