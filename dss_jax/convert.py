"""Checkpoint interop: Hugging Face T5 / T5Gemma / T5Gemma 2 directories and T5X checkpoints <-> dss_jax trees.

The dss_jax T5 tree is T5X's, so T5X import is a read; Hugging Face names map 1:1 (kernels transposed, the
relative position table transposed and held once per stack). The T5Gemma families' configs and name maps are
in ``dss_jax.convert_gemma``. Safetensors are read and written with ``safetensors.numpy``: torch is never
imported here. CLI: ``dss-convert hf-to-dss|dss-to-hf|t5x-to-dss SRC DST``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dss_jax import convert_gemma
from dss_jax.gemma import GemmaConfig
from dss_jax.model import ModelConfig, T5Config
from dss_jax.params import (  # noqa: F401 - re-exported: the tree helpers' former home
    CheckpointMismatchError,
    Flat,
    Params,
    check_tree,
    flatten,
    stack_layers,
    unflatten,
    unstack_layers,
)

log = logging.getLogger(__name__)


# HF config.json field -> T5Config field (same name unless listed).
_HF_RENAMES = {"num_layers": "num_encoder_layers"}
_HF_FIELDS = (
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_heads",
    "num_layers",
    "num_decoder_layers",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "dropout_rate",
    "layer_norm_epsilon",
    "feed_forward_proj",
    "tie_word_embeddings",
    "pad_token_id",
    "eos_token_id",
    "decoder_start_token_id",
)


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The model config of a Hugging Face ``config.json`` dict (by its ``model_type``; HF defaults where a field
    is absent)."""
    model_type = hf.get("model_type", "t5")
    if model_type in convert_gemma.GEMMA_MODEL_TYPES:
        return convert_gemma.gemma_config_from_hf(hf, **overrides)
    if model_type != "t5":
        raise ValueError(
            f"config.json: model_type={model_type!r} is not supported (t5, {', '.join(convert_gemma.GEMMA_MODEL_TYPES)})"
        )
    return t5_config_from_hf(hf, **overrides)


def t5_config_from_hf(hf: dict[str, Any], **overrides: Any) -> T5Config:
    """T5Config from a Hugging Face T5 ``config.json`` dict."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ValueError(f"config.json: feed_forward_proj={proj!r} is not supported (relu or gated-gelu)")
    kwargs = {
        "vocab_size": hf.get("vocab_size", 32128),
        "d_model": hf.get("d_model", 512),
        "d_kv": hf.get("d_kv", 64),
        "d_ff": hf.get("d_ff", 2048),
        "num_heads": hf.get("num_heads", 8),
        "num_encoder_layers": hf.get("num_layers", 6),
        "num_decoder_layers": hf.get("num_decoder_layers") or hf.get("num_layers", 6),
        "relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
        "dropout_rate": hf.get("dropout_rate", 0.1),
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-6),
        "feed_forward_proj": proj,
        # transformers >= 5 writes tie_word_embeddings=true for every T5 and records the v1.0 behaviour
        # (shared head, scaled logits) as scale_decoder_outputs; older configs only have the former.
        "tie_word_embeddings": bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))),
        "pad_token_id": hf.get("pad_token_id", 0),
        "eos_token_id": hf.get("eos_token_id", 1),
        "decoder_start_token_id": hf.get("decoder_start_token_id", 0),
    }
    kwargs.update(overrides)
    return T5Config(**kwargs)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict (``T5ForConditionalGeneration`` or the T5Gemma(2) class)."""
    if isinstance(cfg, GemmaConfig):
        return convert_gemma.gemma_config_to_hf(cfg)
    d = cfg.to_dict()
    hf = {k: d[_HF_RENAMES.get(k, k)] for k in _HF_FIELDS}
    hf.update(
        {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "is_encoder_decoder": True,
            "dense_act_fn": "gelu_new" if cfg.gated else "relu",
            "is_gated_act": cfg.gated,
            "scale_decoder_outputs": cfg.tie_word_embeddings,
            "initializer_factor": 1.0,
            "use_cache": True,
        }
    )
    return hf


# ----------------------------------------------------------------------------- Hugging Face


def _hf_layer_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(HF name, dss path, transpose) for every tensor of the config's family."""
    if isinstance(cfg, GemmaConfig):
        return convert_gemma.gemma_layer_map(cfg)
    return _t5_layer_map(cfg)


