"""Time and memory of `fc2conv convert` on a VGG16-layout checkpoint, beside the baselines it must match.

    python benchmarks/bench_convert.py                 # fp32 VGG16 layout (~553 MB), plus a half-size one
    python benchmarks/bench_convert.py --sizes 1.0     # only the full size
    python benchmarks/bench_convert.py --repeat 3      # best of 3 runs per command

Side by side, in one run, on the same file and the same page cache:
  * fc2conv:     `fc2conv convert vgg.pt --input-shape 512x7x7 -o out.safetensors --force --json`
                 (numeric check of every converted layer included)
  * hand script: torch.load(mmap=True, weights_only=True), reshape, safetensors.torch.save_file
                 (no check at all), and the same followed by an fsync of the file (fc2conv fsyncs
                 before it publishes, so that is the like-for-like cost)
  * cp:          copying the file
Each command runs in its own process; wall time is measured around it, peak memory is read from
/proc/<pid>/status (VmHWM, and the peak of RssAnon sampled every 5 ms). It prints a table of figures
and the ratios against the baselines, then the start-up figures (`fc2conv --help`, `inspect` of a
2 MB and a 2 GB safetensors file, which must not import torch) and the time of the numeric check of
one 4096 x 25088 layer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAND_SCRIPT = r"""
import sys, torch
from safetensors.torch import save_file
src, dst = sys.argv[1], sys.argv[2]
sd = torch.load(src, mmap=True, weights_only=True, map_location="cpu")
sd["classifier.0.weight"] = sd["classifier.0.weight"].reshape(-1, 512, 7, 7)
sd["classifier.3.weight"] = sd["classifier.3.weight"][:, :, None, None]
sd["classifier.6.weight"] = sd["classifier.6.weight"][:, :, None, None]
save_file({k: v.contiguous() for k, v in sd.items()}, dst)
if "--fsync" in sys.argv:  # the same durability as fc2conv, which fsyncs before it renames
    import os
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
"""

VGG16_CONVS = [
    (3, 64),
    (64, 64),
    (64, 128),
    (128, 128),
    (128, 256),
    (256, 256),
    (256, 256),
    (256, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
]

VGG16_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision's features.N


def build_vgg16_layout(path: Path, scale: float = 1.0) -> int:
    """A torchvision-VGG16-named state dict (random values); ``scale`` shrinks the classifier width."""
    import torch

    torch.manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for index, (cin, cout) in zip(VGG16_CONV_INDICES, VGG16_CONVS, strict=True):
        sd[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3) * 0.05
        sd[f"features.{index}.bias"] = torch.randn(cout) * 0.05
    hidden = max(8, int(4096 * scale))
    sd["classifier.0.weight"] = torch.randn(hidden, 512 * 7 * 7) * 0.01
    sd["classifier.0.bias"] = torch.randn(hidden) * 0.01
    sd["classifier.3.weight"] = torch.randn(hidden, hidden) * 0.01
    sd["classifier.3.bias"] = torch.randn(hidden) * 0.01
    sd["classifier.6.weight"] = torch.randn(1000, hidden) * 0.01
    sd["classifier.6.bias"] = torch.randn(1000) * 0.01
    torch.save(sd, path)
    return path.stat().st_size


def measure(command: list[str]) -> dict[str, float]:
    """Wall seconds, peak RSS (VmHWM) and peak anonymous RSS (sampled) of one command, in MB.

    Dirty pages left by the previous command are flushed first (``sync``), so that no command pays
    for another's write-back.
    """
    os.sync()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_hwm = 0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]))
                elif line.startswith("VmHWM:"):
                    peak_hwm = max(peak_hwm, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.005)
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {stderr.decode()[-500:]}")
    return {"wall": wall, "anon_mb": peak_anon / 1024, "hwm_mb": peak_hwm / 1024}


def best(command: list[str], repeat: int) -> dict[str, float]:
    runs = [measure(command) for _ in range(repeat)]
    return min(runs, key=lambda r: r["wall"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[0.5, 1.0], help="classifier width scales (1.0 = VGG16's 4096)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs per command; the fastest is shown")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the files (default: a temp dir)")
    args = parser.parse_args(argv)

    fc2conv = shutil.which("fc2conv") or sys.exit("fc2conv is not installed (pip install -e .)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fc2conv-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    hand = workdir / "hand_script.py"
    hand.write_text(HAND_SCRIPT)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; best of {args.repeat} runs")
    rows = []
    for scale in args.sizes:
        source = workdir / f"vgg16_x{scale:g}.pt"
        size = build_vgg16_layout(source, scale)
        out = workdir / "out.safetensors"
        commands = {
            "fc2conv convert": [
                fc2conv,
                "convert",
                str(source),
                "--input-shape",
                "512x7x7",
                "-o",
                str(out),
                "--force",
                "--json",
            ],
            "hand script": [sys.executable, str(hand), str(source), str(workdir / "hand.safetensors")],
            "hand + fsync": [sys.executable, str(hand), str(source), str(workdir / "hand.safetensors"), "--fsync"],
            "cp": ["cp", str(source), str(workdir / "copy.pt")],
        }
        for command in commands.values():  # warm the page cache once for everyone
            measure(command)
        results = {name: best(command, args.repeat) for name, command in commands.items()}
        rows.append((scale, size, results))
        for extra in (out, workdir / "hand.safetensors", workdir / "copy.pt"):
            extra.unlink(missing_ok=True)
        source.unlink()

    startup = _startup_figures(workdir, fc2conv)
    check_seconds = _check_figure(workdir)

    print(f"{'checkpoint':>12} {'command':<16} {'wall s':>8} {'peak RSS MB':>12} {'peak anon MB':>13}")
    for _scale, size, results in rows:
        for name, r in results.items():
            print(f"{size / 2**20:>9.0f} MB {name:<16} {r['wall']:>8.2f} {r['hwm_mb']:>12.0f} {r['anon_mb']:>13.0f}")
    print()
    for _scale, size, results in rows:
        f, h, c = results["fc2conv convert"], results["hand script"], results["cp"]
        hs = results["hand + fsync"]
        print(
            f"{size / 2**20:.0f} MB: fc2conv/hand-script wall = {f['wall'] / h['wall']:.2f}x (target <= 1.0; "
            f"{f['wall'] / hs['wall']:.2f}x against the hand script with fsync), "
            f"fc2conv/cp wall = {f['wall'] / c['wall']:.2f}x (target <= 2), "
            f"anon memory fc2conv - hand = {f['anon_mb'] - h['anon_mb']:+.0f} MB (target <= +100)"
        )
    print()
    for label, seconds in startup.items():
        print(f"{label:<46} {seconds:6.3f} s (target < 0.3 s, no torch import)")
    print(f"{'numeric check of one 4096 x 25088 fp32 layer':<46} {check_seconds:6.3f} s (target < 1 s)")
    return 0


def _startup_figures(workdir: Path, fc2conv: str) -> dict[str, float]:
    """`fc2conv --help`, and `inspect` on a 2 MB and a 2 GB safetensors file (sparse: header + holes)."""
    import json
    import struct

    figures = {}
    for label, nbytes in (("2 MB", 2 * 2**20), ("2 GB", 2 * 2**30)):
        rows = nbytes // (4 * 4096)
        header = json.dumps(
            {
                "fc.weight": {"dtype": "F32", "shape": [rows, 4096], "data_offsets": [0, rows * 4096 * 4]},
                "conv.weight": {
                    "dtype": "F32",
                    "shape": [1, 1, 1, 1],
                    "data_offsets": [rows * 4096 * 4, rows * 4096 * 4 + 4],
                },
            }
        ).encode()
        path = workdir / f"inspect_{label.replace(' ', '')}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + rows * 4096 * 4 + 4)  # a sparse file: no data on disk
        figures[f"fc2conv inspect ({label} safetensors)"] = best([fc2conv, "inspect", str(path), "--json"], 3)["wall"]
        path.unlink()
    figures["fc2conv --help"] = best([fc2conv, "--help"], 3)["wall"]
    probe = (
        "import sys\nfrom fc2conv.cli import main\nsys.argv = ['fc2conv', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, stdout=subprocess.DEVNULL)
    return figures


def _check_figure(workdir: Path) -> float:
    """Seconds of fc2conv's numeric check of a VGG16 fc6-sized layer (fp32, memory-mapped), best of 3."""
    code = """
import sys, time, torch
from fc2conv import InputShape, LayerChange, check_layer
torch.manual_seed(0)
weight = torch.randn(4096, 25088) * 0.01
bias = torch.randn(4096)
change = LayerChange("fc6", "fc6.weight", "fc6.bias", "float32", (4096, 25088), InputShape(512, 7, 7), "chw")
kernel = weight.reshape(4096, 512, 7, 7)
check_layer(change, weight, kernel, bias)
times = []
for _ in range(3):
    started = time.perf_counter()
    result = check_layer(change, weight, kernel, bias)
    times.append(time.perf_counter() - started)
assert result.ok, result
print(min(times))
"""
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
