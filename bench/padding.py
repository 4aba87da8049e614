"""Padding fraction of real training batches with and without packing; prints JSON (uses seqio/TensorFlow).

python bench/padding.py --benchmark cqa --task cqa_dss_gold --inputs_length 1024 --targets_length 256
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from dss_jax.tasks import pipeline, registry, vocab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", default="cqa")
    p.add_argument("--task", default=None, help="default: <benchmark>_dss_gold")
    p.add_argument("--inputs_length", type=int, default=256)
    p.add_argument("--targets_length", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--spm", default=None, help="vocabulary (default: one trained on the benchmark)")
    a = p.parse_args()
    v = vocab.get_vocabulary(spm_path=a.spm) if a.spm else vocab.get_vocabulary(train_on=a.benchmark)
    registry.register_benchmark(a.benchmark, v, options=registry.DataOptions(train_fraction=1.0))
    task = a.task or f"{a.benchmark}_dss_gold"
    out = {"task": task, "inputs_length": a.inputs_length, "targets_length": a.targets_length, "batch_rows": a.batch}
    for pack in (False, True):
        ds = pipeline.get_dataset(task, "train", a.inputs_length, a.targets_length, a.batch, pack, True, 0, None)
        enc_pad = tgt_pad = enc_all = tgt_all = examples = 0
        for b in itertools.islice(ds.as_numpy_iterator(), a.batches):
            enc_pad += int((b["encoder_input_tokens"] == 0).sum())
            tgt_pad += int((b["decoder_target_tokens"] == 0).sum())
            enc_all += b["encoder_input_tokens"].size
            tgt_all += b["decoder_target_tokens"].size
            examples += int(np.sum(np.max(b["decoder_segment_ids"], axis=1))) if pack else a.batch
        out["packed" if pack else "unpacked"] = {
            "input_padding": round(enc_pad / enc_all, 4),
            "target_padding": round(tgt_pad / tgt_all, 4),
            "overall_padding": round((enc_pad + tgt_pad) / (enc_all + tgt_all), 4),
            "examples_per_batch": round(examples / a.batches, 1),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
