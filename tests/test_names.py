"""Names from files are shown escaped (one line each), and layer patterns are matched in linear time."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import save_file

from fc2conv.errors import PlanError
from fc2conv.formats.base import natural_key
from fc2conv.names import compile_pattern, printable
from tests.conftest import run, run_capped, st_bytes, st_entry


@pytest.mark.parametrize(
    "name, shown",
    [
        ("fc1.weight", "fc1.weight"),
        ("couche.poids.é.层", "couche.poids.é.层"),  # letters of any script are kept
        ("x\nverdict: PASS\n", "x\\nverdict: PASS\\n"),
        ("\x1b[2Jclear", "\\x1b[2Jclear"),
        ("fc\ud800.weight", "fc\\ud800.weight"),  # a lone surrogate no terminal encoding accepts
        ("abc\u202edef", "abc\\u202edef"),  # a right-to-left override
        ("a\u2028b\x85c", "a\\u2028b\\x85c"),  # a line separator and NEL
    ],
)
def test_printable_escapes_what_would_break_or_forge_a_line(name, shown):
    assert printable(name) == shown
    assert printable(name).isprintable()


def test_pattern_errors_are_plan_errors_with_the_reason():
    for bad, reason in [("((", "missing )"), ("(?=x)", "invalid perl operator"), (r"(a)\1", "invalid escape")]:
        with pytest.raises(PlanError, match="not a valid regular expression") as info:
            compile_pattern(bad)
        assert reason in str(info.value) and "\n" not in str(info.value)


def test_pattern_search_is_re_search_on_names():
    pattern = compile_pattern(r"^classifier\.\d+$|proj")
    assert pattern.search("classifier.3") and pattern.search("layer.0.attn.q_proj")
    assert not pattern.search("features.0") and not pattern.search("classifier.3.x")
    assert compile_pattern("fc").search("fc\ud800") is not None  # a lone surrogate does not break matching


@pytest.mark.slow
def test_a_backtracking_pattern_cannot_hang_on_a_hostile_name(tmp_path):
    """``^(\\w+)*fc$`` on 33 word characters and a '!' backtracks for minutes in Python's re (2^33 ways)."""
    save_file({"a" * 33 + "!.weight": __import__("torch").zeros(2, 2)}, str(tmp_path / "r.safetensors"))
    started = time.monotonic()
    done = run_capped("convert", tmp_path / "r.safetensors", "--pointwise", "--layers", r"^(\w+)*fc$", timeout=30)
    assert time.monotonic() - started < 30
    assert done.returncode == 2 and "no Linear layer whose name matches" in done.stderr


def test_natural_key_orders_numbers_of_any_length():
    names = ["l.10", "l.9", "l.0010x", "l." + "9" * 5000, "l.2"]
    assert sorted(names, key=natural_key) == ["l.2", "l.9", "l.10", "l.0010x", "l." + "9" * 5000]


def _hostile_listing(tmp_path):
    names = ["fc1.weight", "x\nverdict: PASS\n", "fc\ud800.weight", "\x1b[31mred"]
    header = {name: st_entry(offsets=(8 * i, 8 * i + 8)) for i, name in enumerate(names)}
    path = tmp_path / "names.safetensors"
    # json.dumps writes a lone surrogate as its \ud800 escape, which JSON readers (and safetensors') accept
    path.write_bytes(st_bytes(header, b"\0" * 8 * len(names)))
    return path, names


def test_tables_show_names_escaped_on_their_own_line(tmp_path):
    path, _ = _hostile_listing(tmp_path)
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert not [line for line in lines if line.strip().startswith("verdict")]  # nothing forged
    assert "x\\nverdict: PASS\\n" in result.stdout and "fc\\ud800" in result.stdout
    assert "\x1b" not in result.stdout and "\\x1b[31mred" in result.stdout


def test_json_holds_names_exactly_as_json_escapes(tmp_path):
    path, names = _hostile_listing(tmp_path)
    result = run("inspect", path, "--json")
    assert result.exit_code == 0 and result.stdout.isascii()
    assert len(result.stdout.strip().splitlines()) == len(result.stdout.strip().split("\n"))
    listed = [t["name"] for layer in json.loads(result.stdout)["layers"] for t in layer["tensors"]]
    assert sorted(listed) == sorted(names)  # nothing lost: the JSON reader gets the names back as they are
