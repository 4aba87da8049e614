"""``dss-plan``: will this model, batch and partitioning fit a TPU slice, and how much of its step is useful work?
Answered on a CPU.

    dss-plan --model t5_1_1_xxl --topology v4-64 --batch 128 --fsdp 16 --model_parallel 2 --remat full
    dss-plan --model t5_1_1_base --topology v5e-8 --batch 128 --fsdp 8 --recipe packed

Compiles the real train step ahead of time for a TPU topology through libtpu (``jax.experimental.topologies``;
install the ``tpu`` extra) and reports per device: memory (parameters, optimizer state, temporaries) and whether
it fits the chip's HBM; the model FLOPs of the step (6 x parameters x real tokens plus attention at the real
lengths, ``dss_jax.flops.model_flops``); the compiled program's FLOPs and bytes with every loop counted by its
trip count (scanned layers, attention blocks and rows, microbatches: ``dss_jax.flops.loop_scaled_cost``); their
ratio; and the roofline step time and MFU bound that the chip's peak FLOP/s and HBM bandwidth allow.

``--recipe`` makes the step from real data: ``padded``, ``bucketed`` or ``packed`` batches of the benchmark's
DSS training examples (``dss_jax.batching``, as a run with that ``batching`` makes them); ``full`` (default)
takes rows of the configured lengths with every token real and reads no data. Nothing runs on a TPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from dss_jax import batching, flops

if TYPE_CHECKING:
    import numpy as np

# Chips' HBM (GiB), HBM bandwidth (bytes/s) and dense bf16 peak (FLOP/s), per chip (Cloud TPU documentation).
CHIPS = {
    "v4": {"hbm_gib": 32, "hbm_bytes_per_s": 1228e9, "peak_flops": 275e12, "dims": 3, "cores_per_chip": 2},
    "v5p": {"hbm_gib": 95, "hbm_bytes_per_s": 2765e9, "peak_flops": 459e12, "dims": 3, "cores_per_chip": 2},
    "v5e": {"hbm_gib": 16, "hbm_bytes_per_s": 819e9, "peak_flops": 197e12, "dims": 2, "cores_per_chip": 1},
    "v6e": {"hbm_gib": 32, "hbm_bytes_per_s": 1640e9, "peak_flops": 918e12, "dims": 2, "cores_per_chip": 1},
}
GIB = 2**30
RECIPES = ("full", "padded", "bucketed", "packed")
RECIPE_VOCAB = 8000  # the vocabulary bench/paper_recipe.py trains on CQA when no --spm is given
PLAN_DEFAULTS = {
    "remat": "full",
    "scan": True,
    "optimizer": "adamw",
    "rng_impl": "threefry2x32",
    "dtype": "bfloat16",
    "microbatches": 1,
    "attention_block": 512,
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


def recipe_batch(
    recipe: str,
    batch: int,
    inputs_length: int,
    targets_length: int,
    rows_multiple: int,
    benchmark: str,
    spm: str | None,
    samples: int,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """A training step's batch as the recipe makes it from real examples (the paper's DSS mixture, ``batch``
    sequences: half label, half rationale targets), and the real lengths of its examples.

    ``samples`` batches are read; the one with the median count of real tokens stands for the run. ``full``: rows
    of the configured lengths with every token real (no data read). Returns the batch, the real encoder and
    decoder lengths, and the (rows, encoder length, decoder length) of every sampled batch's row groups.
    """
    import numpy as np

    if recipe == "full":
        lengths = {"encoder_input_tokens": inputs_length, **{k: targets_length for k in batching.DEC_KEYS}}
        arrays = {k: np.ones((batch, n), np.int32) for k, n in lengths.items()}
        return arrays, np.full(batch, inputs_length), np.full(batch, targets_length), [(batch, inputs_length, targets_length)]
    from dss_jax.tasks import pipeline, vocab

    v = vocab.load_vocabulary(spm) if spm else vocab.get_vocabulary(train_on=benchmark, vocab_size=RECIPE_VOCAB)
    data = pipeline.SeqioData(
        benchmark=benchmark, method="dss", vocabulary=v, inputs_length=inputs_length, targets_length=targets_length,
        pack=False, batching=recipe,
    )  # fmt: skip
    it = data.train_iterator(batch, seed=0, shard_id=0, num_shards=1)
    repack = data.repacker(rows_multiple) or (lambda b: b)
    raw = [next(it) for _ in range(samples)]
    packed = [repack(b) for b in raw]
    shapes = [
        (g["encoder_input_tokens"].shape[0], g["encoder_input_tokens"].shape[1], g["decoder_target_tokens"].shape[1])
        for b in packed
        for g in batching.row_groups(b)
    ]
    real = [sum(int(x.sum()) for x in batching.real_lengths(b)) for b in raw]
    pick = sorted(range(samples), key=lambda i: (real[i], i))[samples // 2]  # the same batch whatever the recipe
    enc_len, dec_len = batching.real_lengths(raw[pick])
    return packed[pick], enc_len, dec_len, shapes


def _compile_target(model: str, topology: str, mesh_args: tuple[int, int, int], options: dict[str, Any]) -> dict[str, Any]:
    """The fake TPU devices, mesh, model config, state layout and jitted train step of a plan."""
    import jax
    import optax
    from jax.experimental import topologies

    from dss_jax import configs, losses, partitioning, trainer

    gen, jax_name, chips = parse_topology(topology)
    devices = topologies.get_topology_desc(platform="tpu", topology_name=jax_name).devices
    cfg = configs.model_config(
        model,
        dtype=options["dtype"],
        remat_policy=options["remat"],
        scan_layers=options["scan"],
        attention_q_block=options["attention_block"],
        attention_k_block=options["attention_block"],
    )
    tx = optax.adamw(5e-5) if options["optimizer"] == "adamw" else optax.adafactor(1e-3)
    mesh_cfg = partitioning.MeshConfig(data=mesh_args[0], fsdp=mesh_args[1], model=mesh_args[2])
    mesh = partitioning.make_mesh(mesh_cfg, devices)
    layout = trainer.state_layout(cfg, tx, mesh, mesh_cfg.rules)
    bsh = partitioning.batch_sharding(mesh, mesh_cfg.rules)
    step = trainer.jit_train_step(
        cfg, tx, losses.LossConfig(), options["microbatches"], 0, layout, bsh, mesh, rng_impl=options["rng_impl"]
    )
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), layout.abstract, layout.shardings
    )
    rows_multiple = max(1, math.prod(mesh.shape[a] for a in ("data", "fsdp")) * options["microbatches"])
    return dict(gen=gen, jax_name=jax_name, chips=chips, devices=devices, cfg=cfg, mesh=mesh, layout=layout, bsh=bsh,
                step=step, abstract_state=abstract_state, rows_multiple=rows_multiple)  # fmt: skip


def _memory_row(mem: Any, hbm: float) -> dict[str, Any]:
    args_b, temp_b = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes)
    out_b, alias_b = int(mem.output_size_in_bytes), int(mem.alias_size_in_bytes)
    code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak_b = args_b + out_b - alias_b + temp_b + code_b
    return {
        "arguments_gib": round(args_b / GIB, 3),
        "temporaries_gib": round(temp_b / GIB, 3),
        "peak_gib_per_device": round(peak_b / GIB, 3),
        "fits": peak_b <= hbm,
    }


def _flops_row(compiled: Any, model_flops: float, peak: float, hbm_bw: float) -> dict[str, Any]:
    """Compiled FLOPs and bytes per device with loops counted by their trip counts, against the model's FLOPs.

    FLOPs: XLA's own count with each loop body scaled (``flops.loop_scaled_cost``). Bytes: the TPU's once-counted
    bytes scaled by the same loop factor XLA:CPU's byte count shows (the TPU pads shapes to its tiles; the CPU's
    count does not), so an estimate; XLA counts every operand and output of every fusion, so it bounds HBM traffic
    from above and the memory side of the roofline is pessimistic (both sides are reported)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    scaled = flops.loop_scaled_cost(compiled.as_text())
    once_b = scaled["once"]["bytes accessed"]
    bytes_ = float(cost.get("bytes accessed", once_b)) * (scaled["bytes accessed"] / once_b if once_b else 1.0)
    step_s = flops.roofline(scaled["flops"], bytes_, peak, hbm_bw)
    return {
        "compiled_flops_per_device": scaled["flops"],
        "compiled_bytes_per_device": bytes_,
        "xla_flops_loops_once_per_device": float(cost.get("flops", 0.0)),
        "loops": len(scaled["loops"]),
        "loops_without_trip_count": len(scaled["unresolved"]),
        "heaviest_loops": [
            {"op_name": lp["op_name"][-160:], "trips": lp["trips"], "runs": lp["runs"], "flops": lp["flops"]}
            for lp in sorted(scaled["loops"], key=lambda lp: -lp["flops"])[:4]
        ],
        "compiled_over_model_flops": round(scaled["flops"] / model_flops, 3) if model_flops else None,
        "roofline_step_s": round(step_s, 5),
        "roofline_compute_s": round(scaled["flops"] / peak, 5),
        "roofline_memory_s": round(bytes_ / hbm_bw, 5),
        "roofline_bound": "compute" if scaled["flops"] / peak >= bytes_ / hbm_bw else "memory",
        "mfu_bound": round(model_flops / peak / step_s, 4) if step_s else None,
    }


