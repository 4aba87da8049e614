"""Generated tokens per second of cached decoding (greedy or beam) on the devices present; prints JSON.

    python bench/decode_throughput.py --model t5_1_1_small --batch 16 --inputs_length 256 --decode_length 64 \
        --dtype float32 --compare_hf [--num_beams 4]

``--compare_hf`` runs Hugging Face transformers' ``generate`` (torch, CPU) on the same model (random weights,
converted 1:1 with dss_jax.convert) and the same inputs, alternating with ours, and reports both rates and the
ratio. Both sides generate exactly ``--decode_length`` tokens per row (ours: EOS made unreachable; HF:
``min_new_tokens``), so tokens/s compare like for like; beams count every beam's tokens on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np

from dss_jax import configs, decoding, model


def _hf_model_and_params(cfg):
    """A random transformers T5 of ``cfg``'s architecture and the same weights as dss_jax parameters."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from dss_jax import convert

    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(**{**convert.config_to_hf(cfg.replace(eos_token_id=1)), "dropout_rate": 0.0})).eval()
    state = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    params = convert.hf_state_to_params(state, cfg.replace(eos_token_id=1))
    return hf, jax.device_put(params)


def _time_hf(hf, ids: np.ndarray, a: argparse.Namespace) -> tuple[float, np.ndarray]:
    import torch

    x = torch.from_numpy(ids.astype(np.int64))
    n = a.decode_length
    kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=a.num_beams, do_sample=False)
    if a.num_beams > 1:
        kw["num_return_sequences"] = a.num_beams
    with torch.inference_mode():
        t0 = time.time()
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        dt = time.time() - t0
    assert out.shape[-1] >= n, out.shape  # every row generated the full length
    return dt, out[:, 1:].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t5_1_1_tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs_length", type=int, default=128)
    p.add_argument("--decode_length", type=int, default=32)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare_hf", action="store_true", help="also time transformers' generate on the same model")
    a = p.parse_args()
    # eos id made unreachable so every row decodes the full length: tokens/s is then exact
    cfg = configs.model_config(a.model, dtype=a.dtype, dropout_rate=0.0).replace(eos_token_id=-1)
    hf_model = None
    if a.compare_hf:
        hf_model, params = _hf_model_and_params(cfg)
    else:
        params = jax.jit(lambda r: model.init_params(cfg, r))(jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(2, cfg.vocab_size, size=(a.batch, a.inputs_length)).astype(np.int32)

    def run():
        if a.num_beams > 1:
            return decoding.beam_search(params, ids, cfg, a.decode_length, a.num_beams)[0]
        return decoding.decode(params, ids, cfg, a.decode_length)

    t0 = time.time()
    jax.block_until_ready(run())
    compile_s = time.time() - t0
    generated = a.batch * a.decode_length * a.num_beams
    ours, theirs = [], []
    if hf_model is not None:
        _time_hf(hf_model, ids, a)  # warm-up, as ours compiled above
    for _ in range(a.repeats):  # alternate the sides so machine noise hits both alike
        t0 = time.time()
        out = jax.block_until_ready(run())
        ours.append(time.time() - t0)
        if hf_model is not None:
            dt_hf, hf_tokens = _time_hf(hf_model, ids, a)
            theirs.append(dt_hf)
    dt = float(np.median(ours))
    hf = {}
    if theirs:
        hf_dt = float(np.median(theirs))
        hf = {
            "hf_seconds_per_batch": round(hf_dt, 4),
            "hf_generated_tokens_per_s": round(generated / hf_dt, 1),
            "speedup_vs_hf": round(hf_dt / dt, 2),
        }
        if a.num_beams == 1:  # the same function: greedy tokens agree (EOS excluded on both sides)
            hf["greedy_tokens_equal_fraction"] = float(np.mean(np.asarray(out) == hf_tokens[:, : a.decode_length]))
    print(
        json.dumps(
            {
                "model": a.model,
                "device_kind": jax.devices()[0].device_kind,
                "batch": a.batch,
                "num_beams": a.num_beams,
                "inputs_length": a.inputs_length,
                "decode_length": a.decode_length,
                "dtype": a.dtype,
                "seconds_per_batch": round(dt, 4),
                "generated_tokens_per_s": round(generated / dt, 1),
                "sequences_per_s": round(a.batch / dt, 2),
                "first_call_incl_compile_s": round(compile_s, 2),
                "output_shape": list(np.asarray(out).shape),
                **hf,
            }
        )
    )


if __name__ == "__main__":
    main()
