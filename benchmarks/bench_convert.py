"""Time and memory of `fc2conv convert` and `verify`, side by side with copying the same bytes (the floor).

    python benchmarks/bench_convert.py                  # VGG16 layout (528 MB fp32 .pt) + a half-size one,
                                                        # and the LLM-like sharded checkpoint (1.3 GB bf16)
    python benchmarks/bench_convert.py --repeat 5       # rounds per command (interleaved); best and spread
    python benchmarks/bench_convert.py --only vgg       # or: llm

Every command runs in its own process, after a `sync` (so that none pays for another's write-back),
on the same files in the page cache, writing a new output (the previous one is deleted first). The
rounds are interleaved (each round runs every command once), so that a busy machine slows all of them
alike. Commands:

  VGG16 layout (13 convs, classifier 25088 -> 4096 -> 4096 -> 1000; fc6 alone is 411 MB in fp32):
  * cp + fsync (the floor): `cp vgg.pt copy.pt && sync copy.pt`
  * fc2conv convert: `fc2conv convert vgg.pt --input-shape 512x7x7 -o out.safetensors --json`
    (every byte of the written file compared with the input, numeric check of every layer)
  * hand script + fsync: torch.load(mmap=True, weights_only=True), reshape, safetensors.torch.save_file,
    fsync (no check at all)
  * fc2conv verify: `fc2conv verify vgg.pt out.safetensors --json` (every byte compared, numeric checks)
  * hand verify: torch.load(mmap=True) + safe_open + torch.equal on every tensor (no numeric check)
  LLM-like sharded checkpoint (a 12-layer Llama layout, hidden 2048, bf16, 3 shards and an index):
  * cp -r + sync (the floor): `cp -r in out && sync`
  * fc2conv convert --pointwise --layers proj (84 projections become 1x1 kernels)

Wall time is measured around each process, with nothing else running; peak memory is read from
/proc/<pid>/status in a first round, which is not timed (VmHWM, and the peak of RssAnon sampled every
5 ms: anonymous memory, not the mapped files; the sampling takes CPU beside the command). Three last
in-process runs (the fastest is shown) split fc2conv's time into import (torch, on its background
thread, when a layer needs it), read, write, fsync, the byte comparison, the numeric checks (numpy
from the files' bytes, or torch), the evidence, and say whether torch was imported at all. Then the
start-up figures: `fc2conv --help`, `inspect` of a 2 MB and a 2 GB safetensors file and of the VGG
.pt, none of which may import torch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAND_CONVERT = r"""
import os, sys, torch
from safetensors.torch import save_file
src, dst = sys.argv[1], sys.argv[2]
sd = torch.load(src, mmap=True, weights_only=True, map_location="cpu")
sd["classifier.0.weight"] = sd["classifier.0.weight"].reshape(-1, 512, 7, 7)
sd["classifier.3.weight"] = sd["classifier.3.weight"][:, :, None, None]
sd["classifier.6.weight"] = sd["classifier.6.weight"][:, :, None, None]
save_file({k: v.contiguous() for k, v in sd.items()}, dst)
fd = os.open(dst, os.O_RDONLY)  # the same durability as fc2conv, which fsyncs before it renames
os.fsync(fd)
os.close(fd)
"""

HAND_VERIFY = r"""
import sys, torch
from safetensors import safe_open
original = torch.load(sys.argv[1], mmap=True, weights_only=True, map_location="cpu")
with safe_open(sys.argv[2], framework="pt") as converted:
    for name, tensor in original.items():
        other = converted.get_tensor(name)
        assert torch.equal(tensor, other.reshape(tensor.shape)), name