def plan(
    model: str,
    topology: str,
    batch: int,
    inputs_length: int = 1024,
    targets_length: int = 256,
    mesh_args: tuple[int, int, int] = (-1, 1, 1),
    recipe: str = "full",
    data: tuple[str, str | None, int] = ("cqa", None, 4),
    **options: Any,
) -> dict[str, Any]:
    """Compiles the train step for ``topology`` at the ``recipe``'s step shape and reports memory and FLOPs per device.

    ``mesh_args``: (data, fsdp, model); ``data``: (benchmark, vocabulary path or None, batches sampled);
    ``options``: remat, scan, optimizer, rng_impl, dtype, microbatches, attention_block (``PLAN_DEFAULTS``).
    """
    import jax

    options = {**PLAN_DEFAULTS, **options}
    t = _compile_target(model, topology, mesh_args, options)
    arrays, enc_len, dec_len, shapes = recipe_batch(recipe, batch, inputs_length, targets_length, t["rows_multiple"], *data)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, jax.numpy.int32, sharding=t["bsh"]) for k, v in arrays.items()}
    n_dev, chip = len(t["devices"]), CHIPS[t["gen"]]
    hbm = chip["hbm_gib"] * GIB * t["chips"] / n_dev  # v4/v5p expose each TensorCore as a device
    peak, hbm_bw = chip["peak_flops"] * t["chips"] / n_dev, chip["hbm_bytes_per_s"] * t["chips"] / n_dev
    counted = flops.model_flops(t["cfg"], enc_len, dec_len)
    step_shape = [
        [*g["encoder_input_tokens"].shape, g["decoder_target_tokens"].shape[1]] for g in batching.row_groups(arrays)
    ]  # one [rows, encoder, decoder] per row group (bucketed steps: label and rationale rows)
    row: dict[str, Any] = {
        "model": model, "topology": topology, "jax_topology": t["jax_name"], "chips": t["chips"], "devices": n_dev,
        "mesh": dict(t["mesh"].shape), "batch": batch, "inputs_length": inputs_length, "targets_length": targets_length,
        "recipe": recipe, "step_shape": step_shape[0] if len(step_shape) == 1 else step_shape, "sampled_step_shapes": shapes, **options,
        "hbm_gib_per_device": round(hbm / GIB, 2),
        "params_gib_per_device": round(_bytes_per_device(t["layout"].abstract.params, t["layout"].shardings.params) / GIB, 6),
        "optimizer_state_gib_per_device": round(
            _bytes_per_device(t["layout"].abstract.opt_state, t["layout"].shardings.opt_state) / GIB, 6
        ),
        "real_tokens_per_step": int(counted["tokens"]), "computed_tokens_per_step": batching.computed_tokens(arrays),
        "model_flops_per_step_per_device": counted["total"] / n_dev,
        "model_attention_flops_per_step_per_device": counted["attention"] / n_dev,
    }  # fmt: skip
    t0 = time.time()
    try:
        compiled = t["step"].lower(t["abstract_state"], abstract_batch).compile()
    except Exception as e:  # the TPU compiler refuses programs that cannot fit: that is an answer, not a crash
        msg = str(e).splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in msg and "HbmOom" not in msg:
            raise
        return {**row, "fits": False, "compiler_message": msg[:400], "compile_s": round(time.time() - t0, 1)}
    compile_s = time.time() - t0
    return {
        **row,
        **_memory_row(compiled.memory_analysis(), hbm),
        **_flops_row(compiled, row["model_flops_per_step_per_device"], peak, hbm_bw),
        "compile_s": round(compile_s, 1),
    }