def _t5_layer_map(cfg: T5Config) -> list[tuple[str, str, bool]]:
    """(HF name, dss path, transpose) for every T5 tensor; the relative bias tables come last."""
    rows: list[tuple[str, str, bool]] = [("shared.weight", "token_embedder/embedding", False)]
    mlp = ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")

    def attn(hf: str, dss: str) -> list[tuple[str, str, bool]]:
        return [
            (f"{hf}.{a}.weight", f"{dss}/{b}/kernel", True) for a, b in zip("qkvo", ("query", "key", "value", "out"), strict=True)
        ]

    for i in range(cfg.num_encoder_layers):
        hf, dss = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
        rows += attn(f"{hf}.0.SelfAttention", f"{dss}/attention")
        rows.append((f"{hf}.0.layer_norm.weight", f"{dss}/pre_attention_layer_norm/scale", False))
        rows += [(f"{hf}.1.DenseReluDense.{m}.weight", f"{dss}/mlp/{m}/kernel", True) for m in mlp]
        rows.append((f"{hf}.1.layer_norm.weight", f"{dss}/pre_mlp_layer_norm/scale", False))
    rows.append(("encoder.final_layer_norm.weight", "encoder/encoder_norm/scale", False))
    for i in range(cfg.num_decoder_layers):
        hf, dss = f"decoder.block.{i}.layer", f"decoder/layers_{i}"
        rows += attn(f"{hf}.0.SelfAttention", f"{dss}/self_attention")
        rows.append((f"{hf}.0.layer_norm.weight", f"{dss}/pre_self_attention_layer_norm/scale", False))
        rows += attn(f"{hf}.1.EncDecAttention", f"{dss}/encoder_decoder_attention")
        rows.append((f"{hf}.1.layer_norm.weight", f"{dss}/pre_cross_attention_layer_norm/scale", False))
        rows += [(f"{hf}.2.DenseReluDense.{m}.weight", f"{dss}/mlp/{m}/kernel", True) for m in mlp]
        rows.append((f"{hf}.2.layer_norm.weight", f"{dss}/pre_mlp_layer_norm/scale", False))
    rows.append(("decoder.final_layer_norm.weight", "decoder/decoder_norm/scale", False))
    rows.append(
        ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "encoder/relpos_bias/rel_embedding", True)
    )
    rows.append(
        ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder/relpos_bias/rel_embedding", True)
    )
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", "decoder/logits_dense/kernel", True))
    return rows


# Copies of the shared embedding that HF writes for tied weights; equal to shared.weight when present.
_HF_TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_state_to_params(state: Flat, cfg: ModelConfig, source: str = "state dict") -> Params:
    """HF ``T5ForConditionalGeneration`` / ``T5Gemma(2)ForConditionalGeneration`` state dict (numpy) ->
    unscanned dss_jax params."""
    rows = _hf_layer_map(cfg)
    known = {r[0] for r in rows}
    if isinstance(cfg, GemmaConfig):
        state = convert_gemma.drop_gemma_extras(state, cfg, source)
        ignorable: tuple[str, ...] = convert_gemma.gemma_tied_copies(cfg)
    else:
        ignorable = _HF_TIED_COPIES
        if not cfg.tie_word_embeddings and "lm_head.weight" not in state and "shared.weight" in state:
            # transformers >= 5 may save an unscaled (v1.1-style) model with its head tied to the embedding.
            log.info("%s: no lm_head.weight; the output head starts as a copy of shared.weight", source)
            state = {**state, "lm_head.weight": state["shared.weight"]}
    flat: Flat = {}
    missing = [hf for hf, _, _ in rows if hf not in state]
    extra = sorted(k for k in state if k not in known and k not in ignorable)
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some exporters write the tied head explicitly
    if missing or extra:
        lines = [f"missing tensor {m}" for m in missing] + [f"unexpected tensor {e} (shape {state[e].shape})" for e in extra]
        raise CheckpointMismatchError(f"{source} does not match the model config:\n  " + "\n  ".join(lines))
    for hf, dss, transpose in rows:
        x = np.asarray(state[hf])
        flat[dss] = x.T if transpose else x
    check_tree(flat, cfg, source)
    return unflatten(flat)


def params_to_hf_state(params: Params, cfg: ModelConfig) -> Flat:
    """dss_jax params (either layout) -> HF state dict (numpy, contiguous); a tied head is included under its
    HF name (``save_hf`` leaves it out of the file, as transformers does)."""
    flat = flatten(unstack_layers(params) if cfg.scan_layers else params)
    check_tree(flat, cfg, "parameter tree")
    state: Flat = {}
    for hf, dss, transpose in _hf_layer_map(cfg):
        x = np.asarray(flat[dss])
        state[hf] = np.ascontiguousarray(x.T if transpose else x)
    if cfg.tie_word_embeddings:
        head, emb = _tied_head(cfg)
        state[head] = state[emb]
    return state


