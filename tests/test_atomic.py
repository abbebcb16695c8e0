"""e3va.atomic's small writers and its inter-process lock (the atomic checkpoint writes are tested, with a
process killed mid-save, in test_robustness.py)."""
import json
import os
import subprocess
import sys
import time

import pytest

from e3va.atomic import _file_mode, atomic_write_bytes, atomic_write_json, file_lock

_HOLDER = """
import sys, time
from e3va.atomic import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_json_is_indented_with_a_final_newline_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "sub" / "r.json"  # the folder is created
    atomic_write_json({"a": [1, 2]}, path)
    atomic_write_json({"b": None}, path)
    assert path.read_text() == '{\n  "b": null\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json({"c": object()}, path)
    assert json.loads(path.read_text()) == {"b": None}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary left


@pytest.mark.parametrize("durable", [True, False])
def test_bytes_are_written_whole(tmp_path, durable):
    path = atomic_write_bytes(b"\x00\x01" * 1000, tmp_path / "b.bin", durable=durable)
    assert path.read_bytes() == b"\x00\x01" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["b.bin"]


@pytest.mark.slow
def test_file_lock_makes_a_second_process_wait(tmp_path):
    lock = tmp_path / ".x.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock), "2.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with file_lock(lock):
            waited = time.monotonic() - start
        assert waited > 1.0, f"took the lock after {waited:.2f} s while another process held it for 2 s"
    finally:
        holder.wait(timeout=60)
    assert lock.is_file()  # left in place, so later waiters lock the same file
    with file_lock(lock):  # and free again
        pass


def test_file_mode_is_what_open_would_give_and_leaves_the_umask_alone():
    # Files written through mkstemp would be 0600; checkpoints must be readable like any file open() makes.
    old = os.umask(0o022)
    try:
        assert _file_mode() == 0o644
        assert os.umask(0o022) == 0o022  # read back: _file_mode restored it
    finally:
        os.umask(old)


@pytest.mark.parametrize("durable, fsyncs", [(None, 2), (True, 2), (False, 0)])
def test_writes_fsync_the_file_and_its_folder_unless_told_not_to(tmp_path, monkeypatch, durable, fsyncs):
    # Durability is invisible unless the machine loses power; count the fsyncs instead (None: the default).
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    kwargs = {} if durable is None else {"durable": durable}
    atomic_write_bytes(b"x", tmp_path / "b.bin", **kwargs)
    assert len(calls) == fsyncs


def test_a_folder_that_cannot_be_opened_for_fsync_does_not_fail_the_write(tmp_path, monkeypatch):
    # Not every platform can open a directory; the directory fsync is best effort.
    real_open = os.open

    def open_files_only(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError("cannot open a directory here")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_files_only)
    assert atomic_write_bytes(b"x", tmp_path / "b.bin").read_bytes() == b"x"
