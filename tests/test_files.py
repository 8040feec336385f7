"""fenop._files: atomic writes, what a killed writer leaves, and the exclusive lock."""

import os
import subprocess
import sys

import pytest

from fenop._errors import InputError
from fenop._files import Locked, exclusive, recover, replacing


def _dead_pid() -> int:
    """The ID of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "out.h5"
    target.write_text("before")
    with pytest.raises(RuntimeError), replacing(target) as staging:
        staging.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
    with replacing(target) as staging:
        staging.write_text("after")
    assert target.read_text() == "after"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


def test_what_a_killed_writer_left_goes_with_the_next_write(tmp_path):
    target = tmp_path / "out.h5"
    dead, alive = _dead_pid(), os.getppid()  # the parent runs while this test does
    left = [
        tmp_path / f".out.h5.{dead}.abc123.partial",  # a killed writer's file
        tmp_path / f".out.h5.{dead}.xyz789.partial",
    ]
    (tmp_path / f".out.h5.{dead}.folder.partial").mkdir()  # and folder
    for path in left:
        path.write_text("half")
    running = tmp_path / f".out.h5.{alive}.def456.partial"  # another writer, still at it
    running.write_text("half")
    other = tmp_path / f".other.h5.{dead}.abc123.partial"  # another target's: not ours
    other.write_text("half")
    with replacing(target) as staging:
        staging.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.h5", running.name, other.name]
    )


def test_a_folder_moved_aside_by_a_killed_writer_comes_back(tmp_path):
    target = tmp_path / "last"
    aside = tmp_path / ".last.old"  # killed between moving it aside and renaming the new in
    aside.mkdir()
    (aside / "model.safetensors").write_text("weights")
    recover(target)
    assert (target / "model.safetensors").read_text() == "weights" and not aside.exists()
    aside.mkdir()  # killed after the new one was renamed in: the old one goes
    recover(target)
    assert not aside.exists() and (target / "model.safetensors").is_file()


def test_a_folder_or_a_missing_folder_is_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="is a folder"), replacing(tmp_path):
        pass
    with pytest.raises(InputError, match=r"folder .*none does not exist"):
        with replacing(tmp_path / "none" / "x.h5"):
            pass


def test_the_lock_is_exclusive_names_its_holder_and_goes_with_it(tmp_path):
    path = tmp_path / ".d.h5.lock"
    with exclusive(path, holder="process 12") as held:
        assert held and path.read_text() == "process 12"
        with pytest.raises(Locked, match="process 12"), exclusive(path, holder="process 13"):
            pass
    assert not path.exists()  # removed on release
    path.write_text("process 99")  # left by a killed holder: taken over, then removed
    with exclusive(path, holder="process 14"):
        assert path.read_text() == "process 14"
    assert not path.exists()


def test_the_lock_is_held_by_a_process_until_it_ends(tmp_path):
    path = tmp_path / ".d.h5.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from fenop._files import exclusive\n"
            f"with exclusive({str(path)!r}, holder='process A'):\n"
            "    print('held', flush=True); sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Locked, match="process A"), exclusive(path, holder="process B"):
            pass
    finally:
        holder.kill()  # as SIGKILL: the file stays, the lock does not
        holder.communicate()
    with exclusive(path, holder="process B"):
        assert path.read_text() == "process B"
    assert not path.exists()