"""

VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512)]
VGG16_CONVS += [(512, 512)] * 5
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


def build_llm_layout(folder: Path, layers: int = 12, hidden: int = 2048, inter: int = 5632, shards: int = 3) -> int:
    """A Llama-layout bf16 checkpoint in ``shards`` safetensors files plus an index; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(32000, hidden), "model.norm.weight": weight(hidden)}
    for i in range(layers):
        block = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            tensors[f"{block}self_attn.{name}_proj.weight"] = weight(hidden, hidden)
        tensors[f"{block}mlp.gate_proj.weight"] = weight(inter, hidden)
        tensors[f"{block}mlp.up_proj.weight"] = weight(inter, hidden)
        tensors[f"{block}mlp.down_proj.weight"] = weight(hidden, inter)
        tensors[f"{block}input_layernorm.weight"] = weight(hidden)
        tensors[f"{block}post_attention_layernorm.weight"] = weight(hidden)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        if size >= total / shards * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += tensor.numel() * tensor.element_size()
    weight_map = {}
    for k, names in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def measure(command: list[str], remove: Path | None = None, *, sample: bool = False) -> dict[str, float]:
    """Wall seconds of one command; with ``sample``, also its peak RSS (VmHWM) and peak anonymous RSS, in MB.

    The memory is sampled from /proc every 5 ms by this process, which takes CPU beside the command: the
    timed rounds do not sample.
    """
    if remove is not None:
        shutil.rmtree(remove) if remove.is_dir() else remove.unlink(missing_ok=True)
    os.sync()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_hwm = 0
    status = Path(f"/proc/{process.pid}/status")
    while sample and process.poll() is None:
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


def rounds(commands: dict[str, tuple[list[str], Path | None]], repeat: int) -> dict[str, dict[str, float]]:
    """Each command ``repeat`` times, interleaved, summed up; a first round (not timed) samples the memory."""
    memory = {name: measure(command, remove, sample=True) for name, (command, remove) in commands.items()}
    runs: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, (command, remove) in commands.items():
            runs[name].append(measure(command, remove)["wall"])
    return {name: summary(runs[name], memory[name]) for name in commands}


def summary(walls: list[float], memory: dict[str, float]) -> dict[str, float]:
    walls = sorted(walls)
    return {
        "best": walls[0], "median": statistics.median(walls), "worst": walls[-1],
        "anon_mb": memory["anon_mb"], "hwm_mb": memory["hwm_mb"],
    }  # fmt: skip


def vgg_commands(fc2conv: str, work: Path, source: Path) -> dict[str, tuple[list[str], Path | None]]:
    out, copy, hand = work / "out.safetensors", work / "copy.pt", work / "hand.safetensors"
    return {
        "cp + fsync": (["sh", "-c", f"cp '{source}' '{copy}' && sync '{copy}'"], copy),
        "fc2conv convert": (
            [fc2conv, "convert", str(source), "--input-shape", "512x7x7", "-o", str(out), "--json"],
            out,
        ),
        "hand script + fsync": ([sys.executable, str(work / "hand_convert.py"), str(source), str(hand)], hand),
        "fc2conv verify": ([fc2conv, "verify", str(source), str(out), "--json"], None),
        "hand verify": ([sys.executable, str(work / "hand_verify.py"), str(source), str(out)], None),
    }


def llm_commands(fc2conv: str, work: Path, source: Path) -> dict[str, tuple[list[str], Path | None]]:
    out, copy = work / "llm.conv", work / "llm.copy"
    convert = [fc2conv, "convert", str(source), "--pointwise", "--layers", "proj", "-o", str(out), "--json"]
    return {
        "cp -r + sync": (["sh", "-c", f"cp -r '{source}' '{copy}' && sync"], copy),
        "fc2conv convert --pointwise": (convert, out),
    }


def print_table(title: str, size: int, floor_name: str, results: dict[str, dict[str, float]]) -> None:
    floor = results[floor_name]["best"]
    print(f"\n{title} ({size / 1e6:.0f} MB); best / median / worst of the rounds, floor = {floor_name}")
    print(f"  {'command':<30} {'best s':>7} {'median':>7} {'worst':>7} {'floor s':>8} {'x floor':>8} "
          f"{'VmHWM MB':>9} {'anon MB':>8}")  # fmt: skip
    for name, r in results.items():
        print(
            f"  {name:<30} {r['best']:7.2f} {r['median']:7.2f} {r['worst']:7.2f} {floor:8.2f} "
            f"{r['best'] / floor:8.2f} {r['hwm_mb']:9.0f} {r['anon_mb']:8.0f}"
        )


def split(work: Path, argv: list[str], runs: int = 3) -> dict[str, float]:
    """fc2conv's time, in process: import (torch, background), read, write, fsync, check.

    The run with the smallest total of ``runs`` (a single run is as noisy as any round of the table).
    """
    probe = work / "split.py"
    probe.write_text(_SPLIT_PROBE)
    found = []
    for _ in range(runs):
        os.sync()
        done = subprocess.run([sys.executable, str(probe), *argv], check=True, capture_output=True, text=True)
        found.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return min(found, key=lambda figures: figures["total (in process, after Python's start)"])


