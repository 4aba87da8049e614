"""T5Gemma and T5Gemma 2 against Hugging Face's pinned transformers classes, with random weights built here.

The configs use grouped-query attention (4 query heads, 2 key/value heads), head_dim != hidden / heads, a
sliding window shorter than the input, mixed layer types, encoder and decoder stacks of different depths and
norm weights far from 0 (Gemma's norms scale by 1 + w). Nothing is downloaded.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from factories import tiny_t5

from dss_jax import convert, convert_gemma, decoding, model
from dss_jax.params import flatten, stack_layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 64
EOI = 60  # T5Gemma 2's end-of-image id, inside the small vocabulary so its learned embedding is exercised
STACK = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    query_pre_attn_scalar=10,
    sliding_window=3,
    rms_norm_eps=1e-6,
)
ENC = dict(STACK, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
DEC = dict(STACK, num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
TINY_VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)


def _randomize(m: torch.nn.Module, seed: int) -> None:
    """Every tensor random: weights N(0, 0.15), norm weights N(0, 0.5) so that 1 + w is far from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            std = 0.5 if ("norm" in name or "eoi" in name) else 0.15
            p.copy_(torch.randn(p.shape, generator=g) * std)


_BUILT: dict[tuple, tuple] = {}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """hf_models(family, seed=0, **top) -> (model, dir): each random model is built and saved once per module."""

    def get(family: str, seed: int = 0, **top):
        key = (family, seed, tuple(sorted(top.items())))
        if key not in _BUILT:
            _BUILT[key] = hf_model(family, tmp_path_factory.mktemp(family), seed, **top)
        return _BUILT[key]

    yield get
    _BUILT.clear()


def hf_model(family: str, tmp_path, seed: int = 0, **top):
    """A random-weight HF model of ``family``, saved to ``tmp_path/family`` and reloaded from there."""
    if family == "t5gemma":
        cfg = transformers.T5GemmaConfig(encoder=dict(ENC), decoder=dict(DEC), vocab_size=VOCAB, **top)
        cls = transformers.T5GemmaForConditionalGeneration
    else:
        enc = dict(text_config=dict(ENC), vision_config=TINY_VISION, mm_tokens_per_image=4, eoi_token_index=EOI)
        cfg = transformers.T5Gemma2Config(encoder=enc, decoder=dict(DEC), **top)
        cls = transformers.T5Gemma2ForConditionalGeneration
    torch.manual_seed(seed)
    m = cls(cfg).eval()
    _randomize(m, seed)
    d = tmp_path / family
    m.save_pretrained(d)
    return cls.from_pretrained(d).eval(), d


def _inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, VOCAB, size=(2, 12)).astype(np.int32)
    ids[0, 4] = EOI
    ids[1, 7:] = 0  # padding: the second row is 7 tokens
    dec = rng.randint(3, VOCAB, size=(2, 10)).astype(np.int32)
    dec[:, 0] = 2  # bos starts decoder sequences
    return ids, dec


def _apply(cfg, params, ids: np.ndarray, dec: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.build(cfg).apply)({"params": params}, jnp.asarray(ids), jnp.asarray(dec)))