def _tied_head(cfg: ModelConfig) -> tuple[str, str]:
    """(HF name of the tied output head, HF name of the embedding it copies)."""
    if isinstance(cfg, GemmaConfig):
        return "lm_head.out_proj.weight", ("model.encoder" if cfg.shared_embedding else "model.decoder") + ".embed_tokens.weight"
    return "lm_head.weight", "shared.weight"


def read_safetensors_dir(path: Path) -> Flat:
    """All tensors of ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""
    from safetensors.numpy import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        state: Flat = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(path / shard)))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointMismatchError(f"{index}: tensors listed but not found in the shards: {missing[:10]}")
        return state
    if (path / "pytorch_model.bin").exists():
        raise FileNotFoundError(
            f"{path} holds only pytorch_model.bin; dss_jax reads safetensors. Convert once with transformers: "
            "T5ForConditionalGeneration.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf(path: str | os.PathLike, **config_overrides: Any) -> tuple[Params, ModelConfig]:
    """Reads a Hugging Face T5 / T5Gemma / T5Gemma 2 directory into (unscanned params as float32 numpy, config)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: a Hugging Face model directory needs config.json")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, **config_overrides)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in read_safetensors_dir(path).items()}
    return hf_state_to_params(state, cfg, source=str(path)), cfg


