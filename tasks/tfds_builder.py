"""TFDS builders over the paper's released files (manual dir), so splits are versioned, cached and fast.

One builder config per benchmark. The prepared data lives under ``$DSS_TFDS_DIR`` (default
``~/.cache/dss_jax/tfds``) in a folder keyed by the absolute data dir and by the name, size and modification time
of every file of the benchmark, so two data dirs never share a cache and an edited file is prepared anew.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from dss_jax.tasks import readers

log = logging.getLogger("dss_jax.data")

_INSTRUCTIONS = """\
Download datasets.zip from google-research/distilling-step-by-step, unzip it, and point DSS_DATA_DIR (or the
manual dir) at the folder that holds cqa/, svamp/, esnli/ and anli1/.
"""


class DssBenchmark(tfds.core.GeneratorBasedBuilder):
    """Distilling step-by-step benchmarks with the teacher's parsed rationales and labels."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Gold data + PaLM CoT rationales; CQA/SVAMP validation = 10% of train (seed 0)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=b, description=f"{b} with teacher rationales") for b in readers.BENCHMARKS]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "idx": tfds.features.Scalar(np.int64),
                    "input": text,
                    "input_b": text,
                    "label": text,
                    "rationale": text,
                    "llm_label": text,
                    "has_teacher": tfds.features.Scalar(np.bool_),
                    "parse_ok": tfds.features.Scalar(np.bool_),
                }
            ),
            supervised_keys=None,
        )

    def _log_download_bytes(self) -> None:
        """One line through dss_jax's log instead of TFDS's bold print and progress bars."""
        log.info("preparing %s once (TFDS, in %s)", self.builder_config.name, self.data_dir)

    def _log_download_done(self) -> None:
        log.info("prepared %s", self.builder_config.name)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        data_dir = Path(dl_manager.manual_dir)
        name = self.builder_config.name
        return {s: self._generate_examples(data_dir, name, s) for s in readers.available_splits(data_dir, name)}

    def _generate_examples(self, data_dir: Path, benchmark: str, split: str):
        for e in readers.read_split(data_dir, benchmark, split):
            yield e.idx, e.table_row()


def tfds_dir(data_dir: Path, benchmark: str) -> Path:
    """The prepared-data folder of one benchmark of ``data_dir``, keyed by its path and its files' stats."""
    base = Path(os.environ.get("DSS_TFDS_DIR", Path.home() / ".cache" / "dss_jax" / "tfds"))
    h = hashlib.sha1(str(data_dir.resolve()).encode())
    bench_dir = data_dir / benchmark
    files = sorted(p for p in bench_dir.rglob("*") if p.is_file()) if bench_dir.is_dir() else []
    for p in files:
        st = p.stat()
        h.update(f"\0{p.relative_to(bench_dir)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return base / f"{benchmark}-{h.hexdigest()[:12]}"


def builder(benchmark: str, data_dir: Path | None = None) -> DssBenchmark:
    """The prepared builder for one benchmark (prepared on first use; download_and_prepare skips it after)."""
    data_dir = Path(data_dir) if data_dir is not None else readers.default_data_dir()
    b = DssBenchmark(config=benchmark, data_dir=str(tfds_dir(data_dir, benchmark)))
    if not b.is_prepared():
        tfds.display_progress_bar(False)  # TFDS's bars (generation, shuffling); the first use logs one line instead
        try:
            b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(data_dir)))
        finally:
            tfds.display_progress_bar(True)
    return b
