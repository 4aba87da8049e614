"""Model sizes in gin/models: parse on their own and have the published parameter counts."""

import jax
import jax.numpy as jnp
import pytest

from dss_jax import configs, gin_utils, model

# Published sizes (millions): T5 v1.0 small/base 60/220; T5 v1.1 (untied head) 77/248/783/2850/11135.
EXPECTED_M = {
    "t5_small": 60.5,
    "t5_base": 222.9,
    "t5_1_1_small": 76.96,
    "t5_1_1_base": 247.6,
    "t5_1_1_large": 783.2,
    "t5_1_1_xl": 2849.8,
    "t5_1_1_xxl": 11135.3,
}


def count(cfg):
    """Parameters of ``cfg``, traced with scanned layers (one layer traced; stacked, the counts are the same)."""
    shapes = jax.eval_shape(
        lambda: model.T5(cfg.replace(scan_layers=True)).init(
            jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32)
        )
    )
    return model.count_params(shapes["params"])


@pytest.mark.parametrize("name", sorted(EXPECTED_M))
def test_parameter_counts_match_published_sizes(name):
    n = count(configs.model_config(name)) / 1e6
    assert abs(n - EXPECTED_M[name]) / EXPECTED_M[name] < 0.01, n


def test_flan_aliases_are_the_v1_1_architecture():
    for size in ("small", "base", "large", "xl", "xxl"):
        assert configs.model_config(f"flan_t5_{size}") == configs.model_config(f"t5_1_1_{size}")


def test_every_model_gin_parses_on_its_own():
    names = configs.model_names()
    assert "t5_1_1_tiny" in names and len(names) >= 13
    for name in names:
        cfg = configs.model_config(name)
        assert cfg.d_model > 0 and cfg.num_encoder_layers > 0 and cfg.num_decoder_layers > 0


def test_partitioning_gins_state_what_their_own_bindings_measured():
    """Each gin/partitioning file's figures come from `dss-plan --partitioning <that file>`, which reads the file's
    own mesh/remat/scan bindings: a comment cannot describe a setting the file does not bind."""
    import argparse

    from dss_jax import plan

    for f in sorted((gin_utils.GIN_DIR / "partitioning").glob("*.gin")):
        cmds = [line for line in f.read_text().splitlines() if line.startswith("#") and "dss-plan" in line]
        assert cmds, f"{f.name}: no dss-plan command in its comment"
        for line in cmds:
            assert f"--partitioning {f.stem}" in line, f"{f.name}: {line.strip()}"
            assert not any(flag in line for flag in ("--fsdp", "--data ", "--remat", "--no_scan")), line
        args = argparse.Namespace()
        plan.apply_partitioning_gin(args, f.stem)
        assert args.remat in ("none", "full", "minimal") and args.fsdp != 0


def test_plan_takes_a_gemma_partitioning_files_bindings():
    """`dss-plan --partitioning t5gemma2_270m_270m` measures what a run with that file binds: the mesh, the
    gemma.GemmaConfig remat and scan bindings, and the microbatches the 256k-vocabulary model needs to fit."""
    import argparse

    from dss_jax import plan
    from dss_jax.compare_runs import read_gin_values

    name = "t5gemma2_270m_270m"
    v = read_gin_values(gin_utils.GIN_DIR / "partitioning" / f"{name}.gin")
    args = argparse.Namespace(microbatches=1)
    plan.apply_partitioning_gin(args, name)
    assert (args.data, args.fsdp, args.model_parallel) == (1, -1, 1)
    assert (args.remat, args.no_scan) == (v["gemma.GemmaConfig.remat_policy"], not v["gemma.GemmaConfig.scan_layers"])
    assert args.remat == "full" and args.microbatches == v["train.train.microbatches"] > 1


def test_a_misspelt_macro_on_the_command_line_is_an_error_naming_it():
    import gin
    import pytest

    gin.clear_config()
    try:
        gin_utils.parse_gin(["runs/quickstart.gin"], ["SEEED = 1"], finalize=False)
        with pytest.raises(
            gin_utils.UnreadBindingError, match=r"macro SEEED \(on the command line: SEEED = 1; did you mean SEED\?\)"
        ):
            gin_utils.check_bindings_read("dss-train", pending=["train.train"])
        gin.clear_config()
        gin_utils.parse_gin(["runs/quickstart.gin"], ["SEED = 1", "TRAIN_STEPS = 5"], finalize=False)  # read: fine
        gin_utils.check_bindings_read("dss-train", pending=["train.train"])
    finally:
        gin.clear_config()