def apply_partitioning_gin(args: argparse.Namespace, name: str) -> None:
    """Sets the mesh, remat, scan (and microbatches, where bound) arguments from a partitioning gin file's
    bindings (read as literals, never executed), so that what dss-plan measures is what a run including that file
    binds."""
    from dss_jax import gin_utils
    from dss_jax.compare_runs import read_gin_values

    path = gin_utils.GIN_DIR / "partitioning" / f"{name}.gin"
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
    if "train.train.rng_impl" in v:
        args.rng_impl = str(v["train.train.rng_impl"])


def _parser() -> argparse.ArgumentParser:
    from dss_jax.trainer import RNG_IMPLS

    p = argparse.ArgumentParser(prog="dss-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="gin/models name, e.g. t5_1_1_xxl")
    p.add_argument("--topology", required=True, nargs="+", help="e.g. v4-8 v4-64 v5e-16 v5p-32 or v5e:4x4")
    p.add_argument("--batch", type=int, default=128, help="global batch in sequences (DSS: 2 per input)")
    p.add_argument("--inputs_length", type=int, default=1024)
    p.add_argument("--targets_length", type=int, default=256)
    p.add_argument(
        "--recipe",
        default="full",
        choices=RECIPES,
        help="step shape: full (every token real, no data read), or padded/bucketed/packed batches of the "
        "benchmark's real DSS training examples (dss_jax.batching); model FLOPs count their real lengths",
    )
    p.add_argument("--benchmark", default="cqa", help="the recipe's data (DSS_DATA_DIR)")
    p.add_argument(
        "--spm", default=None, help=f"vocabulary for the recipe (default: {RECIPE_VOCAB} pieces trained on the benchmark)"
    )
    p.add_argument("--data_batches", type=int, default=4, help="batches sampled; the median-sized one is compiled")
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--model_parallel", type=int, default=1)
    p.add_argument("--remat", default="full", choices=["none", "full", "minimal"])
    p.add_argument("--no_scan", action="store_true", help="unroll layers (slower to compile)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    p.add_argument("--rng_impl", default="threefry2x32", choices=RNG_IMPLS, help="what draws dropout masks")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation slices of the batch")
    p.add_argument("--attention_block", type=int, default=512, help="query/key block of the attention")
    p.add_argument(
        "--partitioning",
        default=None,
        help="take the mesh, remat, scan, microbatches and rng_impl from gin/partitioning/NAME.gin (what a run with that "
        "file binds)",
    )
    p.add_argument("--json", action="store_true")
    return p


def _describe(r: dict[str, Any]) -> str:
    head = (
        f"{r['model']} on {r['topology']} ({r['chips']} chips, {r['devices']} devices, mesh {r['mesh']}), batch {r['batch']}, "
        f"{r['recipe']} step {r['step_shape']}"
    )
    mem = f"params {r['params_gib_per_device']} + optimizer {r['optimizer_state_gib_per_device']} GiB/device"
    if not r["fits"]:
        reason = r.get("compiler_message") or f"peak {r['peak_gib_per_device']} GiB > {r['hbm_gib_per_device']} GiB"
        return f"{head}: DOES NOT FIT — {mem}; {reason}"
    return (
        f"{head}: FITS — peak {r['peak_gib_per_device']} of {r['hbm_gib_per_device']} GiB/device ({mem}, temporaries "
        f"{r['temporaries_gib']})\n  per device and step: model {r['model_flops_per_step_per_device']:.3g} FLOPs, compiled "
        f"{r['compiled_flops_per_device']:.3g} FLOPs (ratio {r['compiled_over_model_flops']}) and "
        f"{r['compiled_bytes_per_device']:.3g} bytes; roofline step {r['roofline_step_s']} s ({r['roofline_bound']}-bound), "
        f"MFU at most {r['mfu_bound']}"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU topology; never initialise one here
    a = _parser().parse_args(argv)
    if a.partitioning:
        try:
            apply_partitioning_gin(a, a.partitioning)
        except (FileNotFoundError, KeyError) as e:
            print(f"dss-plan: --partitioning {a.partitioning}: {e}", file=sys.stderr)
            return 2
    options = dict(remat=a.remat, scan=not a.no_scan, optimizer=a.optimizer, microbatches=a.microbatches, rng_impl=a.rng_impl)
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
                    (a.data, a.fsdp, a.model_parallel),
                    a.recipe,
                    (a.benchmark, a.spm, a.data_batches),
                    attention_block=a.attention_block,
                    **options,
                )  # fmt: skip
            )
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            print(f"dss-plan: {topo}: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    print(json.dumps(rows, indent=2) if a.json else "\n".join(_describe(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