_SPLIT_PROBE = r"""
import json, os, sys, time
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the fc2conv command runs (fc2conv.cli.main)
started = time.perf_counter()
spent = {"import torch (background)": 0.0, "read": 0.0, "write": 0.0, "fsync": 0.0, "check: bytes": 0.0,
         "check: numeric (numpy)": 0.0, "check: numeric (torch)": 0.0, "wait for torch": 0.0, "evidence": 0.0}
import threading
def timed(module, name, key, main_thread_only=False):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            if not main_thread_only or threading.current_thread() is threading.main_thread():
                spent[key] += time.perf_counter() - begin
    setattr(module, name, wrapper)
import fc2conv.preload as preload, fc2conv.check as check
timed(preload, "_import_torch", "import torch (background)")
timed(preload, "wait_for_torch", "wait for torch", main_thread_only=True)  # not the evidence's thread
check.wait_for_torch = preload.wait_for_torch  # imported by name there

import fc2conv.jobs.convert as convert, fc2conv.jobs.verify as verify, fc2conv.jobs.proofs as proofs
import fc2conv.array_check as array_check
for module in (convert, verify):
    timed(module, "open_source", "read")
    timed(module, "compare_spans", "check: bytes")
timed(array_check, "check_layer_arrays", "check: numeric (numpy)")
timed(proofs, "check_changes", "check: numeric (torch)")
timed(convert, "weigh_evidence", "evidence")  # on its own thread, while the bytes are copied
timed(verify, "_recorded_evidence", "evidence")
timed(convert, "write_safetensors", "write")
timed(convert, "fsync_file", "fsync")
command, args = sys.argv[1], sys.argv[2:]
if command == "convert":
    result = convert.convert_file(args[0], args[1], input_shape=args[2] if args[2] != "-" else None,
                                  pointwise=args[2] == "-", layers="proj" if args[2] == "-" else None,
                                  overwrite=True)
else:
    result = verify.verify_files(args[0], args[1])
assert result.ok
spent["check: numeric (torch)"] -= spent["wait for torch"]  # torch's check starts by waiting for torch
spent["total (in process, after Python's start)"] = time.perf_counter() - started
spent["torch imported (1 = yes)"] = float("torch" in sys.modules)
print(json.dumps(spent))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="counted rounds per command (interleaved)")
    parser.add_argument("--only", choices=["vgg", "llm"], default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the files (default: a temp dir)")
    args = parser.parse_args(argv)
    # Every command runs with its modules' bytecode cached, as an installed package has it (pip compiles
    # it at install); an environment that forbids writing bytecode would make fc2conv, an editable
    # install here, compile its sources on every run (about 0.09 s) while torch's come compiled.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    import fc2conv as package

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(package.__file__).parent)], check=True)

    fc2conv = shutil.which("fc2conv") or sys.exit("fc2conv is not installed (pip install -e .)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fc2conv-bench-"))
    try:
        _run(fc2conv, work, args.only, args.repeat)
    finally:
        if args.workdir is None:  # several GB of checkpoints and outputs: a temp dir goes, a given one stays
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _run(fc2conv: str, work: Path, only: str | None, repeat: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "hand_convert.py").write_text(HAND_CONVERT)
    (work / "hand_verify.py").write_text(HAND_VERIFY)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}")
    if only in (None, "vgg"):
        _bench_vgg(fc2conv, work, repeat)
    if only in (None, "llm"):
        _bench_llm(fc2conv, work, repeat)
    _startup(work, fc2conv)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


def _bench_vgg(fc2conv: str, work: Path, repeat: int) -> None:
    for scale in (1.0, 0.5):
        source = work / f"vgg16_x{scale:g}.pt"
        size = source.stat().st_size if source.exists() else build_vgg16_layout(source, scale)
        commands = vgg_commands(fc2conv, work, source)
        if scale != 1.0:  # the half size: only for memory, flat in model size
            commands = {
                k: v for k, v in commands.items() if k in ("cp + fsync", "fc2conv convert", "hand script + fsync")
            }
        results = rounds(commands, repeat if scale == 1.0 else 1)
        print_table(f"VGG16 layout x{scale:g}", size, "cp + fsync", results)
        if scale == 1.0:
            _vgg_ratios(results)
            out = work / "out.safetensors"
            print("  time split, in process:")
            for label, argv in (("convert", ["convert", str(source), str(out), "512x7x7"]),
                                ("verify", ["verify", str(source), str(out)])):  # fmt: skip
                figures = split(work, argv)
                print(f"    {label}: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))


def _vgg_ratios(results: dict[str, dict[str, float]]) -> None:
    f, hand, cp = results["fc2conv convert"], results["hand script + fsync"], results["cp + fsync"]
    v, hand_v = results["fc2conv verify"], results["hand verify"]
    print("  targets (best / best; median / median in brackets):")
    for label, a, b in (
        ("convert <= 1.0x hand script + fsync", f, hand),
        ("convert <= 1.5x cp + fsync", f, cp),
        ("verify <= 1.0x hand verify", v, hand_v),
    ):
        print(f"    {label:<37} {a['best'] / b['best']:.2f}x ({a['median'] / b['median']:.2f}x)")
    print(f"    anonymous memory <= hand + 100 MB:   {f['anon_mb'] - hand['anon_mb']:+.0f} MB (convert), "
          f"{v['anon_mb'] - hand_v['anon_mb']:+.0f} MB (verify)")  # fmt: skip


def _bench_llm(fc2conv: str, work: Path, repeat: int) -> None:
    source = work / "llm"
    size = sum(p.stat().st_size for p in source.glob("*")) if source.exists() else build_llm_layout(source)
    results = rounds(llm_commands(fc2conv, work, source), repeat)
    print_table("LLM-like sharded checkpoint, bf16, 3 shards", size, "cp -r + sync", results)
    f, cp = results["fc2conv convert --pointwise"], results["cp -r + sync"]
    print(f"  target convert <= 1.3x cp -r + sync: {f['best'] / cp['best']:.2f}x ({f['median'] / cp['median']:.2f}x)")
    figures = split(work, ["convert", str(source), str(work / "llm.conv"), "-"])
    print("  time split, in process: " + ", ".join(f"{k} {v:.2f} s" for k, v in figures.items()))
    shutil.rmtree(work / "llm.conv", ignore_errors=True)


def _startup(work: Path, fc2conv: str) -> None:
    """`fc2conv --help`, and `inspect` of safetensors (sparse: header + holes) and of the VGG .pt."""
    import struct

    figures = {}
    for label, nbytes in (("2 MB", 2 * 2**20), ("2 GB", 2 * 2**30)):
        rows = nbytes // (4 * 4096)
        end = rows * 4096 * 4
        header = json.dumps({
            "fc.weight": {"dtype": "F32", "shape": [rows, 4096], "data_offsets": [0, end]},
            "conv.weight": {"dtype": "F32", "shape": [1, 1, 1, 1], "data_offsets": [end, end + 4]},
        }).encode()  # fmt: skip
        path = work / f"inspect_{label.replace(' ', '')}.safetensors"
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + rows * 4096 * 4 + 4)  # a sparse file: no data on disk
        figures[f"fc2conv inspect ({label} safetensors)"] = _best_of([fc2conv, "inspect", str(path), "--json"])
        path.unlink()
    if (work / "vgg16_x1.pt").exists():
        figures["fc2conv inspect (VGG16 .pt, 528 MB)"] = _best_of(
            [fc2conv, "inspect", str(work / "vgg16_x1.pt"), "--json"]
        )
    figures["fc2conv --help"] = _best_of([fc2conv, "--help"])
    probe = (
        "import sys\nfrom fc2conv.cli import cli\n"  # cli.main, not main: its quick exit would skip the assert
        "try:\n    cli.main(['inspect', sys.argv[1], '--json'], prog_name='fc2conv')\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    if (work / "vgg16_x1.pt").exists():
        subprocess.run([sys.executable, "-c", probe, str(work / "vgg16_x1.pt")], check=True, stdout=subprocess.DEVNULL)
    print("\nstart-up (best of 5; target < 0.3 s, no torch import):")
    for label, seconds in figures.items():
        print(f"  {label:<42} {seconds:6.3f} s")


def _best_of(command: list[str], times: int = 5) -> float:
    return min(measure(command)["wall"] for _ in range(times))


if __name__ == "__main__":
    sys.exit(main())
