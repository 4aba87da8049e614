"""The paper's training step, dss_jax against the paper's PyTorch code path, on the same real examples.

    python bench/paper_recipe.py --model t5_1_1_small --batch 64 --batches 2 --rounds 2 [--dtype float32]

The step (Hsieh et al., 2023): ``--batch`` CQA training inputs from the released data, each with its label
and its teacher rationale target; loss a * L_label + (1 - a) * L_rationale (a = 0.5), AdamW lr 5e-5, gradient
clip 1.0. Both sides get the same examples: the project's real input pipeline (seqio, padded to 1024/256 as in
``runs/dss.gin``) makes ``--batches`` batches once, then
- dss_jax: ``dss_jax.batching.Repacker`` (the ``batching`` option of the run gins; the repacking is timed),
  then the jitted train step;
- PyTorch: Hugging Face ``T5ForConditionalGeneration`` as the paper's code runs it: two forward passes
  (label batch, rationale batch), each padded to its own longest example (DataCollatorForSeq2Seq's dynamic
  padding), labels -100 on padding, torch AdamW, ``clip_grad_norm_``.
Both models have the same architecture and random weights (no download); the vocabulary is a SentencePiece
model trained on CQA (``dss-vocab``, 8000 pieces), so token counts are the same on both sides. Each side runs in
its own subprocess (so peak memory is its own): a warm-up pass over every batch (compiles each step shape),
then timed passes; ``--rounds`` alternates the sides. Prints one JSON object: examples/s of each side, the
speed ratio, the tokens each side computes per step (padding included) and their ratio, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_batches(a: argparse.Namespace, path: str) -> None:
    """Padded DSS batches of real CQA examples through the project's pipeline, saved as npz."""
    from dss_jax.tasks import pipeline, vocab

    v = vocab.get_vocabulary(train_on="cqa", vocab_size=VOCAB)
    data = pipeline.SeqioData(benchmark="cqa", method="dss", vocabulary=v, inputs_length=1024, targets_length=256, pack=False)
    it = data.train_iterator(2 * a.batch, seed=0, shard_id=0, num_shards=1)
    batches = [next(it) for _ in range(a.batches)]
    np.savez(path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})


VOCAB = 8000


def _config(a: argparse.Namespace):
    """The model preset, with room for the CQA vocabulary's ids (presets smaller than it grow their embedding)."""
    from dss_jax import configs

    cfg = configs.model_config(a.model, dropout_rate=0.0)
    return cfg.replace(vocab_size=max(cfg.vocab_size, VOCAB))


def load_batches(path: str) -> list[dict[str, np.ndarray]]:
    z = np.load(path)
    out: dict[int, dict[str, np.ndarray]] = {}
    for key in z.files:
        i, k = key.split("/", 1)
        out.setdefault(int(i), {})[k] = z[key]
    return [out[i] for i in sorted(out)]


def run_jax(a: argparse.Namespace, batches: list[dict[str, np.ndarray]]) -> dict:
    import jax

    from dss_jax import batching, losses, optim, partitioning, trainer

    cfg = _config(a).replace(dtype=a.dtype)
    tx = optim.make_optimizer("adamw", learning_rate=5e-5, grad_clip_norm=1.0)
    mc = partitioning.MeshConfig(data=-1)
    mesh = partitioning.make_mesh(mc)
    layout = trainer.state_layout(cfg, tx, mesh, mc.rules)
    bsh = partitioning.batch_sharding(mesh, mc.rules)
    step = trainer.jit_train_step(cfg, tx, losses.LossConfig(alpha=0.5), 1, 0, layout, bsh, mesh)
    rp = batching.Repacker(a.batching, 1024, 256, rows_multiple=jax.device_count())
    computed = []
    with jax.set_mesh(mesh):
        state = trainer.init_state(cfg, tx, layout, 0)
        t0 = time.time()
        for b in batches:  # warm-up: compiles each step shape
            state, m = step(state, partitioning.global_batch(rp(b), bsh))
        jax.block_until_ready(m["loss"])
        warmup = time.time() - t0
        times = []
        for _ in range(a.passes):
            for b in batches:
                t = time.time()
                packed = rp(b)
                state, m = step(state, partitioning.global_batch(packed, bsh))
                jax.block_until_ready(m["loss"])
                times.append(time.time() - t)
                computed.append(batching.computed_tokens(packed))
    return {"step_seconds": times, "warmup_seconds": warmup, "computed_tokens_per_step": float(np.mean(computed))}


