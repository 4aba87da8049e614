"""``dss-eval``: decode a trained checkpoint on a task's evaluation split and score the registered metrics.

    dss-eval --model_dir DIR [--checkpoint DIR/checkpoints/STEP] [--split validation|test] [--rationales]
             [--num_beams N] [--rank_classification] [--continuous] [--export_hf OUT] [--gin.NAME=VALUE ...]

Reads the model dir as data, never as code: the data spec in ``inference.json``, the vocabulary
``spiece.model`` and the model config ``dss_config.json``; parameters are restored onto the current devices,
whatever mesh trained them. Gin files and bindings given on the command line are code and run as such; a model
dir's own ``config.gin`` is executed only with ``--trust_config_gin`` (model dirs written before the data spec). Writes ``eval/<split>_<step>_metrics.json``,
``eval/<split>_<step>_predictions.jsonl`` (input[, input_b], target, prediction[, rationale]) and TensorBoard
summaries under ``eval/tb``. ``--continuous`` evaluates every checkpoint as it appears (like T5X's eval
binary) until ``--max_wait_s`` passes without a new one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np

from dss_jax import checkpoints, convert, evaluators, gin_utils, logs, metrics_log, partitioning
from dss_jax.data_source import DataSource
from dss_jax.files import saved_steps
from dss_jax.model import ModelConfig
from dss_jax.params import abstract_boxed_params

# The run files' imports, so that --gin.NAME=VALUE overrides resolve (with --trust_config_gin, in one unit with
# the model dir's config.gin).
_GIN_IMPORTS = """
from __gin__ import dynamic_registration
from dss_jax import evaluate
from dss_jax import losses
from dss_jax import model
from dss_jax import optim
from dss_jax import partitioning
from dss_jax.tasks import pipeline
from dss_jax.tasks import registry
from dss_jax.tasks import vocab
"""
_DATA_BINDING = _GIN_IMPORTS + "evaluate.make_data.data = @pipeline.SeqioData()\n"
# The training mesh need not exist here: evaluate data-parallel over the devices present unless told otherwise.
_MESH_DEFAULT = ["partitioning.MeshConfig.data = -1", "partitioning.MeshConfig.fsdp = 1", "partitioning.MeshConfig.model = 1"]


@gin.configurable
def make_data(data: Any = gin.REQUIRED) -> Any:
    return data


def _read_data_spec(model_dir: Path, trust_config_gin: bool) -> dict[str, Any] | None:
    """The model dir's data spec (JSON); None for a trusted model dir without one (its config.gin is read instead)."""
    fmt_file = model_dir / "inference.json"
    if model_dir.is_file():
        raise FileNotFoundError(f"{model_dir}: a file, not a model dir (pass the --model_dir a dss-train run wrote)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model dir (pass the --model_dir a dss-train run wrote)")
    spec = json.loads(fmt_file.read_text()).get("data") if fmt_file.exists() else None
    if spec is None and not trust_config_gin:
        raise FileNotFoundError(
            f"{fmt_file} has no data spec (written before dss-eval read model dirs as data). Its config.gin is code: "
            "if you trust this model dir, rerun with --trust_config_gin"
        )
    return spec


def _load_data(model_dir: Path, spec: dict[str, Any] | None, files: list[str], bindings: list[str]) -> Any:
    """The run's data from the model dir's data spec and vocabulary, or (no spec) from its trusted config.gin."""
    if spec is None:
        gin_utils.parse_gin([str(model_dir / "config.gin"), *files], [_DATA_BINDING, *_MESH_DEFAULT, *bindings], finalize=False)
        return make_data()
    gin_utils.parse_gin(files, [_GIN_IMPORTS, *_MESH_DEFAULT, *bindings], finalize=False)
    from dss_jax.tasks import pipeline, vocab

    return pipeline.SeqioData.from_spec(spec, vocab.load_vocabulary(model_dir / "spiece.model"))


def _check_model_config(model_dir: Path) -> None:
    """A model dir without its model config is a copy that lost a file: say which, and how to get it back (it is not
    a pretrained checkpoint for dss-convert to make)."""
    f = model_dir / checkpoints.CONFIG_FILE
    if model_dir.is_dir() and not f.exists():
        raise FileNotFoundError(
            f"{f} not found: dss-train writes this model config into every model dir it trains. Copy it from the "
            f"run's own model dir, or rerun the run's dss-train command with --model_dir={model_dir} (it resumes and "
            "writes its run files again)"
        )


