"""Model presets by name: ``gin/models/<name>.gin`` read into a model config."""

from __future__ import annotations

from pathlib import Path

import gin

from dss_jax.gin_utils import GIN_DIR, add_search_paths
from dss_jax.model import ModelConfig


def model_names() -> list[str]:
    return sorted(p.stem for p in (GIN_DIR / "models").glob("*.gin"))


def model_gin_file(name: str) -> Path:
    """``gin/models/<name>.gin``; an unknown name fails listing the sizes that exist."""
    path = GIN_DIR / "models" / f"{name}.gin"
    if not path.exists():
        raise ValueError(f"unknown model size {name!r}; known sizes (gin/models/*.gin): {', '.join(model_names())}")
    return path


def model_config(name: str, **overrides: object) -> ModelConfig:
    """The model config a ``gin/models/<name>.gin`` file describes (``model.T5Config`` or, for T5Gemma
    families, ``gemma.GemmaConfig`` bindings; the stacks of the latter are dicts of GemmaStack fields).

    Parses the file on its own (this clears and restores no other gin state: call it before, not after, a
    binary parses its own gin config).
    """
    path = model_gin_file(name)
    add_search_paths()
    with gin.unlock_config():
        gin.clear_config()
        gin.parse_config_file(str(path))
        from dss_jax import gemma
        from dss_jax import model as model_lib

        found = {cls: _bindings_if_registered(cls) for cls in (model_lib.T5Config, gemma.GemmaConfig)}
        gin.clear_config()
    cls = gemma.GemmaConfig if found[gemma.GemmaConfig] and not found[model_lib.T5Config] else model_lib.T5Config
    return cls(**{**found[cls], **overrides})


def _bindings_if_registered(cls: type) -> dict:
    """gin's bindings of ``cls``; {} when the parsed files never name it (gin then has not registered it)."""
    try:
        return gin.get_bindings(cls)
    except ValueError:
        return {}
