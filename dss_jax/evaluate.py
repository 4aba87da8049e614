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
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np

from dss_jax import checkpoints, configs, convert, decoding, partitioning, scoring
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


def _load_data(model_dir: Path, files: list[str], bindings: list[str], trust_config_gin: bool) -> Any:
    """The run's data from the model dir's data spec (JSON) and vocabulary; its config.gin only when trusted."""
    fmt_file = model_dir / "inference.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model dir (pass the --model_dir a dss-train run wrote)")
    spec = json.loads(fmt_file.read_text()).get("data") if fmt_file.exists() else None
    if spec is None and not trust_config_gin:
        raise FileNotFoundError(
            f"{fmt_file} has no data spec (written before dss-eval read model dirs as data). Its config.gin is code: "
            "if you trust this model dir, rerun with --trust_config_gin"
        )
    if spec is None:
        configs.parse_gin([str(model_dir / "config.gin"), *files], [_DATA_BINDING, *_MESH_DEFAULT, *bindings], finalize=False)
        return make_data()
    configs.parse_gin(files, [_GIN_IMPORTS, *_MESH_DEFAULT, *bindings], finalize=False)
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


def evaluate_step_dir(
    step_dir: Path,
    model_dir: Path,
    data: Any,
    split: str,
    out_dir: Path,
    batch_size: int = 32,
    num_beams: int = 1,
    rationales: bool = False,
    max_decode_length: int | None = None,
    rank_classification: bool = False,
) -> dict[str, Any]:
    """Decodes ``data.selection_task``'s split with the checkpoint at ``step_dir``; returns the metrics."""
    import seqio

    cfg = checkpoints.read_config(model_dir)
    mesh_cfg = partitioning.MeshConfig()
    mesh = partitioning.make_mesh(mesh_cfg)
    shardings = partitioning.params_shardings(abstract_boxed_params(cfg), mesh, mesh_cfg.rules)
    params = checkpoints.restore_train_params(step_dir, cfg, shardings)
    task = seqio.get_mixture_or_task(data.selection_task)
    examples = _examples(data.selection_task, split, data.inputs_length)
    max_len = max_decode_length or data.targets_length
    with jax.set_mesh(mesh):
        preds = _decode_all(params, cfg, [e["inputs"] for e in examples], data.inputs_length, max_len, batch_size, num_beams)
    vocab = task.output_features["targets"].vocabulary
    texts = [vocab.decode(p) for p in preds]
    targets = [task.postprocess_fn(e["targets_pretokenized"], example=e, is_target=True) for e in examples]
    predictions = [task.postprocess_fn(t, example=e, is_target=False) for t, e in zip(texts, examples, strict=True)]
    metrics: dict[str, float] = {}
    for fn in task.metric_fns:
        metrics.update(fn(targets, predictions))
    metrics["examples"] = len(examples)
    ranked = _rank_classify(params, cfg, data, split, examples, batch_size, mesh) if rank_classification else None
    if ranked is not None:
        metrics["rank_classification_accuracy"] = data.score(split, ranked)["accuracy"]
    rationale_texts = None
    if rationales and f"{data.benchmark}_rationale" in seqio.TaskRegistry.names():
        r_ex = _examples(f"{data.benchmark}_rationale", split, data.inputs_length)
        with jax.set_mesh(mesh):
            r_preds = _decode_all(params, cfg, [e["inputs"] for e in r_ex], data.inputs_length, max_len, batch_size, num_beams)
        by_idx = {int(e["idx"]): vocab.decode(p) for e, p in zip(r_ex, r_preds, strict=True)}
        rationale_texts = [by_idx.get(int(e["idx"]), "") for e in examples]
    step = int(step_dir.name) if step_dir.name.isdigit() else -1
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{split}_{step}_predictions.jsonl", "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            row = {"input": _text(e["inputs_pretokenized"]), "target": targets[i], "prediction": predictions[i]}
            if _text(e.get("input_b_pretokenized", b"")):  # NLI: the hypothesis, joined to the input by EOS
                row = {"input": row["input"], "input_b": _text(e["input_b_pretokenized"]), **row}
            if ranked is not None:
                row["rank_prediction"] = ranked[i]
            if rationale_texts is not None:
                row["rationale"] = rationale_texts[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    result = {"step": step, "split": split, "task": data.selection_task, "checkpoint": str(step_dir), **metrics}
    (out_dir / f"{split}_{step}_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(out_dir / "tb")) as w:
        for k, v in metrics.items():
            w.add_scalar(f"{split}/{data.selection_task}/{k}", v, step)
    return result


def _rank_classify(
    params: Any, cfg: Any, data: Any, split: str, examples: list[dict], batch_size: int, mesh: Any
) -> list[str] | None:
    """Each example's most likely candidate label (rank classification); None for tasks without a label set."""
    labels = data.candidate_labels(split, len(examples))
    if labels is None:
        print(f"dss-eval: {data.selection_task} has no closed label set; --rank_classification skipped", file=sys.stderr)
        return None
    inputs = np.zeros((len(examples), data.inputs_length), np.int32)
    for i, e in enumerate(examples):
        inputs[i, : len(e["inputs"])] = e["inputs"]
    with jax.set_mesh(mesh):
        picks = scoring.rank_classify(params, cfg, inputs, [data.tokenize(c) for c in labels], batch_size)
    return [c[k] for c, k in zip(labels, picks, strict=True)]


def _text(x: Any) -> str:
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def _examples(name: str, split: str, inputs_length: int) -> list[dict]:
    from dss_jax.tasks import pipeline

    exs = pipeline.eval_examples(name, split)
    for e in exs:  # truncation as in training: keep the EOS
        if len(e["inputs"]) > inputs_length:
            e["inputs"] = np.concatenate([e["inputs"][: inputs_length - 1], e["inputs"][-1:]])
    return exs


def _decode_all(
    params: Any, cfg: Any, inputs: list[np.ndarray], inputs_length: int, max_len: int, batch_size: int, num_beams: int
) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        batch = np.zeros((batch_size, inputs_length), np.int32)
        for i, r in enumerate(chunk):
            batch[i, : len(r)] = r
        if num_beams > 1:
            tokens = np.asarray(decoding.beam_search(params, batch, cfg, max_len, num_beams)[0][:, 0])
        else:
            tokens = np.asarray(decoding.decode(params, batch, cfg, max_len))
        for row in tokens[: len(chunk)]:
            row = row.tolist()
            out.append(row[: row.index(cfg.eos_token_id)] if cfg.eos_token_id in row else row)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files, bindings, rest = configs.split_gin_args(argv)
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
    args = p.parse_args(rest)
    configs.setup_logging()
    if not args.verbose:
        configs.quiet_data_layer_imports()
    model_dir = Path(args.model_dir).resolve()
    out_dir = Path(args.output_dir) if args.output_dir else model_dir / "eval"
    try:
        data = _load_data(model_dir, files, bindings, args.trust_config_gin)
        _check_model_config(model_dir)
        # a binding that nothing reads is an error (the mesh is made per checkpoint; a trusted config.gin is the
        # training run's, mostly unread here)
        configs.check_bindings_read("dss-eval", pending=["partitioning.MeshConfig"], exempt_files=[model_dir / "config.gin"])
        if args.export_hf:
            step_dir = checkpoints.resolve_step_dir(args.checkpoint or model_dir)
            cfg = checkpoints.read_config(model_dir)
            params = jax.tree.map(np.asarray, checkpoints.restore_train_params(step_dir, cfg))
            spm = model_dir / "spiece.model"
            convert.save_hf(params, cfg, args.export_hf, spiece_model=spm if spm.exists() else None)
            print(f"exported {step_dir} to {args.export_hf}", file=sys.stderr)
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
        if not args.continuous:
            result = evaluate(checkpoints.resolve_step_dir(args.checkpoint or model_dir))
            print(json.dumps(result, indent=2))
            return 0
        seen: set[int] = set()
        last_new = time.time()
        while time.time() - last_new < args.max_wait_s:
            ckpts = model_dir / "checkpoints"
            steps = (
                sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit() and (d / "state").is_dir())
                if ckpts.exists()
                else []
            )
            for s in [s for s in steps if s not in seen]:
                result = evaluate(ckpts / str(s))
                print(json.dumps(result), flush=True)
                seen.add(s)
                last_new = time.time()
            time.sleep(5)
        return 0
    except (FileNotFoundError, ValueError, convert.CheckpointMismatchError) as e:
        print(f"dss-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from dss_jax.evaluate import main as _main

    sys.exit(_main())