def _restore(step_dir: Path, model_dir: Path) -> tuple[ModelConfig, Any, Any]:
    """(model config, parameters restored onto the current devices, the mesh they live on)."""
    cfg = checkpoints.read_config(model_dir)
    mesh_cfg = partitioning.MeshConfig()
    mesh = partitioning.make_mesh(mesh_cfg)
    shardings = partitioning.params_shardings(abstract_boxed_params(cfg), mesh, mesh_cfg.rules)
    return partitioning.for_mesh(cfg, mesh), checkpoints.restore_train_params(step_dir, cfg, shardings), mesh


def evaluate_step_dir(
    step_dir: Path,
    model_dir: Path,
    data: DataSource,
    split: str,
    out_dir: Path,
    batch_size: int = 32,
    num_beams: int = 1,
    rationales: bool = False,
    max_decode_length: int | None = None,
    rank_classification: bool = False,
) -> dict[str, Any]:
    """Decodes ``data.selection_task``'s split with the checkpoint at ``step_dir``; returns the metrics."""
    cfg, params, mesh = _restore(step_dir, model_dir)
    examples = _examples(data.selection_task, split, data.inputs_length)
    rows = [e["inputs"] for e in examples]
    max_len = max_decode_length or data.targets_length
    decoded = evaluators.Decoded(data, split, rows, cfg, batch_size, max_len, num_beams)
    rank = evaluators.RankClassification(data, split, rows, cfg, batch_size) if rank_classification else None
    with jax.set_mesh(mesh):
        texts = decoded.predict(params)
        ranked = rank.predict(params) if rank is not None else None
    metrics: dict[str, float] = {**decoded.score(texts), "examples": len(examples)}
    if rank is not None and ranked is None:
        print(f"dss-eval: {data.selection_task} has no closed label set; --rank_classification skipped", file=sys.stderr)
    if ranked is not None:
        metrics["rank_classification_accuracy"] = data.score(split, ranked)["accuracy"]
    rationale_texts = None
    if rationales and f"{data.benchmark}_rationale" in _task_names():
        r_ex = _examples(f"{data.benchmark}_rationale", split, data.inputs_length)
        r_dec = dataclasses.replace(decoded, rows=[e["inputs"] for e in r_ex])
        with jax.set_mesh(mesh):
            by_idx = {int(e["idx"]): t for e, t in zip(r_ex, r_dec.predict(params), strict=True)}
        rationale_texts = [by_idx.get(int(e["idx"]), "") for e in examples]
    step = int(step_dir.name) if step_dir.name.isdigit() else -1
    _write_predictions(out_dir / f"{split}_{step}_predictions.jsonl", data, examples, texts, ranked, rationale_texts)
    result = {"step": step, "split": split, "task": data.selection_task, "checkpoint": str(step_dir), **metrics}
    (out_dir / f"{split}_{step}_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    with metrics_log.summary_writer_class()(str(out_dir / "tb")) as w:
        for k, v in metrics.items():
            w.add_scalar(f"{split}/{data.selection_task}/{k}", v, step)
    return result


def _task_names() -> list[str]:
    import seqio

    return list(seqio.TaskRegistry.names())


def _write_predictions(
    path: Path,
    data: DataSource,
    examples: list[dict],
    texts: list[str],
    ranked: list[str] | None,
    rationale_texts: list[str] | None,
) -> None:
    """One JSON line per example: input[, input_b], target, prediction[, rank_prediction][, rationale]."""
    import seqio

    task = seqio.get_mixture_or_task(data.selection_task)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            target = task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True)
            row = {"input": _text(e["inputs_pretokenized"]), "target": target}
            row["prediction"] = task.postprocess_fn(texts[i], example=e, is_target=False)
            if _text(e.get("input_b_pretokenized", b"")):  # NLI: the hypothesis, joined to the input by EOS
                row = {"input": row["input"], "input_b": _text(e["input_b_pretokenized"]), **row}
            if ranked is not None:
                row["rank_prediction"] = ranked[i]
            if rationale_texts is not None:
                row["rationale"] = rationale_texts[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _text(x: Any) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _examples(name: str, split: str, inputs_length: int) -> list[dict]:
    from dss_jax.tasks import pipeline

    exs = pipeline.eval_examples(name, split)
    for e in exs:  # truncation as in training: keep the EOS
        if len(e["inputs"]) > inputs_length:
            e["inputs"] = np.concatenate([e["inputs"][: inputs_length - 1], e["inputs"][-1:]])
    return exs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dss-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--checkpoint", default=None, help="checkpoints/<step> dir (default: best, else latest)")
    p.add_argument("--split", default="validation")
    p.add_argument("--rationales", action="store_true", help="also generate rationales with the explain task")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument(
        "--rank_classification",
        action="store_true",
        help="also score multiple-choice tasks (CQA, e-SNLI, ANLI) by ranking each candidate label's likelihood",
    )
    p.add_argument("--max_decode_length", type=int, default=None)
    p.add_argument("--output_dir", default=None, help="default: MODEL_DIR/eval")
    p.add_argument("--continuous", action="store_true", help="evaluate each new checkpoint as it appears")
    p.add_argument("--max_wait_s", type=float, default=3600, help="with --continuous: stop after this long without a new one")
    p.add_argument("--export_hf", default=None, help="also write the checkpoint's student as a Hugging Face directory")
    p.add_argument(
        "--trust_config_gin",
        action="store_true",
        help="execute the model dir's config.gin (gin is code: only for your own model dirs without a data spec)",
    )
    p.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up messages")
    return p


def _export_hf(model_dir: Path, checkpoint: str | None, out: str) -> None:
    step_dir = checkpoints.resolve_step_dir(checkpoint or model_dir)
    cfg = checkpoints.read_config(model_dir)
    params = jax.tree.map(np.asarray, checkpoints.restore_train_params(step_dir, cfg))
    spm = model_dir / "spiece.model"
    convert.save_hf(params, cfg, out, spiece_model=spm if spm.exists() else None)
    print(f"exported {step_dir} to {out}", file=sys.stderr)


def _watch(evaluate: Callable[[Path], dict[str, Any]], model_dir: Path, max_wait_s: float) -> None:
    """Evaluates every checkpoint as it appears, until ``max_wait_s`` passes without a new one."""
    seen: set[int] = set()
    last_new = time.time()
    while time.time() - last_new < max_wait_s:
        ckpts = model_dir / "checkpoints"
        for s in [s for s in saved_steps(ckpts) if s not in seen]:
            result = evaluate(ckpts / str(s))
            print(json.dumps(result), flush=True)
            seen.add(s)
            last_new = time.time()
        time.sleep(5)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files, bindings, rest = gin_utils.split_gin_args(argv)
    args = _parser().parse_args(rest)
    logs.setup_logging()
    model_dir = Path(args.model_dir).resolve()
    out_dir = Path(args.output_dir) if args.output_dir else model_dir / "eval"
    try:
        spec = _read_data_spec(model_dir, args.trust_config_gin)
        _check_model_config(model_dir)  # a model dir's files are checked before TensorFlow's seconds of start-up
        if not args.verbose:
            logs.quiet_data_layer_imports()
        data = _load_data(model_dir, spec, files, bindings)
        # a binding that nothing reads is an error (the mesh is made per checkpoint; a trusted config.gin is the
        # training run's, mostly unread here)
        gin_utils.check_bindings_read("dss-eval", pending=["partitioning.MeshConfig"], exempt_files=[model_dir / "config.gin"])
        if args.export_hf:
            _export_hf(model_dir, args.checkpoint, args.export_hf)
        evaluate = functools.partial(
            evaluate_step_dir,
            model_dir=model_dir,
            data=data,
            split=args.split,
            out_dir=out_dir,
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            rationales=args.rationales,
            max_decode_length=args.max_decode_length,
            rank_classification=args.rank_classification,
        )
        if args.continuous:
            _watch(evaluate, model_dir, args.max_wait_s)
        else:
            print(json.dumps(evaluate(checkpoints.resolve_step_dir(args.checkpoint or model_dir)), indent=2))
        return 0
    except (FileNotFoundError, ValueError, convert.CheckpointMismatchError) as e:
        print(f"dss-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from dss_jax.evaluate import main as _main

    sys.exit(_main())