def save_hf(
    params: Params,
    cfg: ModelConfig,
    path: str | os.PathLike,
    spiece_model: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Writes a directory that transformers' ``from_pretrained`` loads (the config's family's class), with the
    vocabulary (``spiece.model`` for T5, ``tokenizer.model`` for T5Gemma) and the Hugging Face tokenizer files
    found in ``tokenizer_dir``."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = params_to_hf_state(params, cfg)
    if cfg.tie_word_embeddings:
        del state[_tied_head(cfg)[0]]  # transformers re-ties it on load
    save_file(
        {k: np.asarray(v, np.float32) for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"}
    )
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    if isinstance(cfg, GemmaConfig):
        (path / "generation_config.json").write_text(json.dumps(convert_gemma.gemma_generation_config(cfg), indent=2) + "\n")
        if cfg.family == "t5gemma2":
            log.info("%s: T5Gemma 2 exported text-only: the vision tower is not written (placeholder vision_config)", path)
    if tokenizer_dir is not None:
        copy_tokenizer_files(Path(tokenizer_dir), path)
    if spiece_model is not None:
        name = "tokenizer.model" if isinstance(cfg, GemmaConfig) else "spiece.model"
        if not (path / name).exists():
            shutil.copy(spiece_model, path / name)
    return path


# Tokenizer files of a Hugging Face directory, copied as they are by hf-to-dss and dss-to-hf.
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer files present in ``src`` to ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy(src / name, dst / name)
            copied.append(name)
    return copied


def vocabulary_file(path: Path) -> Path | None:
    """The SentencePiece model of a Hugging Face directory: ``spiece.model`` (T5) or ``tokenizer.model`` (Gemma)."""
    for name in ("spiece.model", "tokenizer.model"):
        if (path / name).is_file():
            return path / name
    return None


def _resolve_t5x_leaf(leaf: Any, step_dir: Path, name: str) -> Any:
    """Legacy T5X leaves are arrays, or tensorstore spec dicts with kvstore paths relative to the step dir."""
    if not (isinstance(leaf, dict) and "driver" in leaf):
        return leaf
    import tensorstore as ts

    spec = json.loads(json.dumps(leaf))
    kvstore = spec.get("kvstore")
    if kvstore is None and "path" in spec:  # older specs put the path at the top level
        kvstore = spec["kvstore"] = {"driver": "file", "path": spec.pop("path")}
    if kvstore is not None and kvstore.get("driver", "file") == "file":
        p = Path(kvstore["path"])
        kvstore["path"] = str(p if p.is_absolute() else step_dir / p)
        if not Path(kvstore["path"]).exists():
            raise FileNotFoundError(f"T5X tensor {name}: {kvstore['path']} does not exist")
    return ts.open(spec).result().read().result()


def load_t5x(path: str | os.PathLike, cfg: T5Config) -> Params:
    """Reads the model parameters (``optimizer.target``) of a legacy msgpack+tensorstore T5X checkpoint.

    ``path`` is a ``checkpoint_<step>`` directory or its ``checkpoint`` file. Optimizer state is ignored.
    """
    from flax import serialization

    path = Path(path)
    ckpt_file = path / "checkpoint" if path.is_dir() else path
    if not ckpt_file.exists():
        raise FileNotFoundError(f"{ckpt_file} not found: expected a T5X checkpoint_<step>/checkpoint file")
    raw = serialization.msgpack_restore(ckpt_file.read_bytes())
    try:
        target = raw["optimizer"]["target"]
    except (KeyError, TypeError):
        raise CheckpointMismatchError(f"{ckpt_file}: no optimizer/target tree; top-level keys: {sorted(raw)}") from None
    flat = {k: np.asarray(_resolve_t5x_leaf(v, ckpt_file.parent, k), np.float32) for k, v in _flatten_any(target).items()}
    check_tree(flat, cfg, str(ckpt_file))
    return unflatten(flat)


def _flatten_any(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Like :func:`flatten`, but stops at tensorstore spec dicts."""
    if isinstance(tree, dict) and "driver" not in tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten_any(v, f"{prefix}/{k}" if prefix else k))
        return out
    return {prefix: tree}


# ----------------------------------------------------------------------------- CLI


def _read_dss(src: Path) -> tuple[Params, ModelConfig, Path | None]:
    """Parameters, config and spiece.model of a pretrained dir, or of a trainer's model dir / checkpoint step
    (the model dir's best checkpoint, else its latest)."""
    import jax

    from dss_jax import checkpoints

    if (src / checkpoints.CONFIG_FILE).exists() and not (src / "checkpoints").is_dir():
        return checkpoints.load_pretrained(src)
    step_dir = checkpoints.resolve_step_dir(src)
    model_dir = step_dir.parent.parent
    cfg = checkpoints.read_config(model_dir)
    params = jax.tree.map(np.asarray, checkpoints.restore_train_params(step_dir, cfg))
    if cfg.scan_layers:
        params, cfg = unstack_layers(params), cfg.replace(scan_layers=False)
    spm = model_dir / "spiece.model"
    return params, cfg, spm if spm.exists() else None


def main(argv: list[str] | None = None) -> int:
    from dss_jax import checkpoints

    parser = argparse.ArgumentParser(
        prog="dss-convert",
        description="Convert T5, T5Gemma and T5Gemma 2 checkpoints between Hugging Face, T5X (T5 only) and dss_jax "
        "(Orbax) formats. T5Gemma 2's vision tower is dropped on import and not written on export (text-only).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "hf-to-dss", help="Hugging Face T5/T5Gemma/T5Gemma 2 dir (config.json + safetensors + tokenizer) -> dss_jax checkpoint"
    )
    p.add_argument("src"), p.add_argument("dst")
    p = sub.add_parser("dss-to-hf", help="dss_jax checkpoint (pretrained dir or trainer step) -> Hugging Face dir")
    p.add_argument("src"), p.add_argument("dst")
    p = sub.add_parser("t5x-to-dss", help="legacy T5X checkpoint_<step> dir -> dss_jax checkpoint")
    p.add_argument("src"), p.add_argument("dst")
    p.add_argument("--hf_config", help="config.json describing the architecture", default=None)
    p.add_argument("--model", help="model gin name in gin/models (e.g. t5_1_1_base)", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.cmd == "hf-to-dss":
            params, cfg = load_hf(args.src)
            checkpoints.save_pretrained(args.dst, params, cfg, spiece_model=vocabulary_file(Path(args.src)))
            copy_tokenizer_files(Path(args.src), Path(args.dst))
        elif args.cmd == "dss-to-hf":
            params, cfg, spm = _read_dss(Path(args.src))
            save_hf(params, cfg, args.dst, spiece_model=spm, tokenizer_dir=spm.parent if spm is not None else None)
        else:
            if bool(args.hf_config) == bool(args.model):
                parser.error("t5x-to-dss needs exactly one of --hf_config or --model")
            if args.hf_config:
                cfg = config_from_hf(json.loads(Path(args.hf_config).read_text()))
            else:
                from dss_jax.configs import model_config

                cfg = model_config(args.model)
            if not isinstance(cfg, T5Config):
                parser.error(f"t5x-to-dss reads T5 checkpoints; the config given is a {cfg.family} model")
            checkpoints.save_pretrained(args.dst, load_t5x(args.src, cfg), cfg)
    except (FileNotFoundError, CheckpointMismatchError, ValueError) as e:
        print(f"dss-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
