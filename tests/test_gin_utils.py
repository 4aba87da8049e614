"""gin_utils relies on one private gin internal; these tests fail when gin changes it, and show what it buys."""

import subprocess
import sys

import gin
import gin.resource_reader

from dss_jax import gin_utils


def test_gins_file_reader_list_has_the_shape_gin_utils_wraps():
    """``gin.config._FILE_READERS``: a list of (reader, existence check) pairs holding the resource reader."""
    readers = gin.config._FILE_READERS  # the one private internal gin_utils uses
    assert isinstance(readers, list)
    assert all(isinstance(r, tuple) and len(r) == 2 and callable(r[0]) and callable(r[1]) for r in readers)
    assert gin.resource_reader.system_path_reader in [r for r, _ in readers]


def test_an_include_next_to_a_same_named_folder_is_found_on_the_search_path(tmp_path):
    """``python -m`` from a directory holding ``models/`` (a namespace package there): gin's resource reader raises
    TypeError on ``include 'models/...'``, which gin_utils turns into "not there" so gin/models/ is searched."""
    (tmp_path / "models").mkdir()
    user = tmp_path / "mine.gin"
    user.write_text("include 'models/t5_1_1_tiny.gin'\n")
    script = (
        "import gin\nfrom dss_jax import gin_utils, model\n"
        f"gin_utils.parse_gin([{str(user)!r}], [])\nprint(gin.query_parameter('model.T5Config.num_encoder_layers'))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().isdigit()


def test_bindings_are_traced_to_the_file_and_line_or_the_flag_that_wrote_them(tmp_path):
    user = tmp_path / "mine.gin"
    user.write_text("include 'models/t5_1_1_tiny.gin'\nSTEPS = 7\n")
    gin.clear_config()
    try:
        gin_utils.parse_gin([str(user)], ["STEPS = 8", "model.T5Config.num_encoder_layers = 3"], finalize=False)
        written = {(b.name, b.where) for b in gin_utils.written_bindings()}
        assert ("macro STEPS", "on the command line: STEPS = 8") in written  # the last writer wins, as in gin
        assert ("model.T5Config.num_encoder_layers", "on the command line: model.T5Config.num_encoder_layers = 3") in written
        assert ("model.T5Config.d_model", f"{gin_utils.GIN_DIR / 'models' / 't5_1_1_tiny.gin'}:11") in written
    finally:
        gin.clear_config()
