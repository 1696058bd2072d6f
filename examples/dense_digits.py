"""Dense prediction demo: digits pasted on a large canvas, classified everywhere in one pass.

    python examples/dense_digits.py                # prints the class map, writes dense_digits.png
    python examples/dense_digits.py --png out.png --repeat 20

The trained sample (sample_models/digits_cnn.pt, an 8x8-digit classifier with a Flatten -> Linear
head) is converted with ``fc2conv.convert_module``. The converted network runs once on the whole
canvas and returns a map of class scores, one per 8x8 window; the script checks that every score
equals the original network's on that crop and times both ways.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import zlib
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fc2conv import conversion_of, convert_module  # noqa: E402
from sample_models.train_digits import DigitsCNN  # noqa: E402

# Where the example digits go on the canvas (row, column of their top-left corner).
PLACES = [(2, 3), (11, 14), (4, 26), (12, 37), (3, 49), (10, 60)]
CANVAS = (22, 72)
CONFIDENT = 0.99
CLASS_COLOURS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip
RICH_COLOURS = ["red", "green", "yellow", "blue", "dark_orange", "purple", "cyan", "magenta", "chartreuse1", "pink1"]


def build_canvas(images: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    canvas = torch.zeros(1, 1, *CANVAS)
    placed = []
    for k, (row, col) in enumerate(PLACES):
        canvas[0, 0, row : row + 8, col : col + 8] = torch.maximum(
            canvas[0, 0, row : row + 8, col : col + 8], images[k, 0]
        )
        placed.append((row, col, k))
    return canvas, placed


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def write_png(path: Path, pixels: list[list[tuple[int, int, int]]]) -> None:
    """A minimal RGB PNG writer (no imaging library needed)."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(v for pixel in row for v in pixel) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                     + chunk(b"IEND", b""))  # fmt: skip


def picture(canvas: torch.Tensor, classes: torch.Tensor, confidence: torch.Tensor, scale: int = 8):
    """The canvas (grey) above the class map drawn where each 8x8 window is centred: colour per class
    where the network is confident (>= CONFIDENT), dark grey elsewhere."""
    height, width = canvas.shape[-2:]
    grey = [[(int(255 * float(v)),) * 3 for v in row] for row in canvas[0, 0]]
    panel = [[(24, 24, 24)] * width for _ in range(height)]
    for i in range(classes.shape[0]):
        for j in range(classes.shape[1]):
            if float(confidence[i, j]) >= CONFIDENT:
                panel[i + 4][j + 4] = CLASS_COLOURS[int(classes[i, j])]
    gap = [[(255, 255, 255)] * width]
    cells = grey + gap + panel
    return [[cell for cell in row for _ in range(scale)] for row in cells for _ in range(scale)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, default=Path("dense_digits.png"))
    parser.add_argument("--repeat", type=int, default=10, help="timing runs (the best is shown)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # timings of one core, comparable from run to run
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, float]:
    console = Console()

    model = DigitsCNN().eval()
    model.load_state_dict(torch.load(ROOT / "sample_models" / "digits_cnn.pt", weights_only=True))
    examples = torch.load(ROOT / "sample_models" / "digits_examples.pt", weights_only=True)
    dense_model = convert_module(model, DigitsCNN.input_shape)
    record = conversion_of(dense_model)
    canvas, placed = build_canvas(examples["images"])

    with torch.no_grad():
        scores = dense_model(canvas)[0]  # (10, H - 7, W - 7): one pass over the whole canvas
        crops = canvas.unfold(2, 8, 1).unfold(3, 8, 1)  # (1, 1, H-7, W-7, 8, 8)
        grid = crops.shape[2:4]
        batch = crops.reshape(-1, 1, 8, 8)
        per_crop = model(batch).T.reshape(10, *grid)
        difference = float((scores - per_crop).abs().max())
        dense_seconds = best_time(lambda: dense_model(canvas), args.repeat)
        batched_seconds = best_time(lambda: model(batch), args.repeat)
        loop_seconds = best_time(lambda: [model(batch[k : k + 1]) for k in range(len(batch))], max(1, args.repeat // 5))

    probabilities = scores.softmax(0)
    confidence, classes = probabilities.max(0)
    console.print(
        f"canvas {CANVAS[0]}x{CANVAS[1]} with {len(placed)} digits; converted head: "
        f"{', '.join(c.became for c in record.changes)}; class map {grid[0]}x{grid[1]} (one per 8x8 window)"
    )
    for row in range(grid[0]):
        line = Text()
        for col in range(grid[1]):
            c, p = int(classes[row, col]), float(confidence[row, col])
            line.append(str(c) if p >= CONFIDENT else "·", style=RICH_COLOURS[c] if p >= CONFIDENT else "grey37")
        console.print(line)
    found = []
    for row, col, k in placed:
        predicted = int(classes[row, col])
        found.append(predicted == int(examples["labels"][k]))
        console.print(
            f"  digit {int(examples['labels'][k])} at ({row}, {col}): the map says {predicted} "
            f"({float(confidence[row, col]):.2f})"
        )
    console.print(
        f"one dense pass: {dense_seconds * 1e3:.2f} ms; original model on all {len(batch)} crops: "
        f"{batched_seconds * 1e3:.2f} ms batched ({batched_seconds / dense_seconds:.1f}x slower), "
        f"{loop_seconds * 1e3:.1f} ms one by one ({loop_seconds / dense_seconds:.0f}x slower); "
        f"max |dense - per crop| = {difference:.2e}"
    )
    write_png(args.png, picture(canvas, classes, confidence))
    console.print(f"wrote {args.png}")
    return {"difference": difference, "dense": dense_seconds, "batched": batched_seconds, "loop": loop_seconds,
            "found": sum(found), "placed": len(placed)}  # fmt: skip


if __name__ == "__main__":
    main()
