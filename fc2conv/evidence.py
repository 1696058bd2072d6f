"""Evidence from a trained FC layer's weights for the flatten order and geometry of the map it reads.

The first FC layer after a flatten is trained by updates that are each an output error times a feature
map, and feature maps are smooth within each channel and differ from channel to channel. Laid out in
the right (C, H, W), a trained weight row inherits that structure; laid out in the wrong order, the
neighbours of a weight are weights of other channels or far-away positions, and the structure is gone.
From the weights alone the order cannot be proven, only made plausible; this module measures how
plausible, and says "weak" rather than guess.

Two figures per sampled weight row and candidate layout (see :func:`order_evidence`), both about 1 for
unstructured noise (random, untrained weights, whatever the layout):

* **smoothness**: the mean squared difference of horizontally and vertically adjacent weights of one
  channel, over its value for noise, computed after removing each channel's mean and each position's
  mean across channels from the row (double centring). Per-channel and per-position offsets make
  neighbours alike without any spatial smoothness; centring keeps them out. Below 1: smooth.
* **unexplained variance**: the fraction of the row's variance left after fitting the layout's own
  channel and position offsets and then predicting each weight from the sum of its neighbours. Both
  layouts fit models with the same number of parameters, so the right layout explains more.

Each figure has a blind spot, measured on synthetic and trained weights (benchmarks/evidence_margins.py):
smoothness can be fooled by per-position offsets when the number of channels is not a multiple of H*W
(the wrong layout's neighbours then share a true position); unexplained variance can be fooled by smooth
maps with very few channels (C = 2: the wrong layout's position offsets are runs of C neighbouring
weights). A verdict is "clear" only when both favour the same order by enough, consistently across rows.
Tiny maps (2x2) and maps after max pooling on small images carry little of this structure and give "weak".

The statistics assume that the channel *index* carries no smoothness of its own: learned conv channels
come in an arbitrary order, so channel c is no more like channel c + 1 than like any other. Channels
that share one spatial pattern (as R, G and B do) are fine, the position centring removes it; but when
neighbouring channel indices are alike (spectral bands, channels sorted by some earlier step), the wrong
layout, whose neighbours are neighbouring channels, looks smooth, and the verdict can be clearly wrong
(a synthetic 32x4x4 map whose channels follow each other with correlation 0.95: 1.59x the wrong way).

The arithmetic is numpy's (float32, float64 for float64 weights, with sums kept in float64): the weight
may be a ``torch.Tensor``, a numpy array or any :class:`fc2conv.matrix.Matrix` (rows read from a file's
mapped bytes), and only a tensor, which comes with torch imported, has its rows read through torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fc2conv.matrix import Matrix, MatrixLike, as_matrix, is_floating
from fc2conv.types import FLATTEN_ORDERS, InputShape

# Per-row figures and sampled values: float arrays (float32 values, float64 sums).
_Array = np.ndarray[Any, np.dtype[np.floating[Any]]]

Strength = Literal["clear", "weak", "not applicable"]

# An order is "clear" only when all of these hold (benchmarks/evidence_margins.py shows what they separate):
# the smoother layout beats the other by this factor (geometric mean over the sampled rows) ...
MIN_MARGIN = 1.10
# ... the same layout leaves less unexplained variance, by this factor ...
MIN_VARIANCE_MARGIN = 1.05
# ... both consistently across rows: two-sided t tests of the per-row log ratios at this level (under
# unstructured noise the two layouts are exchangeable, so a row's log ratio is symmetric about 0) ...
MAX_T_TEST_P = 1e-4
# ... on at least this many rows, enough of which are smoother in that layout for a two-sided sign
# test at this level (8 of 8 rows, 14 of 16, 43 of 64): a few extreme rows cannot carry the verdict.
MIN_ROWS = 8
MAX_SIGN_TEST_P = 0.01
# Geometry: the top candidate beats the best candidate of another shape by this factor of smooth-pair
# evidence (t test as above) and holds at least this much evidence per row (nats).
MIN_GEOMETRY_MARGIN = 1.10
MIN_GEOMETRY_EVIDENCE = 2.0

# Rows read from the weight: all of them up to this many, else a seeded sample of this many.
MAX_ROWS = 64
# Values of the sampled rows held at once (8 MB in float32; 64 rows of VGG16 fc6 in one go): bounds the
# memory whatever the layer size, with a few temporaries of this size at a time.
_CHUNK_VALUES = 2**21


@dataclass(frozen=True)
class LayoutScore:
    """How well the sampled weight rows fit a map laid out as ``shape`` in flatten ``order``.

    Attributes:
        shape: The candidate map, C x H x W.
        order: The candidate flatten order, ``"chw"`` or ``"hwc"``.
        smoothness: Geometric mean over rows of the double-centred adjacency ratio: about 1 for
            unstructured noise, below 1 for maps smooth within their channels.
        unexplained: Geometric mean over rows of the fraction of variance left by the layout's own
            channel and position offsets and a prediction from neighbours: lower fits better.
    """

    shape: InputShape
    order: str
    smoothness: float
    unexplained: float


@dataclass(frozen=True)
class OrderEvidence:
    """What a layer's weights say about the flatten order of the map it reads.

    Attributes:
        shape: The map the evidence was measured for.
        scores: One :class:`LayoutScore` per candidate order, in the order they were asked for.
        favoured: The order the weights clearly favour; ``None`` unless ``strength == "clear"``.
        leaning: The smoother order whatever the strength (``None`` when not applicable); for
            information only, never a claim.
        margin: Geometric mean over rows of the other order's smoothness over the leaning order's
            (>= 1); ``nan`` when not applicable.
        variance_margin: The same for the unexplained variance (< 1 when it leans the other way).
        t_statistic: Consistency across rows: the smaller t statistic of the two per-row log ratios.
        rows_agreeing: Fraction of the rows that are themselves smoother in the leaning order.
        rows: Number of weight rows measured.
        strength: ``"clear"``, ``"weak"`` (no claim) or ``"not applicable"``.
        explanation: One line for a human, with the figures.
    """

    shape: InputShape
    scores: tuple[LayoutScore, ...]
    favoured: str | None
    leaning: str | None
    margin: float
    variance_margin: float
    t_statistic: float
    rows_agreeing: float
    rows: int
    strength: Strength
    explanation: str

    def score(self, order: str) -> LayoutScore:
        """The score of one candidate order."""
        for score in self.scores:
            if score.order == order:
                return score
        raise KeyError(f"no score for flatten order {order!r}; measured: {[s.order for s in self.scores]}")


@dataclass(frozen=True)
class GeometryScore:
    """The smooth-neighbour evidence for one candidate (geometry, order).

    Attributes:
        shape: The candidate map, C x H x W.
        order: The candidate flatten order (``"chw"`` only when the orders coincide, C == 1).
        smooth_pairs: Median over rows of the evidence, in nats, that the candidate's neighbour pairs
            are more alike than random pairs of the row: ``n_pairs * (s - 1 - ln s) / 2`` for a raw
            adjacency ratio ``s < 1``, else 0. More pairs at the same smoothness is more evidence, so
            the true map beats a map that holds only a subset of its neighbour pairs.
        raw_smoothness: Geometric mean over rows of the raw adjacency ratio (only the row mean removed).
    """

    shape: InputShape
    order: str
    smooth_pairs: float
    raw_smoothness: float


@dataclass(frozen=True)
class GeometryEvidence:
    """What a layer's weights say about the geometry (C x H x W) of the map it reads.

    Attributes:
        ranking: Every candidate (geometry, order), most evidence first.
        favoured: The top candidate's geometry when it clearly beats every other geometry, else ``None``.
        runner_up: The best candidate of another geometry (``None`` if there is none).
        margin: The top candidate's evidence over the runner-up's (``nan`` when undefined).
        t_statistic: Consistency of that margin across rows.
        strength: ``"clear"``, ``"weak"`` (no claim) or ``"not applicable"``.
        order: :func:`order_evidence` at the top candidate's geometry (``None`` when it has one
            channel). The order inside ``ranking`` comes from the raw adjacency, which per-position
            offsets can fool, and is not a verdict; this is.
        explanation: One line for a human, with the figures.
    """

    ranking: tuple[GeometryScore, ...]
    favoured: InputShape | None
    runner_up: GeometryScore | None
    margin: float
    t_statistic: float
    strength: Strength
    order: OrderEvidence | None
    explanation: str


def order_evidence(
    weight: MatrixLike,
    shape: InputShape,
    orders: Sequence[str] = FLATTEN_ORDERS,
    *,
    max_rows: int | None = MAX_ROWS,
    seed: int = 0,
) -> OrderEvidence:
    """Measure which flatten order the structure of a trained FC weight favours.

    Each candidate order lays the sampled rows out as ``(C, H, W)``, the way ``fc2conv`` writes the
    kernel, and gets a smoothness and an unexplained variance per row (module docstring). The order
    with the lower smoothness is favoured, "clear", when it wins by :data:`MIN_MARGIN`, leaves less
    unexplained variance by :data:`MIN_VARIANCE_MARGIN`, and both hold consistently across at least
    :data:`MIN_ROWS` rows (t tests at :data:`MAX_T_TEST_P`, and a sign test of the smoothness at
    :data:`MAX_SIGN_TEST_P`).
    Otherwise the result is "weak" and claims nothing.

    Cost: at most ``max_rows`` rows are read (a seeded sample, taken from the weight, which may be
    memory-mapped: only those rows are read), in float32, ``_CHUNK_VALUES`` values at a time; a
    4096 x 25088 weight takes a few tens of milliseconds.

    Args:
        weight: The FC weight in PyTorch's ``(out_features, in_features)`` layout, any floating dtype:
            a ``torch.Tensor``, a numpy array or a :class:`fc2conv.matrix.Matrix` (torch is imported
            for neither of the last two).
        shape: The map flattened into the layer; ``shape.features`` must equal ``in_features``.
        orders: The two candidate orders (``"chw"`` and ``"hwc"``, in the order to report them).
        max_rows: Read at most this many rows (a seeded sample); ``None`` reads every row.
        seed: Seed of the row sample.

    Returns:
        The evidence. "not applicable" when the orders coincide (C == 1 or H*W == 1), when the
        sampled weights hold NaN or Inf or are not floating point, or when they are constant.

    Raises:
        ValueError: if ``weight`` is not 2-D or does not match ``shape``, or ``orders`` is not the two orders.

    Example:
        >>> evidence = order_evidence(model.classifier[1].weight, InputShape(32, 4, 4))
        >>> order_warning(evidence, "chw")  # a line to show the user, or None
    """
    orders = _validated_orders(orders)
    if len(orders) != 2:
        raise ValueError(f"order evidence compares two flatten orders, got {list(orders)}")
    matrix = _weight_matrix(weight)
    _validate_weight(matrix, shape)
    unmeasured = tuple(LayoutScore(shape, o, math.nan, math.nan) for o in orders)
    if shape.channels == 1 or shape.height * shape.width == 1:
        why = "one channel" if shape.channels == 1 else "one position (H*W == 1)"
        return _not_applicable(shape, unmeasured, f"a {shape} map has {why}: both flatten orders read it the same way")
    problem = _unusable(matrix)
    if problem:
        return _not_applicable(shape, unmeasured, problem)

    measured = _measure_orders(matrix, shape, orders, max_rows, seed)
    if isinstance(measured, str):
        return _not_applicable(shape, unmeasured, measured)
    return _order_verdict(shape, orders, *measured)


def _measure_orders(
    matrix: Matrix, shape: InputShape, orders: Sequence[str], max_rows: int | None, seed: int
) -> tuple[dict[str, _Array], dict[str, _Array], int] | str:
    """Per usable row and order, the log smoothness and log unexplained variance; or why nothing was measured."""
    parts: dict[str, list[_OrderSums]] = {o: [] for o in orders}
    for rows in _row_chunks(matrix, max_rows, seed):
        if rows is None:
            return "the weights hold NaN or Inf values"
        for order in orders:
            parts[order].append(_order_sums(rows, shape, order))
    smoothness = {o: _per_row_ratio(parts[o], "smooth_adjacent", "smooth_scale") for o in orders}
    unexplained = {o: _per_row_ratio(parts[o], "unexplained", "total") for o in orders}
    usable = _usable_rows([*smoothness.values(), *unexplained.values()])
    rows_used = int(usable.sum())
    if rows_used == 0:
        return "the sampled weight rows have no variation beyond offsets"
    log_smoothness = {o: np.log(smoothness[o][usable]) for o in orders}
    log_unexplained = {o: np.log(unexplained[o][usable]) for o in orders}
    return log_smoothness, log_unexplained, rows_used


def _order_verdict(
    shape: InputShape,
    orders: Sequence[str],
    log_smoothness: dict[str, _Array],
    log_unexplained: dict[str, _Array],
    rows_used: int,
) -> OrderEvidence:
    """The verdict from the per-row figures: "clear" only when both figures agree, by enough, consistently."""
    scores = tuple(
        LayoutScore(shape, o, math.exp(float(log_smoothness[o].mean())), math.exp(float(log_unexplained[o].mean())))
        for o in orders
    )
    leaning, other = sorted(orders, key=lambda o: float(log_smoothness[o].mean()))
    smooth_test = _paired_test(log_smoothness[other] - log_smoothness[leaning])
    variance_test = _paired_test(log_unexplained[other] - log_unexplained[leaning])
    clear = (
        rows_used >= MIN_ROWS
        and smooth_test.margin >= MIN_MARGIN
        and variance_test.margin >= MIN_VARIANCE_MARGIN
        and max(smooth_test.t_p, variance_test.t_p) <= MAX_T_TEST_P
        and smooth_test.sign_p <= MAX_SIGN_TEST_P
    )
    lean, oth = (next(s for s in scores if s.order == o) for o in (leaning, other))
    figures = (
        f"as {shape}, smoothness {leaning} {lean.smoothness:.3f} vs {other} {oth.smoothness:.3f} (1 = noise; "
        f"{smooth_test.describe(rows_used)}), unexplained variance {lean.unexplained:.3f} vs {oth.unexplained:.3f} "
        f"({variance_test.describe(rows_used)})"
    )
    if clear:
        explanation = f"the weights fit {leaning} order: {figures}"
    else:
        explanation = f"no clear flatten order ({_shortfall(rows_used, smooth_test, variance_test)}): {figures}"
    return OrderEvidence(
        shape=shape,
        scores=scores,
        favoured=leaning if clear else None,
        leaning=leaning,
        margin=smooth_test.margin,
        variance_margin=variance_test.margin,
        t_statistic=min(smooth_test.t_statistic, variance_test.t_statistic),
        rows_agreeing=smooth_test.agreeing / rows_used,
        rows=rows_used,
        strength="clear" if clear else "weak",
        explanation=explanation,
    )


def order_warning(evidence: OrderEvidence, order_in_use: str) -> str | None:
    """A warning when the weights clearly favour another flatten order than the one in use, else ``None``.

    Args:
        evidence: The result of :func:`order_evidence`.
        order_in_use: The order the conversion uses (``"chw"`` or ``"hwc"``).

    Returns:
        One line naming both orders and the figures, or ``None`` when the evidence is weak, not
        applicable, or agrees with ``order_in_use``.
    """
    if evidence.favoured is None or evidence.favoured == order_in_use:
        return None
    framework = "channels-last (Keras/TensorFlow)" if evidence.favoured == "hwc" else "channels-first (PyTorch)"
    return (
        f"flatten order {order_in_use} is in use, but {evidence.explanation}; if the model flattened "
        f"a {framework} map, use flatten order {evidence.favoured}"
    )


def geometry_evidence(
    weight: MatrixLike,
    candidates: Iterable[InputShape],
    orders: Sequence[str] = FLATTEN_ORDERS,
    *,
    max_rows: int | None = MAX_ROWS,
    seed: int = 0,
) -> GeometryEvidence:
    """Rank candidate geometries (C x H x W, order) of the map an FC weight reads by smooth-neighbour evidence.

    For each candidate the sampled rows are laid out as it says, and each row's evidence is the
    log-likelihood gain of the candidate's neighbour pairs being more alike than random pairs
    (:attr:`GeometryScore.smooth_pairs`). All candidates share one denominator (the row's variance),
    so their evidence is comparable. The true map holds every adjacent pair within a channel and no
    pair across channels; maps that split it hold fewer such pairs, maps that stack its channels add
    pairs across channel seams, and both score less. Stacked and split maps stay close, though
    (``16x8x4`` against ``32x4x4``): the verdict is "clear" only when the top candidate beats the best
    other geometry by :data:`MIN_GEOMETRY_MARGIN` (t test at :data:`MAX_T_TEST_P` over at least
    :data:`MIN_ROWS` rows) with at least :data:`MIN_GEOMETRY_EVIDENCE` nats per row. The raw adjacency
    used here keeps offsets, so it is only the ranking; the order at the top geometry comes from
    :func:`order_evidence` (``GeometryEvidence.order``).

    Cost: one pass over the sampled rows per candidate and order.

    Args:
        weight: The FC weight, ``(out_features, in_features)``, any floating dtype: as for :func:`order_evidence`.
        candidates: Geometries to compare, each with ``features == in_features``; those with H*W == 1
            have no neighbours and are left out. :func:`map_factorisations` lists them all.
        orders: Flatten orders to try for each geometry.
        max_rows: Read at most this many rows (a seeded sample); ``None`` reads every row.
        seed: Seed of the row sample.

    Returns:
        The ranking, the verdict, and the order evidence at the top geometry.

    Raises:
        ValueError: if ``weight`` is not 2-D, a candidate does not fit it, or an order is unknown.

    Example:
        >>> evidence = geometry_evidence(weight, map_factorisations(weight.shape[1]))
        >>> evidence.ranking[0].shape, evidence.strength
    """
    orders = _validated_orders(orders)
    shapes = list(dict.fromkeys(candidates))
    matrix = _weight_matrix(weight)
    for shape in shapes:
        _validate_weight(matrix, shape)
    pairs = [(s, o) for s in shapes if s.height * s.width > 1 for o in (orders if s.channels > 1 else orders[:1])]
    if not pairs:
        return _no_geometry("no candidate has more than one position (H*W > 1)")
    problem = _unusable(matrix)
    if problem:
        return _no_geometry(problem)

    adjacent: dict[tuple[InputShape, str], list[_Array]] = {pair: [] for pair in pairs}
    totals: list[_Array] = []
    for rows in _row_chunks(matrix, max_rows, seed):
        if rows is None:
            return _no_geometry("the weights hold NaN or Inf values")
        totals.append(rows.squares)
        lagged: dict[int, _Array] = {}
        for shape, order in pairs:
            adjacent[(shape, order)].append(_adjacent_squares(rows.values, shape, order, lagged))
    total = np.concatenate(totals)
    raw_ratio = {}
    with np.errstate(divide="ignore", invalid="ignore"):  # a constant row: 0 / 0, left out below
        for shape, order in pairs:
            n_pairs = _neighbour_pairs(shape)
            scale = 2 * total / (shape.features - 1)
            raw_ratio[(shape, order)] = np.concatenate(adjacent[(shape, order)]) / n_pairs / scale
    usable = _usable_rows(raw_ratio.values())
    rows_used = int(usable.sum())
    if rows_used == 0:
        return _no_geometry("the sampled weight rows are constant")
    evidence = {pair: _smooth_pair_evidence(raw_ratio[pair][usable], _neighbour_pairs(pair[0])) for pair in pairs}
    scores = (
        GeometryScore(s, o, _lower_median(evidence[(s, o)]), math.exp(float(np.log(raw_ratio[(s, o)][usable]).mean())))
        for s, o in pairs
    )
    ranking = tuple(sorted(scores, key=lambda g: -g.smooth_pairs))
    at_top = None
    if ranking[0].shape.channels > 1:
        at_top = order_evidence(matrix, ranking[0].shape, orders, max_rows=max_rows, seed=seed)
    return _geometry_verdict(ranking, evidence, rows_used, at_top)


def _geometry_verdict(
    ranking: tuple[GeometryScore, ...],
    evidence: dict[tuple[InputShape, str], _Array],
    rows_used: int,
    at_top: OrderEvidence | None,
) -> GeometryEvidence:
    """The verdict on the best geometry: "clear" only when it beats the best other one by enough, consistently."""
    top = ranking[0]
    runner_up = next((g for g in ranking if g.shape != top.shape), None)
    if runner_up is None:
        return GeometryEvidence(ranking, None, None, math.nan, math.nan, "weak", at_top,
                                f"only one geometry was given ({top.shape}): nothing to compare it with")  # fmt: skip
    per_row = evidence[(top.shape, top.order)] - evidence[(runner_up.shape, runner_up.order)]
    t_statistic = _t_statistic(per_row)
    t_p = _t_test_p(t_statistic, rows_used - 1)
    margin = top.smooth_pairs / runner_up.smooth_pairs if runner_up.smooth_pairs > 0 else math.inf
    shortfall = []
    if top.smooth_pairs < MIN_GEOMETRY_EVIDENCE:
        shortfall.append(f"evidence < {MIN_GEOMETRY_EVIDENCE:g} nats/row")
    if margin < MIN_GEOMETRY_MARGIN:
        shortfall.append(f"margin < {MIN_GEOMETRY_MARGIN:.2f}x")
    if t_p > MAX_T_TEST_P:
        shortfall.append(f"t test p > {MAX_T_TEST_P:.0e}")
    if rows_used < MIN_ROWS:
        shortfall.append(f"fewer than {MIN_ROWS} rows")
    figures = (
        f"{top.shape} {top.order} {top.smooth_pairs:.1f} nats/row (raw ratio {top.raw_smoothness:.3f}) vs "
        f"{runner_up.shape} {runner_up.order} {runner_up.smooth_pairs:.1f} (raw ratio {runner_up.raw_smoothness:.3f}): "
        f"margin {margin:.2f}x, t = {t_statistic:.1f} (p = {t_p:.0e}), {rows_used} rows"
    )
    if shortfall:
        explanation = f"no clear geometry ({', '.join(shortfall)}): {figures}"
    else:
        explanation = f"the weights look like a {top.shape} map: {figures}"
    return GeometryEvidence(
        ranking=ranking,
        favoured=None if shortfall else top.shape,
        runner_up=runner_up,
        margin=margin,
        t_statistic=t_statistic,
        strength="weak" if shortfall else "clear",
        order=at_top,
        explanation=explanation,
    )


def map_factorisations(in_features: int) -> tuple[InputShape, ...]:
    """Every map C x H x W with ``C * H * W == in_features`` and ``H * W > 1``, by channels then height.

    Args:
        in_features: Number of inputs of the FC layer.

    Returns:
        The geometries; 512 gives 54 of them, from 1x1x512 to 256x2x1.

    Raises:
        ValueError: if ``in_features`` is less than 1.
    """
    if in_features < 1:
        raise ValueError(f"in_features must be at least 1, got {in_features}")
    divisors = [d for d in range(1, math.isqrt(in_features) + 1) if in_features % d == 0]
    divisors = sorted({*divisors, *(in_features // d for d in divisors)})
    shapes: list[InputShape] = []
    for channels in divisors:
        area = in_features // channels
        if area == 1:
            continue
        shapes.extend(InputShape(channels, height, area // height) for height in divisors if area % height == 0)
    return tuple(shapes)


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SampledRows:
    """A chunk of sampled weight rows, centred (each row's mean removed), with each row's sum of squares."""

    values: _Array  # (n, in_features), float32 (float64 for float64 weights), C-contiguous
    squares: _Array  # (n,), float64


@dataclass(frozen=True)
class _OrderSums:
    """Per-row sums (float64) of one chunk in one layout; see :func:`_order_sums`."""

    smooth_adjacent: _Array
    smooth_scale: _Array
    unexplained: _Array
    total: _Array


@dataclass(frozen=True)
class _PairedTest:
    """Per-row log ratios (other over leaning layout) summarised: margin, t test and sign test."""

    margin: float
    t_statistic: float
    t_p: float
    agreeing: int
    sign_p: float

    def describe(self, rows: int) -> str:
        return f"{self.margin:.2f}x, {self.agreeing}/{rows} rows, t = {self.t_statistic:.1f}"


def _sampled_rows(out: int, max_rows: int | None, seed: int) -> np.ndarray:
    """The indices of the rows read: all of them up to ``max_rows``, else a seeded sample, sorted (int64)."""
    if max_rows is None or out <= max_rows:
        return np.arange(out, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).permutation(out)[:max_rows]).astype(np.int64)


def _row_chunks(matrix: Matrix, max_rows: int | None, seed: int) -> Iterator[_SampledRows | None]:
    """The sampled rows of ``matrix``, ``_CHUNK_VALUES`` values at a time; ``None`` if one is NaN or Inf.

    Only the sampled rows are read (:meth:`Matrix.take`: a memory-mapped weight reads just those).
    The arithmetic is float32 (float64 weights stay float64): the statistics are ratios of sums
    that need a few digits, not all of them. Rows whose squares would overflow or underflow in
    float32 are scaled first (ratios do not depend on the scale).
    """
    out, in_features = matrix.shape
    rows = _sampled_rows(out, max_rows, seed)
    step = max(1, _CHUNK_VALUES // max(in_features, 1))
    for start in range(0, len(rows), step):
        # A copy of the sampled rows, ours to change.
        chunk = np.ascontiguousarray(matrix.take(rows[start : start + step]))
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            chunk -= chunk.mean(axis=1, keepdims=True)
            squares = _squared_norms(chunk)
            if not bool(np.isfinite(squares).all()) or bool((squares < 1e-30).any()):
                # Rare: NaN/Inf, or values so large or small that float32 squares fail. Check, then scale.
                if not bool(np.isfinite(chunk).all()):
                    yield None
                    return
                peak = np.abs(chunk).max(axis=1, keepdims=True).astype(np.float64)
                chunk = chunk.astype(np.float64) / np.where(peak > 0, peak, 1.0)
                squares = _squared_norms(chunk)
        yield _SampledRows(chunk, squares)


def _kernel_view(values: _Array, shape: InputShape, order: str) -> _Array:
    """Rows ``(n, C*H*W)`` as the conv kernel ``(n, C, H, W)`` they become, as a view (no copy).

    The rule of :func:`fc2conv.convert.fc_to_conv_weight` (tests/test_evidence.py checks that they
    agree): ``chw`` is a reshape, ``hwc`` a reshape to (H, W, C) and a transposition of the axes.
    """
    n = values.shape[0]
    c, h, w = shape.channels, shape.height, shape.width
    if order == "hwc":
        return values.reshape(n, h, w, c).transpose(0, 3, 1, 2)
    return values.reshape(n, c, h, w)


def _neighbour_pairs(shape: InputShape) -> int:
    """Horizontally and vertically adjacent pairs of positions within the channels of ``shape``."""
    c, h, w = shape.channels, shape.height, shape.width
    return c * (h * (w - 1) + (h - 1) * w)


def _adjacent_squares(values: _Array, shape: InputShape, order: str, lagged: dict[int, _Array]) -> _Array:
    """Per row of ``values`` laid out as ``shape`` in ``order``: the sum (float64) of squared differences
    of horizontal and vertical neighbours within a channel.

    Neighbours are the values a fixed distance apart in the flattened row (chw: 1 and W; hwc: C and
    W*C). The squared differences of every pair at a distance are summed once (``lagged``, shared by
    all the candidates of a chunk), and the few pairs that cross a line or a channel boundary are
    taken out again: long contiguous passes rather than one per candidate over runs of W values.
    """
    n, (c, h, w) = values.shape[0], (shape.channels, shape.height, shape.width)
    horizontal = vertical = np.zeros(n)
    if order == "hwc":
        lines = values.reshape(n, h, w * c)  # each line holds W positions of C channels
        if w > 1:  # pairs C apart, but not from the end of one line to the start of the next
            horizontal = _lag_squares(values, c, lagged) - _squared_norms(lines[:, 1:, :c] - lines[:, :-1, -c:])
        if h > 1:  # pairs W*C apart: all within a channel
            vertical = _lag_squares(values, w * c, lagged)
    else:
        if w > 1:  # pairs 1 apart, but not from the end of one line to the start of the next
            lines = values.reshape(n, c * h, w)
            horizontal = _lag_squares(values, 1, lagged) - _squared_norms(lines[:, 1:, 0] - lines[:, :-1, -1])
        if h > 1:  # pairs W apart, but not from the last line of a channel to the first of the next
            maps = values.reshape(n, c, h * w)
            vertical = _lag_squares(values, w, lagged) - _squared_norms(maps[:, 1:, :w] - maps[:, :-1, -w:])
    return np.maximum(horizontal, 0.0) + np.maximum(vertical, 0.0)


def _lag_squares(values: _Array, lag: int, lagged: dict[int, _Array]) -> _Array:
    """Per row, the sum (in float64) of ``(x[i + lag] - x[i]) ** 2`` over the row, remembered in ``lagged``."""
    if lag not in lagged:
        lagged[lag] = np.square(values[:, lag:] - values[:, :-lag]).sum(axis=1, dtype=np.float64)
    return lagged[lag]


def _order_sums(rows: _SampledRows, shape: InputShape, order: str) -> _OrderSums:
    """Per-row sums of the two order statistics for ``rows`` laid out as ``shape`` in ``order``.

    With ``k`` a centred row as a (C, H, W) map, ``r = k - m_c - m_p`` its double-centred residual
    (``m_c`` the mean of channel c, ``m_p`` the mean over channels at position p), and ``s_i`` the sum
    of the 2 to 4 horizontal and vertical neighbours of weight i in its channel:

    * smoothness = ``sum over neighbour pairs (r_i - r_j)^2``, over its value for i.i.d. noise of
      variance sigma^2, ``2 sigma^2 (1 - 1/C)`` a pair, with sigma^2 estimated by
      ``sum r^2 / ((C - 1)(H*W - 1))``;
    * unexplained = ``sum r^2 - max(P, 0)^2 / sum s^2`` with ``P = sum r_i s_i`` (what is left of the
      residual after the least-squares fit ``r ~ beta * s``, beta >= 0), over ``sum k^2``.

    Nothing is materialised but ``r`` and one product at a time: with ``deg_i`` the number of
    neighbours of weight i and ``Q(a, b)`` the sum of ``r_i r_j`` over pairs a rows and b columns apart,
    ``P = 2 (Q(0, 1) + Q(1, 0))``, ``sum over pairs (r_i - r_j)^2 = sum deg_i r_i^2 - P`` and
    ``sum s^2 = sum deg_i r_i^2 + 2 (Q(0, 2) + Q(2, 0)) + 4 (Q(1, 1) + Q(1, -1))`` (two weights two
    apart in a line have one common neighbour, two diagonal ones have two).
    """
    c, h, w = shape.channels, shape.height, shape.width
    kernel = _long_inner_axis(_kernel_view(rows.values, shape, order), order)
    residual = kernel - kernel.mean(axis=(2, 3), keepdims=True)  # laid out in memory as the kernel is
    residual -= kernel.mean(axis=1, keepdims=True)
    residual_squares = _squared_norms(residual)
    # sum_i deg_i r_i^2: every weight has 4 neighbours but those on an edge, which lack one per edge.
    edges = (residual[..., 0, :], residual[..., -1, :], residual[..., :, 0], residual[..., :, -1])
    weighted_squares = 4 * residual_squares
    for edge in edges:
        weighted_squares -= _squared_norms(edge)

    def products(rows_apart: int, columns_apart: int) -> _Array:
        first = residual[..., : h - rows_apart, max(0, -columns_apart) : w - max(0, columns_apart)]
        second = residual[..., rows_apart:, max(0, columns_apart) : w + min(0, columns_apart) or None]
        return _row_sums(first * second)

    neighbour_products = 2 * (products(0, 1) + products(1, 0))
    neighbour_squares = (
        weighted_squares + 2 * (products(0, 2) + products(2, 0)) + 4 * (products(1, 1) + products(1, -1))
    )
    smooth_adjacent = np.maximum(weighted_squares - neighbour_products, 0.0)
    smooth_scale = 2 * _neighbour_pairs(shape) * (1 - 1 / c) * residual_squares / ((c - 1) * (h * w - 1))
    explained = np.square(np.maximum(neighbour_products, 0.0)) / np.maximum(neighbour_squares, 1e-300)
    unexplained = np.maximum(residual_squares - explained, 0.0)
    return _OrderSums(smooth_adjacent, smooth_scale, unexplained, rows.squares)


def _long_inner_axis(kernel: _Array, order: str) -> _Array:
    """The ``(n, C, H, W)`` kernel view of rows laid out in ``order``, with the longer of its channel and
    column axes innermost in memory (a copy if that is not so already).

    The sums of :func:`_order_sums` run over slices of whole rows and columns: numpy takes them several
    times faster along a long innermost axis (VGG16's 512x7x7 read in chw order: 512 channels rather than
    runs of 7 columns).
    """
    channels, columns = kernel.shape[1], kernel.shape[3]
    channels_inner = order == "hwc"
    if channels == columns or (channels > columns) == channels_inner:
        return kernel
    if channels > columns:
        return np.ascontiguousarray(kernel.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(kernel)


def _row_sums(values: _Array) -> _Array:
    """Per row (first axis), the sum of the values, summed in their dtype and returned as float64."""
    return values.sum(axis=tuple(range(1, values.ndim))).astype(np.float64)


def _squared_norms(values: _Array) -> _Array:
    """Per row (first axis), the sum of squares, summed in the values' dtype and returned as float64."""
    return _row_sums(np.square(values))


def _smooth_pair_evidence(raw_ratio: _Array, n_pairs: int) -> _Array:
    """Per row: the Gaussian log-likelihood gain (nats) of ``n_pairs`` pair differences with variance
    ratio ``s`` instead of 1, counted only for ``s < 1`` (smooth), as ``n_pairs * (s - 1 - ln s) / 2``."""
    s = np.maximum(raw_ratio, 1e-12)
    return np.where(s < 1, n_pairs * (s - 1 - np.log(s)) / 2, 0.0)


def _lower_median(values: _Array) -> float:
    """The median, the lower of the two middle values for an even count (as ``torch.median`` took it)."""
    middle = (values.size - 1) // 2
    return float(np.partition(values, middle)[middle])


def _per_row_ratio(parts: list[_OrderSums], numerator: str, denominator: str) -> _Array:
    """One per-row ratio of two fields of the chunks' sums, over every sampled row (0 / 0 is NaN)."""
    top = np.concatenate([getattr(part, numerator) for part in parts])
    bottom = np.concatenate([getattr(part, denominator) for part in parts])
    with np.errstate(divide="ignore", invalid="ignore"):
        return top / bottom


def _usable_rows(ratios: Iterable[_Array]) -> np.ndarray:
    """Rows where every given ratio is finite and positive (a row constant in some layout tells nothing)."""
    usable = None
    for ratio in ratios:
        ok = np.isfinite(ratio) & (ratio > 0)
        usable = ok if usable is None else usable & ok
    assert usable is not None
    return usable


def _paired_test(log_ratios: _Array) -> _PairedTest:
    rows = log_ratios.size
    t_statistic = _t_statistic(log_ratios)
    agreeing = int((log_ratios > 0).sum())
    return _PairedTest(
        margin=math.exp(float(log_ratios.mean())),
        t_statistic=t_statistic,
        t_p=_t_test_p(t_statistic, rows - 1),
        agreeing=agreeing,
        sign_p=_sign_test_p(agreeing, rows),
    )


def _t_statistic(values: _Array) -> float:
    """Mean over standard error (inf when every value is the same non-zero number, 0 for fewer than 2)."""
    n = values.size
    if n < 2:
        return 0.0
    mean, std = float(values.mean()), float(values.std(ddof=1))
    if std == 0:
        return math.copysign(math.inf, mean) if mean else 0.0
    return mean / (std / math.sqrt(n))


def _t_test_p(t_statistic: float, dof: int) -> float:
    """Two-sided p-value of Student's t with ``dof`` degrees of freedom (exact series for whole ``dof``).

    With ``theta = atan(t / sqrt(dof))``, ``P(|T| <= t)`` is ``sin(theta) * sum_k a_k cos(theta)^(2k)``
    for even ``dof`` and ``(2 / pi) * (theta + sin(theta) * sum_k b_k cos(theta)^(2k + 1))`` for odd ``dof``
    (Abramowitz and Stegun 26.7.3 and 26.7.4).
    """
    if dof < 1 or math.isnan(t_statistic):
        return 1.0
    if math.isinf(t_statistic):
        return 0.0
    theta = math.atan(abs(t_statistic) / math.sqrt(dof))
    sine, cosine_sq = math.sin(theta), math.cos(theta) ** 2
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= cosine_sq * (2 * k - 1) / (2 * k)
            total += term
        inside = sine * total
    else:
        term, total = math.cos(theta), 0.0
        if dof > 1:
            total = term
            for k in range(1, (dof - 1) // 2):
                term *= cosine_sq * (2 * k) / (2 * k + 1)
                total += term
        inside = 2 / math.pi * (theta + sine * total)
    return max(0.0, 1.0 - inside)


def _sign_test_p(agreeing: int, rows: int) -> float:
    """Two-sided sign test: the chance that at least ``agreeing`` of ``rows`` fair coin flips (or as few) agree."""
    if rows == 0:
        return 1.0
    tail = sum(math.comb(rows, k) for k in range(max(agreeing, rows - agreeing), rows + 1))
    return min(1.0, 2 * tail / 2**rows)


def _shortfall(rows: int, smooth: _PairedTest, variance: _PairedTest) -> str:
    """Why an order verdict is not clear, as a short list."""
    reasons = []
    if rows < MIN_ROWS:
        reasons.append(f"fewer than {MIN_ROWS} rows")
    if smooth.margin < MIN_MARGIN:
        reasons.append(f"smoothness margin < {MIN_MARGIN:.2f}x")
    if variance.margin < 1:
        reasons.append("the unexplained variance leans the other way")
    elif variance.margin < MIN_VARIANCE_MARGIN:
        reasons.append(f"variance margin < {MIN_VARIANCE_MARGIN:.2f}x")
    if max(smooth.t_p, variance.t_p) > MAX_T_TEST_P:
        reasons.append(f"t test p > {MAX_T_TEST_P:.0e}")
    if rows >= MIN_ROWS and smooth.sign_p > MAX_SIGN_TEST_P:
        reasons.append("too few rows agree")
    return ", ".join(reasons)


def _validated_orders(orders: Sequence[str]) -> tuple[str, ...]:
    unique = tuple(dict.fromkeys(orders))
    unknown = [o for o in unique if o not in FLATTEN_ORDERS]
    if unknown:
        raise ValueError(f"unknown flatten order {unknown[0]!r}; expected one of {', '.join(FLATTEN_ORDERS)}")
    if not unique:
        raise ValueError("no flatten order to measure")
    return unique


def _weight_matrix(weight: MatrixLike) -> Matrix:
    """The weight as a :class:`fc2conv.matrix.Matrix`, checked to be 2-D."""
    dims = getattr(weight, "shape", None)
    if dims is not None and len(dims) != 2:
        raise ValueError(f"expected a 2-D FC weight (out_features, in_features), got shape {tuple(dims)}")
    return as_matrix(weight)  # TypeError for anything else


def _validate_weight(matrix: Matrix, shape: InputShape) -> None:
    if matrix.shape[1] != shape.features:
        raise ValueError(f"the weight takes {matrix.shape[1]} inputs; {shape} = {shape.features}")


def _unusable(matrix: Matrix) -> str | None:
    """Why the weight's values cannot be measured, or ``None``."""
    if not is_floating(matrix.dtype_name):
        return f"the weight is {matrix.dtype_name}, not floating point"
    if matrix.shape[0] == 0:
        return "the weight has no rows"
    return None


def _not_applicable(shape: InputShape, scores: tuple[LayoutScore, ...], why: str) -> OrderEvidence:
    return OrderEvidence(shape, scores, None, None, math.nan, math.nan, math.nan, math.nan, 0, "not applicable",
                         f"not applicable: {why}")  # fmt: skip


def _no_geometry(why: str) -> GeometryEvidence:
    return GeometryEvidence((), None, None, math.nan, math.nan, "not applicable", None, f"not applicable: {why}")