def _hf_logits(m, ids: np.ndarray, dec: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = m(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(ids != 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(dec, dtype=torch.long),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("family", ["t5gemma", "t5gemma2"])
def test_logits_match_hf(family, hf_models):
    hf, d = hf_models(family)
    params, cfg = convert.load_hf(d, dtype="float32")
    assert cfg.family == family and cfg.decoder_start_token_id == 2
    ids, dec = _inputs()
    ours = _apply(cfg, params, ids, dec)
    np.testing.assert_allclose(ours, _hf_logits(hf, ids, dec), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["t5gemma", "t5gemma2"])
def test_scanned_layers_match_unscanned(family, hf_models):
    """Mixed sliding/global layers under scan_layers (the type rides in as a scanned flag) give the same logits."""
    _, d = hf_models(family)
    params, cfg = convert.load_hf(d, dtype="float32")
    ids, dec = _inputs(1)
    a = _apply(cfg, params, ids, dec)
    b = _apply(cfg.replace(scan_layers=True), stack_layers(params), ids, dec)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["t5gemma", "t5gemma2"])
def test_greedy_decode_matches_hf_generate(family, hf_models):
    hf, d = hf_models(family, seed=1)
    params, cfg = convert.load_hf(d, dtype="float32")
    ids, _ = _inputs(2)
    new = 32
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(ids != 0, dtype=torch.long),
            max_new_tokens=new,
            do_sample=False,
            num_beams=1,
        ).numpy()
    assert (ref[:, 0] == cfg.decoder_start_token_id).all()
    ref = np.pad(ref[:, 1:], ((0, 0), (0, new + 1 - ref.shape[1])))
    ours = np.asarray(decoding.decode(params, jnp.asarray(ids), cfg, new))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("family", ["t5gemma", "t5gemma2"])
def test_round_trip_is_bitwise(family, hf_models, tmp_path):
    """hf -> dss -> hf returns every text tensor bitwise (T5Gemma 2's vision tower is dropped, by design)."""
    from safetensors.numpy import load_file

    _, d = hf_models(family)
    params, cfg = convert.load_hf(d)
    out = convert.save_hf(params, cfg, tmp_path / "back")
    src, back = load_file(str(d / "model.safetensors")), load_file(str(out / "model.safetensors"))
    text = {k: v for k, v in src.items() if "vision_tower" not in k and "multi_modal_projector" not in k}
    assert sorted(back) == sorted(text)
    for k, v in text.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    cls = type(transformers.AutoConfig.from_pretrained(out))
    assert cls.__name__ == ("T5GemmaConfig" if family == "t5gemma" else "T5Gemma2Config")
    assert convert.config_from_hf(json.loads((out / "config.json").read_text())) == cfg


def test_untied_head_logits_match_hf(hf_models):
    """T5Gemma with tie_word_embeddings=False: the separate lm_head maps to decoder/lm_head and back."""
    hf, d = hf_models("t5gemma", tie_word_embeddings=False)
    params, cfg = convert.load_hf(d, dtype="float32")
    assert not cfg.tie_word_embeddings and "decoder/lm_head/kernel" in flatten(params)
    ids, dec = _inputs(3)
    ours = _apply(cfg, params, ids, dec)
    np.testing.assert_allclose(ours, _hf_logits(hf, ids, dec), atol=1e-4, rtol=1e-4)


def test_config_from_dict_picks_the_family():
    from dss_jax.gemma import GemmaConfig

    cfg = convert_gemma.gemma_config_from_hf(
        {"model_type": "t5gemma2", "encoder": {"text_config": dict(ENC)}, "decoder": dict(DEC)}
    )
    again = model.config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert isinstance(again, GemmaConfig) and again == cfg
    t5 = tiny_t5()
    assert model.config_from_dict(t5.to_dict()) == t5  # old dss_config.json files have no "family"
    with pytest.raises(ValueError, match="family"):
        model.config_from_dict({"family": "bert"})


def test_config_is_hashable_and_tree_is_hf_shaped():
    """The config is a static jit argument (hashable); the unscanned tree has HF's layer names and kernel shapes."""
    from dss_jax.params import expected_shapes

    cfg = convert_gemma.gemma_config_from_hf({"model_type": "t5gemma", "encoder": dict(ENC), "decoder": dict(DEC)})
    hash(cfg)
    shapes = expected_shapes(cfg)
    assert shapes["encoder/layers_2/self_attn/k_proj/kernel"] == (32, 2 * 12)  # GQA: 2 kv heads of 12
    assert shapes["decoder/layers_1/cross_attn/q_proj/kernel"] == (32, 4 * 12)
    assert "decoder/layers_1/self_attn/q_norm/scale" not in shapes  # QK-norm is T5Gemma 2's
    scanned = expected_shapes(cfg.replace(scan_layers=True))
    assert scanned["encoder/layers/self_attn/q_proj/kernel"] == (3, 32, 48)


def test_dss_convert_both_ways_with_tokenizer_files(hf_models, tmp_path, caplog):
    """dss-convert hf-to-dss / dss-to-hf on a T5Gemma 2 dir: the vision tower is dropped with a notice, the
    tokenizer files travel both ways (tokenizer.model is the run's spiece.model), and the export loads in HF
    with the same text weights."""
    import logging
    import shutil

    from safetensors.numpy import load_file

    from dss_jax import checkpoints
    from dss_jax.tasks import vocab

    _, d = hf_models("t5gemma2")
    src = tmp_path / "hf"
    shutil.copytree(d, src)
    vocab.train_sentencepiece(["the cat sat on the mat", "a dog ran"] * 30, 40, src / "tokenizer.model", special_ids="gemma")
    (src / "tokenizer_config.json").write_text('{"add_bos_token": true}\n')
    with caplog.at_level(logging.WARNING):
        assert convert.main(["hf-to-dss", str(src), str(tmp_path / "dss")]) == 0
    assert any("vision tower" in r.getMessage() for r in caplog.records)
    dss = tmp_path / "dss"
    assert (dss / "spiece.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert (dss / "tokenizer_config.json").exists()
    assert checkpoints.read_config(dss).family == "t5gemma2"
    assert convert.main(["dss-to-hf", str(dss), str(tmp_path / "back")]) == 0
    back = tmp_path / "back"
    assert (back / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert json.loads((back / "generation_config.json").read_text())["decoder_start_token_id"] == 2
    a, b = load_file(str(src / "model.safetensors")), load_file(str(back / "model.safetensors"))
    for k, v in b.items():
        assert np.array_equal(a[k], v), k
    reloaded = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(back).eval()
    ids, dec = _inputs(4)
    params, cfg = convert.load_hf(back, dtype="float32")
    np.testing.assert_allclose(_apply(cfg, params, ids, dec), _hf_logits(reloaded, ids, dec), atol=1e-4, rtol=1e-4)


def test_sharded_safetensors_import_equals_single_file(hf_models, tmp_path):
    """A T5Gemma 2 saved in several safetensors shards (model.safetensors.index.json) imports to the same tree."""
    hf, d = hf_models("t5gemma2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, cfg_a = convert.load_hf(d)
    b, cfg_b = convert.load_hf(tmp_path / "sharded")
    fa, fb = flatten(a), flatten(b)
    assert cfg_a == cfg_b and fa.keys() == fb.keys()
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
