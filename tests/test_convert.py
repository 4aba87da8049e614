"""Checkpoint interop: HF -> dss_jax (Orbax) -> HF is exact, transformers loads the export, T5X imports."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from factories import logits
from safetensors.numpy import load_file, save_file

from dss_jax import checkpoints, convert, model
from dss_jax.configs import model_config

CLI = [sys.executable, "-m", "dss_jax.convert"]


def _run(*args, ok=True):
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    return r


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True], ids=["t5_v1_0", "t5_v1_1"])
def test_hf_to_dss_to_hf_round_trip_is_exact(hf_dir_factory, tmp_path, gated):
    from transformers import T5ForConditionalGeneration

    src, hf = hf_dir_factory(gated)
    _run("hf-to-dss", src, tmp_path / "dss")
    _run("dss-to-hf", tmp_path / "dss", tmp_path / "back")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    tied_copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"} if not gated else set()
    assert set(b) == set(a) - tied_copies - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # transformers loads the export and computes what the original did
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor([[5, 6, 7, 1, 0], [9, 8, 1, 0, 0]])
    labels = torch.tensor([[3, 4, 1], [7, 1, 0]])
    with torch.no_grad():
        l1 = hf(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
        l2 = back(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).logits
    assert torch.equal(l1, l2)


def test_converted_checkpoint_restores_into_scanned_layout(hf_dir_factory, tmp_path):
    src, _ = hf_dir_factory(True)
    params, cfg = convert.load_hf(src)
    checkpoints.save_pretrained(tmp_path / "dss", params, cfg)
    scanned, scfg, _ = checkpoints.load_pretrained(tmp_path / "dss", cfg.replace(scan_layers=True, dtype="float32"))
    assert scanned["encoder"]["layers"]["attention"]["query"]["kernel"].shape[0] == cfg.num_encoder_layers
    ids = jnp.array([[5, 6, 7, 1]])
    a = logits(cfg.replace(dtype="float32"), params, ids, model.shift_right(ids))
    b = logits(scfg, scanned, ids, model.shift_right(ids))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4


def test_sharded_safetensors_index_is_read(hf_dir_factory, tmp_path):
    src, _ = hf_dir_factory(True)
    state = load_file(str(src / "model.safetensors"))
    names = sorted(state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((src / "config.json").read_text())
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(shard_dir / fname))
        weight_map.update({k: fname for k in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    p1, _ = convert.load_hf(src)
    p2, _ = convert.load_hf(shard_dir)
    f1, f2 = convert.flatten(p1), convert.flatten(p2)
    assert f1.keys() == f2.keys() and all(np.array_equal(f1[k], f2[k]) for k in f1)


@pytest.mark.slow
def test_mismatched_tensors_are_named_with_both_shapes(hf_dir_factory, tmp_path):
    src, _ = hf_dir_factory(True)
    state = load_file(str(src / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())

    def write(st):
        save_file(st, str(bad / "model.safetensors"))

    st = dict(state)
    st["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 63), np.float32)
    write(st)
    r = _run("hf-to-dss", bad, tmp_path / "out", ok=False)
    assert "encoder/layers_1/mlp/wo/kernel" in r.stderr and "(63, 32)" in r.stderr and "(64, 32)" in r.stderr

    st = dict(state)
    del st["decoder.block.0.layer.1.EncDecAttention.k.weight"]
    st["decoder.block.0.layer.1.EncDecAttention.bogus.weight"] = np.zeros((2, 2), np.float32)
    write(st)
    r = _run("hf-to-dss", bad, tmp_path / "out", ok=False)
    assert "missing tensor decoder.block.0.layer.1.EncDecAttention.k.weight" in r.stderr
    assert "unexpected tensor decoder.block.0.layer.1.EncDecAttention.bogus.weight" in r.stderr


def test_restoring_into_another_architecture_names_the_difference(hf_dir_factory, tmp_path):
    src, _ = hf_dir_factory(True)
    params, cfg = convert.load_hf(src)
    checkpoints.save_pretrained(tmp_path / "dss", params, cfg)
    with pytest.raises(ValueError, match="d_ff: checkpoint 64 vs config 128"):
        checkpoints.load_pretrained(tmp_path / "dss", cfg.replace(d_ff=128))


def _write_t5x_checkpoint(step_dir, params):
    """A legacy T5X checkpoint: msgpack tree whose leaves are tensorstore zarr specs (as T5X writes them)."""
    import tensorstore as ts
    from flax import serialization

    step_dir.mkdir(parents=True)
    target = {}
    for name, arr in convert.flatten(params).items():
        rel = "target." + name.replace("/", ".")
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": rel},
            "metadata": {"shape": list(arr.shape), "chunks": list(arr.shape), "dtype": "<f4", "compressor": {"id": "gzip"}},
        }
        store = ts.open({**spec, "kvstore": {"driver": "file", "path": str(step_dir / rel)}}, create=True).result()
        store.write(np.asarray(arr, np.float32)).result()
        node = target
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = spec
    state = {"step": np.int32(100), "param_states": {}}
    tree = {"version": 3, "optimizer": {"target": target, "state": state}}
    (step_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))


@pytest.mark.slow
def test_t5x_checkpoint_imports(hf_dir_factory, tmp_path):
    src, _ = hf_dir_factory(True)
    params, cfg = convert.load_hf(src)
    _write_t5x_checkpoint(tmp_path / "t5x" / "checkpoint_100", params)
    _run("t5x-to-dss", tmp_path / "t5x" / "checkpoint_100", tmp_path / "dss", "--hf_config", src / "config.json")
    restored, _, _ = checkpoints.load_pretrained(tmp_path / "dss")
    f1, f2 = convert.flatten(params), convert.flatten(restored)
    assert f1.keys() == f2.keys() and all(np.array_equal(f1[k], f2[k]) for k in f1)


def test_unknown_model_size_lists_the_known_ones():
    with pytest.raises(ValueError, match="t5_1_1_base.*t5_1_1_tiny|t5_1_1_tiny"):
        model_config("t5_1_1_huge")