def _torch_batches(b: dict[str, np.ndarray], task: int) -> tuple:
    """The paper's collator: this task's rows, padded to their longest input and longest target."""
    import torch

    rows = b["decoder_task_ids"][:, 0] == task
    enc, tgt = b["encoder_input_tokens"][rows], b["decoder_target_tokens"][rows]
    le = int((enc != 0).sum(1).max())
    lt = int((tgt != 0).sum(1).max())
    enc, tgt = enc[:, :le], tgt[:, :lt].astype(np.int64)
    labels = np.where(tgt == 0, -100, tgt)
    return torch.from_numpy(enc.astype(np.int64)), torch.from_numpy((enc != 0).astype(np.int64)), torch.from_numpy(labels)


def run_torch(a: argparse.Namespace, batches: list[dict[str, np.ndarray]]) -> dict:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    c = _config(a)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff, num_layers=c.num_encoder_layers,
            num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads, feed_forward_proj=c.feed_forward_proj,
            relative_attention_num_buckets=c.relative_attention_num_buckets,
            relative_attention_max_distance=c.relative_attention_max_distance, dropout_rate=0.0,
            tie_word_embeddings=c.tie_word_embeddings, decoder_start_token_id=0,
        )
    )  # fmt: skip
    if a.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, eps=1e-8, weight_decay=0.0)
    prepared = [(_torch_batches(b, 1), _torch_batches(b, 2)) for b in batches]
    computed = [sum(x[0].numel() + x[2].numel() for x in pair) for pair in prepared]

    def step(pair: tuple) -> None:
        (e1, m1, l1), (e2, m2, l2) = pair
        loss = 0.5 * model(input_ids=e1, attention_mask=m1, labels=l1).loss
        loss = loss + 0.5 * model(input_ids=e2, attention_mask=m2, labels=l2).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    t0 = time.time()
    for pair in prepared:
        step(pair)
    warmup = time.time() - t0
    times = []
    for _ in range(a.passes):
        for b in batches:
            t = time.time()
            step((_torch_batches(b, 1), _torch_batches(b, 2)))  # the collation is timed, as ours is
            times.append(time.time() - t)
    return {"step_seconds": times, "warmup_seconds": warmup, "computed_tokens_per_step": float(np.mean(computed)),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def peak_rss_gib() -> float:
    """This process's peak resident memory (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(a: argparse.Namespace) -> None:
    batches = load_batches(a.data_file)
    out = run_jax(a, batches) if a.side == "dss_jax" else run_torch(a, batches)
    out["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t5_1_1_small")
    p.add_argument("--batch", type=int, default=64, help="inputs per step (each with label and rationale)")
    p.add_argument("--batches", type=int, default=2, help="distinct batches (real examples)")
    p.add_argument("--passes", type=int, default=1, help="timed passes over the batches per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two sides")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batching", default="packed", choices=["packed", "bucketed", "padded"])
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data_file", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        return child(a)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batches.npz")
        make_batches(a, path)
        results: dict[str, list[dict]] = {"dss_jax": [], "pytorch_hf": []}
        for _ in range(a.rounds):
            for side in ("dss_jax", "pytorch_hf"):
                cmd = [sys.executable, __file__, f"--side={side}", f"--data_file={path}"] + [
                    f"--{k}={getattr(a, k)}" for k in ("model", "batch", "batches", "passes", "dtype", "batching")
                ]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
                if r.returncode != 0:
                    sys.exit(f"{side} failed:\n{r.stderr[-3000:]}")
                results[side].append(json.loads(r.stdout.strip().splitlines()[-1]))
    summary = {}
    for side, runs in results.items():
        times = [t for r in runs for t in r["step_seconds"]]
        summary[side] = {
            "examples_per_sec": a.batch / float(np.median(times)),
            "step_seconds_median": float(np.median(times)),
            "step_seconds": times,
            "computed_tokens_per_step": runs[0]["computed_tokens_per_step"],
            "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
            "warmup_seconds": [r["warmup_seconds"] for r in runs],
        }
    real = summary["dss_jax"]["computed_tokens_per_step"]
    print(
        json.dumps(
            {
                "model": a.model,
                "dtype": a.dtype,
                "inputs_per_step": a.batch,
                "batching": a.batching,
                "device": __import__("platform").processor() or "cpu",
                "cpus": os.cpu_count(),
                **summary,
                "speedup_examples_per_sec": summary["dss_jax"]["examples_per_sec"] / summary["pytorch_hf"]["examples_per_sec"],
                "token_ratio_pytorch_over_dss_jax": summary["pytorch_hf"]["computed_tokens_per_step"] / real,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
