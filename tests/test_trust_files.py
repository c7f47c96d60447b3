"""Nothing the user owns is deleted; files are whole, with the umask's permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fxprune.cli import main
from fxprune.files import (
    OutputError,
    ResultFolder,
    remove_stale_temps,
    temp_dir_beside,
    write_bytes_atomic,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_written_file_gets_the_permissions_the_umask_gives(tmp_path, factory, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert main(["prune", factory, "--out", str(out)]) == 0
        assert (
            main(["export", str(out), "--original", factory, "--out", str(tmp_path / "m.onnx")])
            == 0
        )
    finally:
        os.umask(old)
    assert _mode(out) == 0o777 & ~umask
    for f in [*out.iterdir(), tmp_path / "m.onnx"]:
        assert _mode(f) == 0o666 & ~umask, f.name


def test_a_symlink_planted_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    link = tmp_path / "report.txt"
    link.symlink_to(victim)
    write_bytes_atomic(link, b"new report")
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text() == "new report"


def test_temp_names_are_unpredictable_and_exclusive(tmp_path):
    names = set()
    for _ in range(2):
        with temp_dir_beside(tmp_path / "x.onnx") as d:
            names.add(d.name)
            assert str(os.getpid()) in d.name and _mode(d) == 0o700
    assert len(names) == 2
    assert list(tmp_path.iterdir()) == []


def test_force_never_deletes_a_user_file(tmp_path, factory, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["prune", factory, "--out", str(out), "--force"]) == 2
    assert "fxprune did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    # a user file added to an earlier result is protected the same way
    out2 = tmp_path / "out2"
    assert main(["prune", factory, "--out", str(out2)]) == 0
    (out2 / "finetune.log").write_text("mine")
    assert main(["prune", factory, "--out", str(out2), "--force"]) == 2
    assert (out2 / "finetune.log").read_text() == "mine"


def test_out_dot_never_empties_the_working_folder(tmp_path, factory, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("1,2")
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        assert main(["prune", factory, "--out", out, "--force"]) == 2
        assert "the folder you are working in" in capsys.readouterr().err
    assert (tmp_path / "data.csv").read_text() == "1,2"


def test_demo_refuses_a_folder_with_user_files_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.me").write_text("x")
    assert main(["demo", "--out", str(out)]) == 2
    assert "fxprune did not write (keep.me)" in capsys.readouterr().err
    assert (out / "keep.me").exists()


def test_force_replaces_an_earlier_result_whole(tmp_path, factory):
    out = tmp_path / "out"
    assert main(["prune", factory, "--out", str(out), "--ratio", "0.25"]) == 0
    first = (out / "plan.json").read_text()
    assert main(["prune", factory, "--out", str(out), "--ratio", "0.5", "--force"]) == 0
    assert (out / "plan.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny_model.py"]


def test_a_second_writer_to_the_same_folder_fails_clearly(tmp_path, factory):
    out = tmp_path / "out"
    with ResultFolder(out) as rf:
        (rf.path / "a").write_text("first writer")
        proc = subprocess.run(
            [sys.executable, "-m", "fxprune.cli", "prune", factory, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2
        assert "another fxprune run is writing there" in proc.stderr
        rf.commit()
    assert (out / "a").read_text() == "first writer"
    with ResultFolder(tmp_path / "o2") as a, pytest.raises(OutputError, match="another fxprune"):
        ResultFolder(tmp_path / "o2").__enter__()
    assert a.path is not None


def test_temp_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_dir = tmp_path / f".m.onnx.fxprune-tmp-{dead.pid}-abc123"
    stale_dir.mkdir()
    (stale_dir / "m.onnx").write_bytes(b"x" * 1000)
    stale_file = tmp_path / f".m.onnx.fxprune-tmp-{dead.pid}-def456.x"
    stale_file.write_bytes(b"partial")
    alive = tmp_path / f".m.onnx.fxprune-tmp-{os.getpid()}-live00"
    alive.mkdir()
    removed = remove_stale_temps(tmp_path / "m.onnx")
    assert sorted(removed) == sorted([stale_dir, stale_file])
    assert alive.exists()  # a running writer's temp folder is left alone


def test_an_interrupted_swap_is_rolled_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    backup = tmp_path / f".out.fxprune-old-{dead.pid}-abc123"
    backup.mkdir()
    (backup / "plan.json").write_text("{}")
    remove_stale_temps(tmp_path / "out")
    assert (tmp_path / "out" / "plan.json").exists() and not backup.exists()


def test_output_errors_come_before_the_model_is_loaded(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    never = "torchvision:resnet152"  # would take seconds to build
    assert main(["prune", never, "--out", str(a_file)]) == 2
    assert "a file with that name exists" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert main(["prune", never, "--out", str(ro / "out")]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_a_lock_file_left_by_a_killed_writer_is_removed_but_a_held_one_is_not(tmp_path):
    stale = tmp_path / ".out.fxprune-lock"
    stale.write_text("12345\n")  # what a SIGKILLed writer leaves: the kernel freed its flock
    assert remove_stale_temps(tmp_path / "out") == [stale] and not stale.exists()
    with ResultFolder(tmp_path / "out") as rf:  # holds the lock while it writes
        assert remove_stale_temps(tmp_path / "out") == []
        assert (tmp_path / ".out.fxprune-lock").exists()
        rf.commit()
    assert not (tmp_path / ".out.fxprune-lock").exists()
