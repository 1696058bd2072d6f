"""A Hugging Face ``config.json`` beside a checkpoint: what it tells about how FC weights are stored."""

from __future__ import annotations

import json
from pathlib import Path

from fc2conv.formats.base import Listing
from fc2conv.types import WeightLayout

__all__ = ["CONV1D_MODEL_TYPES", "add_layout_hints"]

# transformers architectures whose projections are Conv1D modules, which store their weight (in, out).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")
_MAX_CONFIG_BYTES = 4 * 2**20  # a config is a few KB; anything larger is not one


def add_layout_hints(listing: Listing) -> Listing:
    """Add to ``listing`` the ``(in, out)`` layouts that a GPT-2-family ``config.json`` beside it implies."""
    model_type = _model_type(listing.path)
    if model_type not in CONV1D_MODEL_TYPES:
        return listing
    names = {info.name.rpartition(".")[0] for info in listing.infos if info.name.endswith(".weight")}
    conv1d = sorted(n for n in names if n.rpartition(".")[2] in _CONV1D_LEAVES)
    hints: dict[str, WeightLayout] = {name: "in_out" for name in conv1d}
    if hints:
        listing.layout_hints.update(hints)
        listing.notes.append(
            f"config.json: model_type {model_type!r}: its {', '.join(_CONV1D_LEAVES[:3])} projections are "
            f"transformers Conv1D, stored (in, out) ({len(hints)} layers)"
        )
    return listing


def _model_type(path: Path) -> str | None:
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    try:
        if not config.is_file() or config.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None  # a config we cannot read tells us nothing; the checkpoint is still read
    return value if isinstance(value, str) else None
