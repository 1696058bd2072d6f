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


def structural_roles(
    fcs: Sequence[FCShape], layers: Sequence[Layer], in_module_order: bool, map_features: int | None = None
) -> list[RoleOf]:
    """FCs that read no flattened map whatever its geometry: inside the conv trunk, or squeeze-and-excitation.

    ``map_features`` is the size of the flattened map when the caller gave it: a pair whose first layer
    reads exactly that many values is then a head, not a squeeze.
    """
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
    for index, (squeeze, excite) in enumerate(zip(rest, rest[1:], strict=False)):
        if squeeze.in_features != map_features and _squeeze_excitation(squeeze, excite, rest[index + 2 :], layers):
            channels, width = squeeze.in_features, squeeze.out_features
            why = f"a squeeze-and-excitation pair ({channels} -> {width} -> {channels} channels)"
            roles += [RoleOf(squeeze, "squeeze_excitation", why), RoleOf(excite, "squeeze_excitation", why)]
    return roles


def _squeeze_excitation(squeeze: FCShape, excite: FCShape, after: Sequence[FCShape], layers: Sequence[Layer]) -> bool:
    """``C -> r -> C`` on the channels of the conv before it, with a head after it that reads a C x H x W map.

    The head is what makes the pair an SE block rather than a small MLP head on a 1x1 map (which has
    the same shapes).
    """
    evidence = channel_evidence(layers, squeeze.layer)
    if evidence is None or not evidence.strong:
        return False
    channels = evidence.channels
    pair = squeeze.in_features == channels == excite.out_features and excite.in_features == squeeze.out_features
    head_after = any(fc.in_features % channels == 0 and fc.in_features > channels for fc in after)
    return pair and squeeze.out_features < channels and head_after


def assign_roles(candidates: Sequence[FCShape], map_features: int, in_module_order: bool) -> list[RoleOf]:
    """Heads (reading the map), later layers (reading a converted layer), and the FCs nothing feeds.

    Candidates are taken in order: one whose inputs are an earlier converted layer's outputs is a later
    layer (a chain goes on: ``512 -> 512 -> 10`` on a 512-value map is one head, not three); else one
    reading the map starts a head. In name order (safetensors) the order proves little, so later
    layers are then looked for again among the rest until nothing changes.
    """
    roles: dict[str, RoleOf] = {}
    widths: set[int] = set()
    for fc in sorted(candidates, key=lambda fc: fc.layer.position):
        if fc.in_features in widths:
            roles[fc.name] = RoleOf(fc, "later")
        elif fc.in_features == map_features:
            roles[fc.name] = RoleOf(fc, "head")
        else:
            continue
        widths.add(fc.out_features)
    changed = not in_module_order
    while changed:
        changed = False
        for fc in candidates:
            if fc.name not in roles and fc.in_features in widths:
                roles[fc.name] = RoleOf(fc, "later")
                widths.add(fc.out_features)
                changed = True
    return [roles.get(fc.name) or RoleOf(fc, "not_fed", _not_fed(fc, map_features)) for fc in candidates]


def _not_fed(fc: FCShape, map_features: int) -> str:
    return f"not fed by the map ({map_features} values) or a converted layer: it reads {fc.in_features}"
