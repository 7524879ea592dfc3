"""atomic_write and staging_folder: killed writers' temporaries are cleared, live ones kept, the umask respected."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from searchr3_env.atomic import atomic_write, remove_stale_temporaries, staging_folder

REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20

# Writes the 50 MB target once, then stops half-way through the next write and waits to be killed.
_WRITER = r"""
import sys
from searchr3_env.atomic import atomic_write

chunk = b"x" * (1 << 20)
for attempt in range(2):
    with atomic_write(sys.argv[1]) as f:
        for i in range(50):
            f.write(chunk)
            if attempt == 1 and i == 24:
                f.flush()
                print("half", flush=True)
                sys.stdin.readline()
"""


def temporaries(target: Path) -> list[Path]:
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "data.bin"
    signals = [signal.SIGKILL, signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        for _ in signals
    ]
    try:
        for writer in writers:
            assert writer.stdout.readline() == "half\n"
        # all four write the same target at once: none removed another's temporary under its feet
        assert all(writer.poll() is None for writer in writers)
        for writer, sig in zip(writers, signals):
            writer.send_signal(sig)
            assert writer.wait(timeout=10) == -sig
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    left = temporaries(target)
    assert len(left) == len(writers), left  # a killed save leaves its temporary, SIGTERM as much as SIGKILL
    assert all(p.stat().st_size >= 25 * MB for p in left)
    assert target.stat().st_size == 50 * MB

    with atomic_write(target) as f:
        f.write(b"new")
    assert temporaries(target) == []
    assert target.read_bytes() == b"new"
    assert {int(p.name.split(".")[-3]) for p in left} == {w.pid for w in writers}  # the names said whose they were


def test_temporaries_that_may_still_be_written_are_left_alone(tmp_path):
    target = tmp_path / "data.bin"
    host, dead = socket.gethostname(), dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [
            f".data.bin.{host}.{os.getpid()}.0123abcd.tmp",  # this process
            f".data.bin.{host}.{sleeper.pid}.0123abcd.tmp",  # a live child
            f".data.bin.elsewhere.{dead}.0123abcd.tmp",  # another host's: its pids are not ours to check
            ".data.bin.k3j_x9qa.tmp",  # a name it cannot parse (tempfile's, from before)
            f".data.bin.old.{host}.{dead}.0123abcd.tmp",  # another target's (data.bin.old)
        ]
        stale = [f".data.bin.{host}.{dead}.0123abcd.tmp", f".data.bin.{host}.{dead}.89abcdef.tmp"]
        for name in keep + stale[:1]:
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / stale[1]).mkdir()  # a staging folder
        (tmp_path / stale[1] / "weights").write_bytes(b"partial")
        with atomic_write(target) as f:
            f.write(b"new")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["data.bin"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remove_stale_temporaries_is_what_a_load_calls(tmp_path):
    target, host, dead = tmp_path / "model", socket.gethostname(), dead_pid()
    stale = tmp_path / f".model.{host}.{dead}.0123abcd.tmp"
    stale.mkdir()
    assert remove_stale_temporaries(target) == [stale]
    assert remove_stale_temporaries(target) == []
    assert remove_stale_temporaries(tmp_path / "no-folder" / "model") == []


def test_staging_folder_is_renamed_into_place_or_removed(tmp_path):
    target = tmp_path / "model"
    (tmp_path / f".model.{socket.gethostname()}.{dead_pid()}.0123abcd.tmp").mkdir()  # a killed copy's
    with staging_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir() and not any(tmp.iterdir())
        (tmp / "config.json").write_text("{}")
        os.rename(tmp, target)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (target / "config.json").read_text() == "{}"
    with pytest.raises(RuntimeError), staging_folder(tmp_path / "other") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("failed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("new")
        raise RuntimeError("failed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["run.txt"]
    assert target.read_text() == "old"


@pytest.mark.parametrize("umask,file_mode,folder_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_and_folders_get_the_umask_not_private_modes(tmp_path, umask, file_mode, folder_mode):
    before = os.umask(umask)
    try:
        with atomic_write(tmp_path / "new-folder" / "index") as f:
            f.write(b"x")
        with staging_folder(tmp_path / "checkpoint") as tmp:
            os.rename(tmp, tmp_path / "checkpoint")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "new-folder" / "index").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "new-folder").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "checkpoint").stat().st_mode) == folder_mode
