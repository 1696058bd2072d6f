"""Margins of fc2conv.evidence on every case it was validated on, and its time on a VGG16 fc6 weight.

    python benchmarks/evidence_margins.py              # trained cases on seed 0 (about half a minute)
    python benchmarks/evidence_margins.py --seeds 0 1  # and on a second seed

One table, a row per case and true flatten order: the committed digits samples, the small CNNs of
tests/evidence_cases.py trained here (digits and synthetic bars, seeded, single-threaded), weights with
a synthetic structure (smooth maps, offsets), and random untrained weights. Margins are signed
toward the truth: above 1 favours the true order, below 1 the wrong one. ``smooth`` is the smoothness
margin, ``var`` the unexplained-variance margin, ``t`` the smaller t statistic (negative when the two
disagree). The verdict column is what order_evidence says; the last two columns say whether either
statistic alone (margin >= 1.10 and t test p <= 1e-4, the same thresholds) would have named the wrong
order. Then the time of one order_evidence on a 4096 x 25088 float32 weight (VGG16's fc6 read as 512x7x7),
given as a torch tensor and as a numpy array.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fc2conv import evidence  # noqa: E402
from fc2conv.evidence import geometry_evidence, map_factorisations, order_evidence  # noqa: E402
from fc2conv.matrix import as_matrix  # noqa: E402
from fc2conv.types import InputShape  # noqa: E402
from tests.evidence_cases import (  # noqa: E402
    RANDOM_CASES,
    SYNTHETIC_KINDS,
    TRAINED_CASES,
    random_weight,
    synthetic_weight,
    train_first_fc,
)

SYNTHETIC_SHAPES = ((32, 4, 4), (64, 2, 2), (17, 4, 4), (2, 8, 8), (4, 8, 8), (128, 7, 7), (512, 7, 7))
RANDOM_SEEDS = (0, 1, 2)
HEADER = (
    f"{'group':<10} {'case':<46} {'true':<4} {'smooth':>6} {'var':>6} {'t':>6}  {'verdict':<12} {'smooth alone':<13} "
    "var alone"
)


def row(group: str, name: str, weight: torch.Tensor, shape: tuple[int, int, int], truth: str | None) -> dict:
    """Measure one weight and print its line; ``truth`` None for random weights (any claim is wrong)."""
    found = order_evidence(weight, InputShape(*shape))
    toward = truth or "chw"
    sign = 1 if found.leaning == toward else -1
    smooth, variance = found.margin**sign, found.variance_margin**sign
    if found.strength != "clear":
        verdict = found.strength
    else:
        verdict = "right" if found.favoured == truth else "WRONG"
    alone = _alone_verdicts(weight, shape, truth)
    print(
        f"{group:<10} {name:<46} {truth or '-':<4} {smooth:>6.2f} {variance:>6.2f} {found.t_statistic:>6.1f}  "
        f"{verdict:<12} {alone[0]:<13} {alone[1]}"
    )
    return {"group": group, "verdict": verdict, "alone": alone}


def _alone_verdicts(weight: torch.Tensor, shape: tuple[int, int, int], truth: str | None) -> tuple[str, str]:
    """What the smoothness alone and the unexplained variance alone would claim with the same thresholds."""
    map_shape = InputShape(*shape)
    if map_shape.channels == 1 or map_shape.height * map_shape.width == 1:
        return "-", "-"
    parts: dict[str, list] = {o: [] for o in ("chw", "hwc")}
    for rows in evidence._row_chunks(as_matrix(weight), evidence.MAX_ROWS, 0):
        for order in parts:
            parts[order].append(evidence._order_sums(rows, map_shape, order))
    claims = []
    for numerator, denominator, min_margin in (
        ("smooth_adjacent", "smooth_scale", evidence.MIN_MARGIN),
        ("unexplained", "total", evidence.MIN_MARGIN),
    ):
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = {o: np.log(evidence._per_row_ratio(parts[o], numerator, denominator)) for o in parts}
        usable = np.isfinite(logs["chw"]) & np.isfinite(logs["hwc"])
        test = evidence._paired_test(logs["hwc"][usable] - logs["chw"][usable])  # > 0 favours chw
        margin = test.margin if test.margin >= 1 else 1 / test.margin
        if margin < min_margin or test.t_p > evidence.MAX_T_TEST_P:
            claims.append("none")
            continue
        claim = "chw" if test.margin > 1 else "hwc"
        claims.append("right" if claim == truth else "WRONG")
    return claims[0], claims[1]


def time_vgg16_fc6(as_array: bool = False, repeat: int = 15) -> tuple[float, float, float]:
    """Best and median wall time and median CPU time of order_evidence on a 4096 x 25088 float32 weight
    (a tensor, or a numpy array with ``as_array``)."""
    tensor = torch.randn(4096, 25088, generator=torch.Generator().manual_seed(0))
    weight: torch.Tensor | np.ndarray = tensor.numpy() if as_array else tensor
    shape = InputShape(512, 7, 7)
    order_evidence(weight, shape)  # warm up
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        order_evidence(weight, shape)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    walls.sort()
    cpus.sort()
    return walls[0], walls[len(walls) // 2], cpus[len(cpus) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the trained cases")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(HEADER)
    results = []

    from safetensors.torch import load_file

    digits = torch.load(ROOT / "sample_models" / "digits_cnn.pt", weights_only=True)["classifier.1.weight"]
    channels_last = load_file(ROOT / "sample_models" / "digits_channels_last.safetensors")["classifier.1.weight"]
    results.append(row("sample", "digits_cnn.pt 32x4x4", digits, (32, 4, 4), "chw"))
    results.append(row("sample", "digits_channels_last.safetensors 32x4x4", channels_last, (32, 4, 4), "hwc"))

    for case in TRAINED_CASES:
        for seed in args.seeds:
            for order in ("chw", "hwc"):
                weight, accuracy = train_first_fc(case, order, seed)
                name = f"{case.name} s{seed} acc {accuracy:.2f}"
                results.append(row("trained", name, weight, case.map_shape, order) | {"expect": case.expect})

    for kind in SYNTHETIC_KINDS:
        for shape in SYNTHETIC_SHAPES:
            for order in ("chw", "hwc"):
                name = f"{kind} {'x'.join(map(str, shape))}"
                results.append(row("synthetic", name, synthetic_weight(kind, shape, order, rows=64), shape, order))

    for shape, rows in RANDOM_CASES:
        for seed in RANDOM_SEEDS:
            for init in ("kaiming", "normal"):
                name = f"{init} {'x'.join(map(str, shape))}, {rows} rows, seed {seed}"
                results.append(row("random", name, random_weight(shape, rows, seed, init), shape, None))

    print()
    for group in ("sample", "trained", "synthetic", "random"):
        mine = [r for r in results if r["group"] == group]
        counts = {v: sum(r["verdict"] == v for r in mine) for v in ("right", "weak", "WRONG", "not applicable")}
        alone = [sum(r["alone"][i] == "WRONG" for r in mine) for i in (0, 1)]
        print(f"{group:<10} {len(mine):>3} cases: {counts['right']} right, {counts['weak']} weak, "
              f"{counts['WRONG']} wrong; alone, the smoothness would name the wrong order in {alone[0]}, "
              f"the unexplained variance in {alone[1]}")  # fmt: skip
    trained = [r for r in results if r["group"] == "trained"]
    missed = sum((r["expect"] == "clear") != (r["verdict"] == "right") and r["expect"] != "not wrong" for r in trained)
    print(f"trained cases off their expectation (clear / weak): {missed}")

    for label, weight in (("digits_cnn.pt", digits), ("digits_channels_last.safetensors", channels_last)):
        found = geometry_evidence(weight, map_factorisations(512))
        top = ", ".join(f"{g.shape} {g.order} {g.smooth_pairs:.1f}" for g in found.ranking[:3])
        print(f"geometry of {label} among the 54 maps of 512: {found.strength}; top 3 (nats/row): {top}; "
              f"order at the top: {found.order.favoured if found.order else None}")  # fmt: skip

    for kind in ("tensor", "numpy array"):
        best, median, cpu = time_vgg16_fc6(as_array=kind != "tensor")
        print(f"order_evidence on a 4096 x 25088 float32 {kind} (512x7x7, {evidence.MAX_ROWS} rows sampled): "
              f"best {best * 1000:.1f} ms, median {median * 1000:.1f} ms wall, median {cpu * 1000:.1f} ms CPU "
              f"(target: well under 100 ms)")  # fmt: skip
    print(f"total {time.perf_counter() - started:.0f} s")
    wrong = sum(r["verdict"] == "WRONG" for r in results)
    return 1 if wrong or missed or not math.isfinite(best) else 0


if __name__ == "__main__":
    sys.exit(main())
