"""``dss-plan``: will this model, batch and partitioning fit a TPU slice? Answered on a CPU.

    dss-plan --model t5_1_1_xxl --topology v4-64 --batch 128 --fsdp 16 --model_parallel 2 --remat full

Compiles the real train step ahead of time for a TPU topology through libtpu (``jax.experimental.topologies``;
install the ``tpu`` extra) and reports per-device memory (parameters, optimizer state, temporaries), whether
it fits the chip's HBM, FLOPs per step and the compiler's estimate of the step time. Nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

# Chips' HBM (GiB) and dense bf16 peak (FLOP/s), per chip.
CHIPS = {
    "v4": {"hbm_gib": 32, "peak_flops": 275e12, "dims": 3, "cores_per_chip": 2},
    "v5p": {"hbm_gib": 95, "peak_flops": 459e12, "dims": 3, "cores_per_chip": 2},
    "v5e": {"hbm_gib": 16, "peak_flops": 197e12, "dims": 2, "cores_per_chip": 1},
    "v6e": {"hbm_gib": 32, "peak_flops": 918e12, "dims": 2, "cores_per_chip": 1},
}
_3D = {
    1: "1x1x1",
    2: "1x2x1",
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def parse_topology(name: str) -> tuple[str, str, int]:
    """'v4-8' (Cloud TPU naming: cores for v4/v5p, chips for v5e/v6e) or 'v5e:4x4' -> (generation, jax name, chips)."""
    if ":" in name:
        gen, shape = name.split(":", 1)
        chips = math.prod(int(x) for x in shape.split("x"))
    else:
        gen, _, n = name.partition("-")
        if gen not in CHIPS or not n.isdigit():
            raise ValueError(f"unknown topology {name!r}; use e.g. v4-8, v5p-16, v5e-16, v6e-8 or v5e:4x4")
        chips = int(n) // int(CHIPS[gen]["cores_per_chip"])
        table = _3D if CHIPS[gen]["dims"] == 3 else _2D
        if chips not in table:
            raise ValueError(f"{name}: no standard {gen} slice with {chips} chips; sizes: {sorted(table)} chips")
        shape = table[chips]
    if gen not in CHIPS:
        raise ValueError(f"unknown TPU generation {gen!r}; known: {sorted(CHIPS)}")
    return gen, f"{gen}:{shape}", chips


def _bytes_per_device(abstract: Any, shardings: Any) -> int:
    import jax
    import numpy as np

    total = 0
    for a, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings), strict=True):
        shard = s.shard_shape(a.shape)
        total += int(np.prod(shard)) * np.dtype(a.dtype).itemsize
    return total


def plan(
    model: str,
    topology: str,
    batch: int,
    inputs_length: int = 1024,
    targets_length: int = 256,
    data: int = -1,
    fsdp: int = 1,
    model_parallel: int = 1,
    remat: str = "full",
    scan: bool = True,
    optimizer: str = "adamw",
    dtype: str = "bfloat16",
    microbatches: int = 1,
    attention_block: int = 512,
) -> dict[str, Any]:
    import jax
    import optax
    from jax.experimental import topologies

    from dss_jax import configs, losses, partitioning, trainer

    gen, jax_name, chips = parse_topology(topology)
    topo = topologies.get_topology_desc(platform="tpu", topology_name=jax_name)
    devices = topo.devices
    cfg = configs.model_config(
        model,
        dtype=dtype,
        remat_policy=remat,
        scan_layers=scan,
        attention_q_block=attention_block,
        attention_k_block=attention_block,
    )
    tx = optax.adamw(5e-5) if optimizer == "adamw" else optax.adafactor(1e-3)
    mesh_cfg = partitioning.MeshConfig(data=data, fsdp=fsdp, model=model_parallel)
    mesh = partitioning.make_mesh(mesh_cfg, devices)
    layout = trainer.state_layout(cfg, tx, mesh, mesh_cfg.rules)
    bsh = partitioning.batch_sharding(mesh, mesh_cfg.rules)
    step = trainer.jit_train_step(cfg, tx, losses.LossConfig(), microbatches, 0, layout, bsh, mesh)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings
    )
    shapes = {
        "encoder_input_tokens": inputs_length,
        "decoder_input_tokens": targets_length,
        "decoder_target_tokens": targets_length,
        "decoder_loss_weights": targets_length,
        "decoder_task_ids": targets_length,
    }
    abstract_batch = {k: jax.ShapeDtypeStruct((batch, n), jax.numpy.int32, sharding=bsh) for k, n in shapes.items()}
    gib = 2**30
    hbm = CHIPS[gen]["hbm_gib"] * 2**30 * chips / len(devices)  # v4/v5p expose each TensorCore as a device
    tokens = batch * (inputs_length + targets_length)
    model_flops = trainer.train_flops_per_token(cfg, inputs_length, targets_length) * batch * targets_length / len(devices)
    peak_per_device = CHIPS[gen]["peak_flops"] * chips / len(devices)
    row: dict[str, Any] = {
        "model": model,
        "topology": topology,
        "jax_topology": jax_name,
        "chips": chips,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "batch": batch,
        "inputs_length": inputs_length,
        "targets_length": targets_length,
        "remat": remat,
        "microbatches": microbatches,
        "attention_block": attention_block,
        "scan_layers": scan,
        "optimizer": optimizer,
        "hbm_gib_per_device": round(hbm / gib, 2),
        "params_gib_per_device": round(_bytes_per_device(layout.abstract.params, layout.shardings.params) / gib, 6),
        "optimizer_state_gib_per_device": round(
            _bytes_per_device(layout.abstract.opt_state, layout.shardings.opt_state) / gib, 6
        ),
        "model_flops_per_step_per_device": model_flops,
        "tokens_per_step": tokens,
        "roofline_step_s": round(model_flops / peak_per_device, 4),
    }
    t0 = time.time()
    try:
        compiled = step.lower(abstract_state, abstract_batch).compile()
    except Exception as e:  # the TPU compiler refuses programs that cannot fit: that is an answer, not a crash
        msg = str(e).splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in msg and "HbmOom" not in msg:
            raise
        return {**row, "fits": False, "compiler_message": msg[:400], "compile_s": round(time.time() - t0, 1)}
    compile_s = time.time() - t0
    mem = compiled.memory_analysis()
    assert mem is not None, "the TPU compiler reports the memory of what it compiles"
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    args_b, temp_b = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    out_b, alias_b = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak_b = args_b + out_b - alias_b + temp_b + code_b
    est = cost.get("optimal_seconds") if cost else None
    return {
        **row,
        "arguments_gib": round(args_b / gib, 3),
        "temporaries_gib": round(temp_b / gib, 3),
        "peak_gib_per_device": round(peak_b / gib, 3),
        "fits": peak_b <= hbm,
        # XLA counts a scanned loop's body once: with scan_layers this is per layer, not per step
        "compiler_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        "compiler_estimated_step_s": float(est) if est is not None and est > 0 else None,
        "compile_s": round(compile_s, 1),
    }


def apply_partitioning_gin(args: argparse.Namespace, name: str) -> None:
    """Sets the mesh, remat, scan (and microbatches, where bound) arguments from a partitioning gin file's
    bindings (read as literals, never executed), so that what dss-plan measures is what a run including that file
    binds."""
    from dss_jax import configs
    from dss_jax.results import read_gin_values

    path = configs.GIN_DIR / "partitioning" / f"{name}.gin"
    if not path.exists():
        raise FileNotFoundError(f"no {path}")
    v = read_gin_values(path)
    args.data = int(v["partitioning.MeshConfig.data"])
    args.fsdp = int(v["partitioning.MeshConfig.fsdp"])
    args.model_parallel = int(v["partitioning.MeshConfig.model"])
    # a partitioning file binds the numerics of whichever config class its models use
    cls = "model.T5Config" if "model.T5Config.remat_policy" in v else "gemma.GemmaConfig"
    args.remat = str(v[f"{cls}.remat_policy"])
    args.no_scan = not bool(v[f"{cls}.scan_layers"])
    if "train.train.microbatches" in v:  # files whose model needs gradient accumulation to fit bind it too
        args.microbatches = int(v["train.train.microbatches"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU topology; never initialise one here
    p = argparse.ArgumentParser(prog="dss-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="gin/models name, e.g. t5_1_1_xxl")
    p.add_argument("--topology", required=True, nargs="+", help="e.g. v4-8 v4-64 v5e-16 v5p-32 or v5e:4x4")
    p.add_argument("--batch", type=int, default=128, help="global batch in sequences (DSS: 2 per input)")
    p.add_argument("--inputs_length", type=int, default=1024)
    p.add_argument("--targets_length", type=int, default=256)
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--model_parallel", type=int, default=1)
    p.add_argument("--remat", default="full", choices=["none", "full", "minimal"])
    p.add_argument("--no_scan", action="store_true", help="unroll layers (slower to compile)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation slices of the batch")
    p.add_argument("--attention_block", type=int, default=512, help="query/key block of the attention")
    p.add_argument(
        "--partitioning",
        default=None,
        help="take the mesh, remat, scan and microbatches from gin/partitioning/NAME.gin (what a run with that file binds)",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.partitioning:
        try:
            apply_partitioning_gin(a, a.partitioning)
        except (FileNotFoundError, KeyError) as e:
            print(f"dss-plan: --partitioning {a.partitioning}: {e}", file=sys.stderr)
            return 2
    rows = []
    for topo in a.topology:
        try:
            rows.append(
                plan(
                    a.model,
                    topo,
                    a.batch,
                    a.inputs_length,
                    a.targets_length,
                    a.data,
                    a.fsdp,
                    a.model_parallel,
                    a.remat,
                    not a.no_scan,
                    a.optimizer,
                    microbatches=a.microbatches,
                    attention_block=a.attention_block,
                )
            )
        except (ValueError, RuntimeError) as e:
            print(f"dss-plan: {topo}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        head = (
            f"{r['model']} on {r['topology']} ({r['chips']} chips, {r['devices']} devices, mesh {r['mesh']}), batch {r['batch']}"
        )
        mem = f"params {r['params_gib_per_device']} + optimizer {r['optimizer_state_gib_per_device']} GiB/device"
        if r["fits"]:
            print(
                f"{head}: FITS — peak {r['peak_gib_per_device']} of {r['hbm_gib_per_device']} GiB/device ({mem}, "
                f"temporaries {r['temporaries_gib']}); {r['model_flops_per_step_per_device']:.3g} model FLOPs/step/device, "
                f"roofline step {r['roofline_step_s']} s"
            )
        else:
            reason = r.get("compiler_message") or f"peak {r['peak_gib_per_device']} GiB > {r['hbm_gib_per_device']} GiB"
            print(f"{head}: DOES NOT FIT — {mem}; {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
