"""Generated tokens per second of cached decoding (greedy or beam) on the devices present; prints JSON.

python bench/decode_throughput.py --model t5_1_1_small --batch 64 --inputs_length 256 --decode_length 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dss_jax import configs, decoding, model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t5_1_1_tiny")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs_length", type=int, default=128)
    p.add_argument("--decode_length", type=int, default=32)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    # eos id made unreachable so every row decodes the full length: tokens/s is then exact
    cfg = configs.model_config(a.model, dtype=a.dtype, dropout_rate=0.0).replace(eos_token_id=-1)
    params = jax.jit(lambda r: model.init_params(cfg, r))(jax.random.PRNGKey(0))
    ids = np.random.RandomState(0).randint(2, cfg.vocab_size, size=(a.batch, a.inputs_length)).astype(np.int32)

    def run():
        if a.num_beams > 1:
            return decoding.beam_search(params, ids, cfg, a.decode_length, a.num_beams)[0]
        return decoding.decode(params, ids, cfg, a.decode_length)

    t0 = time.time()
    jax.block_until_ready(run())
    compile_s = time.time() - t0
    t0 = time.time()
    for _ in range(a.repeats):
        out = jax.block_until_ready(run())
    dt = (time.time() - t0) / a.repeats
    generated = a.batch * a.decode_length * a.num_beams
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
            }
        )
    )


if __name__ == "__main__":
    main()
