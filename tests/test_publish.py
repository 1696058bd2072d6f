"""Publishing: an output path holds its old content or the complete new file, never a half-written one."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file

from fc2conv import publish
from fc2conv.errors import OutputError
from fc2conv.publish import atomic_folder, atomic_output, published, save_safetensors

SD = OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.ones(2))


def test_atomic_output_keeps_existing_file_and_cleans_up_on_failure(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists") as info:
        with atomic_output(target):
            pass
    assert info.value.remedy == "overwrite"
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_atomic_output_refuses_inputs_and_bad_folders(tmp_path):
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    with pytest.raises(OutputError, match="refusing to write over the input"):
        with atomic_output(source, overwrite=True, protect=[source]):
            pass
    with pytest.raises(OutputError, match="does not exist"):
        with atomic_output(tmp_path / "missing" / "o.safetensors"):
            pass
    with pytest.raises(OutputError, match="is a directory"):
        with atomic_output(tmp_path):
            pass
    assert source.read_bytes() == b"x"


def test_save_safetensors_round_trip(tmp_path):
    path = tmp_path / "sd.safetensors"
    save_safetensors(dict(SD), path, {"format": "pt"})
    assert all(torch.equal(load_file(str(path))[k], v) for k, v in SD.items())
    with pytest.raises(OutputError):
        save_safetensors(dict(SD), path)


# --- no replacing without overwrite, even by a run started at the same moment --------------------


@pytest.mark.parametrize("named", [False, True])
def test_a_run_that_finishes_second_does_not_replace_the_first(tmp_path, named):
    target = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="already exists") as info:
        with atomic_output(target, named=named) as first:  # both find no output when they start
            first.write_bytes(b"first")
            with atomic_output(target, named=named) as second:
                second.write_bytes(b"second")
    assert info.value.remedy == "overwrite"
    assert target.read_bytes() == b"second" and os.listdir(tmp_path) == ["out.safetensors"]


def test_a_folder_that_appears_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="already exists"):
        with atomic_folder(target) as first:
            with first.file("a.safetensors") as path:
                path.write_bytes(b"first")
            with atomic_folder(target) as second:
                with second.file("a.safetensors") as path:
                    path.write_bytes(b"second")
    assert (target / "a.safetensors").read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(target) == ["a.safetensors"]


def test_an_empty_folder_is_taken_and_a_full_one_kept(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty") as output, output.file("a.safetensors") as path:
        path.write_bytes(b"a")
    assert os.listdir(tmp_path / "empty") == ["a.safetensors"]
    with pytest.raises(OutputError, match="already exists"), atomic_folder(tmp_path / "empty"):
        pass


def test_replacing_a_folder_keeps_the_users_files_and_refuses_to_delete_folders(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    for name in ("model-00001-of-00002.safetensors", "old-00009.safetensors", "model.safetensors.index.json"):
        (target / name).write_bytes(b"old")
    (target / "config.json").write_text("{}")
    with atomic_folder(target, overwrite=True) as output:
        for name in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
            with output.file(name) as path:
                path.write_bytes(b"new")
    kept = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    assert sorted(os.listdir(target)) == kept  # the old shard the new output has not is gone
    assert (target / "config.json").read_text() == "{}"
    assert (target / "model.safetensors.index.json").read_bytes() == b"new"
    (target / "model-00002-of-00002.safetensors").mkdir()
    with pytest.raises(OutputError, match="holds the folder 'model-00002-of-00002.safetensors'"):
        with atomic_folder(target, overwrite=True):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --- modes: one rule for every output ------------------------------------------------------------


@pytest.mark.parametrize("named", [False, True])  # named: how exports (.pt2, .onnx) are written
def test_the_output_keeps_the_stricter_of_the_inputs_and_the_replaced_outputs_mode(tmp_path, named):
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    source.chmod(0o600)
    with atomic_output(tmp_path / "a.out", protect=[source], named=named) as tmp:
        tmp.write_bytes(b"a")
    assert stat.S_IMODE((tmp_path / "a.out").stat().st_mode) == 0o600
    source.chmod(0o644)
    (tmp_path / "b.out").write_bytes(b"old")
    (tmp_path / "b.out").chmod(0o640)
    with atomic_output(tmp_path / "b.out", protect=[source], named=named, overwrite=True) as tmp:
        tmp.write_bytes(b"b")
    assert stat.S_IMODE((tmp_path / "b.out").stat().st_mode) == 0o640
    previous = os.umask(0o077)
    try:
        with atomic_output(tmp_path / "c.out", protect=[source], named=named) as tmp:
            tmp.write_bytes(b"c")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "c.out").stat().st_mode) == 0o600


def test_a_folder_output_takes_the_same_rule(tmp_path):
    source = tmp_path / "in"
    source.mkdir(mode=0o750)
    (source / "a.safetensors").write_bytes(b"x")
    (source / "a.safetensors").chmod(0o640)
    with atomic_folder(tmp_path / "out", protect=source, inputs=[source / "a.safetensors"]) as output:
        with output.file("a.safetensors") as path:
            path.write_bytes(b"a")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "out" / "a.safetensors").stat().st_mode) == 0o640


# --- what an output path may be ------------------------------------------------------------------


def test_a_link_to_a_file_is_followed_and_stays_a_link(tmp_path):
    (tmp_path / "real.out").write_bytes(b"old")
    (tmp_path / "link.out").symlink_to("real.out")
    with atomic_output(tmp_path / "link.out", overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "link.out").is_symlink() and (tmp_path / "real.out").read_bytes() == b"new"


def test_links_to_no_file_a_pipe_or_a_device_are_refused(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    read_end, write_end = os.pipe()
    try:
        (tmp_path / "to-pipe").symlink_to(f"/proc/self/fd/{write_end}")  # what /dev/stdout is when piped
        (tmp_path / "to-device").symlink_to("/dev/null")
        for name, message in [("dangling", "which does not exist"), ("to-pipe", "which does not exist"),
                              ("to-device", "is not a regular file")]:  # fmt: skip
            with pytest.raises(OutputError, match=message), atomic_output(tmp_path / name, overwrite=True):
                pass
            assert (tmp_path / name).is_symlink()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert sorted(os.listdir(tmp_path)) == ["dangling", "to-device", "to-pipe"]


def test_a_path_ending_in_a_slash_names_a_folder_not_a_file(tmp_path):
    with pytest.raises(OutputError, match="ends with '/'") as info:
        with atomic_output(f"{tmp_path}/newdir/"):
            pass
    assert info.value.remedy == "choose_output" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_255_byte_output_name_works(tmp_path, overwrite):
    target = tmp_path / ("n" * 243 + ".safetensors")
    assert len(target.name.encode()) == 255
    if overwrite:
        target.write_bytes(b"old")
    for named in (False, True):
        with atomic_output(target, overwrite=overwrite or named, named=named) as tmp:
            tmp.write_bytes(b"new")
        assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == [target.name]


def test_errors_while_writing_name_the_output_not_the_temporary_file(tmp_path):
    target = tmp_path / "out.safetensors"
    for named in (False, True):
        with pytest.raises(OutputError) as info, atomic_output(target, named=named) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        assert str(info.value) == f"{target}: write failed (No space left on device)"
        with pytest.raises(OutputError) as info, atomic_output(target, named=named) as tmp:
            raise OutputError(f"{tmp}: write failed (File too large)")
        assert str(info.value) == f"{target}: write failed (File too large)"
    assert os.listdir(tmp_path) == []


def test_leftovers_of_killed_runs_are_cleared_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".fc2conv-{pid}-0123abcd.tmp").write_bytes(b"left by SIGKILL")
    (tmp_path / f".fc2conv-{pid}-4567abcd.tmp").mkdir()
    (tmp_path / f".fc2conv-{pid}-4567abcd.tmp" / "model.safetensors").write_bytes(b"x")
    (tmp_path / f".fc2conv-{os.getpid()}-89abcdef.tmp").write_bytes(b"a live run's")
    (tmp_path / ".fc2conv-notes.txt").write_bytes(b"not ours")
    with atomic_output(tmp_path / "out.safetensors") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [f".fc2conv-{os.getpid()}-89abcdef.tmp", ".fc2conv-notes.txt", "out.safetensors"]
    )


def test_published_lists_what_was_put_in_place(tmp_path):
    before = published()
    with atomic_output(tmp_path / "a") as tmp:
        tmp.write_bytes(b"a")
    with atomic_folder(tmp_path / "b") as output, output.file("x.safetensors") as path:
        path.write_bytes(b"b")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "c"):
        raise RuntimeError("not published")
    assert published() == (*before, tmp_path / "a", tmp_path / "b")


def test_when_descriptors_run_out_the_finished_files_are_named_and_writing_goes_on(tmp_path, monkeypatch):
    real, calls = publish._try_anonymous, []

    def scarce(folder):
        calls.append(folder)
        if len(calls) == 3:  # the third file finds no descriptor left
            raise OSError(errno.EMFILE, "Too many open files")
        return real(folder)

    monkeypatch.setattr(publish, "_try_anonymous", scarce)
    with atomic_folder(tmp_path / "out") as output:
        for number in range(4):
            with output.file(f"{number}.safetensors") as path:
                path.write_bytes(b"%d" % number)
    written = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert written == {f"{n}.safetensors": b"%d" % n for n in range(4)}
    assert os.listdir(tmp_path) == ["out"]
