"""Which FC layers read the flattened map, which follow them, and which do something else, from shapes alone.

An FC that reads the map (``in_features == C*H*W``) starts a head and becomes an H x W conv; an FC that
reads a converted layer's output becomes a 1x1 conv, whatever the head it belongs to (several heads
may read one map). FCs inside the conv trunk (a conv follows them) and squeeze-and-excitation pairs
(``C -> r -> C`` on a globally pooled vector) read no map: they are left alone, and so is every FC
that nothing converted feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fc2conv.layers import Layer
from fc2conv.layouts import FCShape

__all__ = ["ChannelEvidence", "Role", "RoleOf", "assign_roles", "channel_evidence", "structural_roles"]

Role = Literal["head", "later", "trunk", "squeeze_excitation", "not_fed"]


@dataclass(frozen=True)
class RoleOf:
    """What one FC layer is, and the reason (for the layers that stay as they are)."""

    fc: FCShape
    role: Role
    reason: str = ""


@dataclass(frozen=True)
class ChannelEvidence:
    """The channel count of the map, as the checkpoint shows it: the last conv or BatchNorm before a head.

    ``strong`` is False when the checkpoint's order says nothing of what comes first (safetensors keeps
    names sorted) and no conv precedes the head even in that order: then it is a guess.
    """

    channels: int
    layer: Layer
    strong: bool

    @property
    def source(self) -> str:
        what = "BatchNorm" if self.layer.kind == "BatchNorm" else "conv"
        return f"{self.layer.name} ({what}, {self.channels} channels)"


def channel_evidence(layers: Sequence[Layer], first_fc: Layer) -> ChannelEvidence | None:
    """The last conv or BatchNorm before ``first_fc``; else the last conv anywhere (weak); else None."""
    before = [layer for layer in layers if layer.position < first_fc.position and layer.channels is not None]
    if before:
        channels = before[-1].channels
        assert channels is not None
        return ChannelEvidence(channels, before[-1], strong=True)
    convs = [layer for layer in layers if layer.kind in ("Conv2d", "Conv1d", "Conv3d") and layer.channels]
    if convs and convs[-1].channels is not None:
        return ChannelEvidence(convs[-1].channels, convs[-1], strong=False)
    return None


def structural_roles(fcs: Sequence[FCShape], layers: Sequence[Layer], in_module_order: bool) -> list[RoleOf]:
    """FCs that read no flattened map whatever its geometry: inside the conv trunk, or squeeze-and-excitation."""
    roles: list[RoleOf] = []
    convs = [layer for layer in layers if layer.kind in ("Conv1d", "Conv2d", "Conv3d")]
    last_conv = convs[-1] if convs else None
    in_trunk = set()
    if in_module_order and last_conv is not None and any(fc.layer.position > last_conv.position for fc in fcs):
        for fc in fcs:
            if fc.layer.position < last_conv.position:
                in_trunk.add(fc.name)
                roles.append(RoleOf(fc, "trunk", f"inside the conv trunk ({last_conv.name}, a conv, comes after it)"))
    rest = [fc for fc in fcs if fc.name not in in_trunk]
    for squeeze, excite in zip(rest, rest[1:], strict=False):
        evidence = channel_evidence(layers, squeeze.layer)
        if evidence is None or not evidence.strong:
            continue
        channels = evidence.channels
        if squeeze.in_features == channels == excite.out_features and excite.in_features == squeeze.out_features:
            if squeeze.out_features < channels:
                why = f"a squeeze-and-excitation pair ({channels} -> {squeeze.out_features} -> {channels} channels)"
                roles += [RoleOf(squeeze, "squeeze_excitation", why), RoleOf(excite, "squeeze_excitation", why)]
    return roles


def assign_roles(candidates: Sequence[FCShape], map_features: int, in_module_order: bool) -> list[RoleOf]:
    """Heads (reading the map), later layers (reading a converted layer), and the FCs nothing feeds.

    In module order a later layer must come after the first head; in name order (safetensors) any
    FC whose inputs are a converted layer's outputs is taken, until nothing changes.
    """
    heads = [fc for fc in candidates if fc.in_features == map_features]
    if not heads:
        return [RoleOf(fc, "not_fed", _not_fed(fc, map_features)) for fc in candidates]
    start = min(fc.layer.position for fc in heads) if in_module_order else -1
    converted = {fc.name for fc in heads}
    widths = {fc.out_features for fc in heads}
    changed = True
    while changed:
        changed = False
        for fc in candidates:
            if fc.name not in converted and fc.layer.position > start and fc.in_features in widths:
                converted.add(fc.name)
                widths.add(fc.out_features)
                changed = True
        changed = changed and not in_module_order  # in module order one pass, in order, is the rule
    roles = []
    for fc in candidates:
        if fc.in_features == map_features:
            roles.append(RoleOf(fc, "head"))
        elif fc.name in converted:
            roles.append(RoleOf(fc, "later"))
        else:
            roles.append(RoleOf(fc, "not_fed", _not_fed(fc, map_features)))
    return roles


def _not_fed(fc: FCShape, map_features: int) -> str:
    return f"not fed by the map ({map_features} values) or a converted layer: it reads {fc.in_features}"
