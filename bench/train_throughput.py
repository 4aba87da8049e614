"""Train-step throughput of the model/trainer core on the devices present; prints one JSON object.

    python bench/train_throughput.py --model t5_1_1_small --batch 64 --inputs_length 512 --targets_length 128
    python bench/train_throughput.py --model t5gemma2_270m_270m    # on a CPU: batch 4, 128/32 tokens, 3 steps

No TensorFlow: batches are synthetic (``--fill`` sets the non-padding fraction), so the numbers are the
trainer's, not the input pipeline's. MFU counts the model FLOPs of non-padding tokens only where the device's
peak is known (TPU, H100/H200, A100). ``peak_rss_gib`` is the process's peak resident memory (host RAM; on a CPU
backend that includes the model's parameters, optimizer state and activations).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import optax
from common import peak_flops, synthetic_batch

from dss_jax import configs, losses, partitioning, trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="t5_1_1_tiny")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 32; 4 on a CPU)")
    p.add_argument("--inputs_length", type=int, default=None, help="default 256; 128 on a CPU")
    p.add_argument("--targets_length", type=int, default=None, help="default 128; 32 on a CPU")
    p.add_argument("--fill", type=float, default=1.0, help="non-padding fraction of each row")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps, compile included (default 2; 1 on a CPU)")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation slices of the batch")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none", choices=["none", "full", "minimal"])
    p.add_argument("--scan", action="store_true")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--model_parallel", type=int, default=1)
    a = p.parse_args()
    # a CPU step of a 256k-vocabulary model at accelerator sizes takes minutes: smaller defaults there
    cpu = jax.default_backend() == "cpu"
    for name, accel, on_cpu in (
        ("batch", 32, 4),
        ("inputs_length", 256, 128),
        ("targets_length", 128, 32),
        ("steps", 10, 3),
        ("warmup", 2, 1),
    ):
        if getattr(a, name) is None:
            setattr(a, name, on_cpu if cpu else accel)

    cfg = configs.model_config(a.model, dtype=a.dtype, remat_policy=a.remat, scan_layers=a.scan, dropout_rate=0.0)
    tx = optax.adamw(1e-4) if a.optimizer == "adamw" else optax.adafactor(1e-3)
    mesh_cfg = partitioning.MeshConfig(data=a.data, fsdp=a.fsdp, model=a.model_parallel)
    mesh = partitioning.make_mesh(mesh_cfg)
    layout = trainer.state_layout(cfg, tx, mesh, mesh_cfg.rules)
    bsh = partitioning.batch_sharding(mesh, mesh_cfg.rules)
    step = trainer.jit_train_step(cfg, tx, losses.LossConfig(), a.microbatches, 0, layout, bsh, mesh)
    local = synthetic_batch(a.batch, a.inputs_length, a.targets_length, cfg.vocab_size, a.fill)
    with jax.set_mesh(mesh):
        state = trainer.init_state(cfg, tx, layout, 0)
        batch = partitioning.global_batch(local, bsh)
        t_compile = time.time()
        for _ in range(a.warmup):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        t_compile = time.time() - t_compile
        t0 = time.time()
        for _ in range(a.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        dt = (time.time() - t0) / a.steps
    real_in = float((local["encoder_input_tokens"] != 0).sum())
    real_tgt = float(local["decoder_loss_weights"].sum())
    total = a.batch * (a.inputs_length + a.targets_length)
    flops_step = trainer.train_flops_per_token(cfg, a.inputs_length, a.targets_length) * a.batch * a.targets_length
    real_flops_step = flops_step * (real_in + real_tgt) / total
    peak = peak_flops(jax.devices()[0])
    print(
        json.dumps(
            {
                "model": a.model,
                "params_m": round(sum(x.size for x in jax.tree_util.tree_leaves(state.params)) / 1e6, 2),
                "devices": jax.device_count(),
                "device_kind": jax.devices()[0].device_kind,
                "mesh": dict(mesh.shape),
                "batch": a.batch,
                "inputs_length": a.inputs_length,
                "targets_length": a.targets_length,
                "dtype": a.dtype,
                "remat": a.remat,
                "scan": a.scan,
                "optimizer": a.optimizer,
                "microbatches": a.microbatches,
                "vocab_size": cfg.vocab_size,
                "step_time_s": round(dt, 5),
                "steps_per_s": round(1 / dt, 3),
                "examples_per_s": round(a.batch / dt, 1),
                "tokens_per_s": round(total / dt, 1),
                "nonpad_tokens_per_s": round((real_in + real_tgt) / dt, 1),
                "padding_fraction": round(1 - (real_in + real_tgt) / total, 4),
                "model_tflops_per_s": round(real_flops_step / dt / 1e12, 3),
                "mfu": round(real_flops_step / dt / (peak * jax.device_count()), 4) if peak else None,
                "warmup_incl_compile_s": round(t_compile, 2),
                "final_loss": float(m["loss"]),
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # Linux: KiB
            }
        )
    )


if __name__ == "__main__":
    main()
