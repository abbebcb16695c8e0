"""e3va.atomic's small writers and its inter-process lock (the atomic checkpoint writes are tested, with a
process killed mid-save, in test_robustness.py)."""
import json
import subprocess
import sys
import time

import pytest

from e3va.atomic import atomic_write_bytes, atomic_write_json, file_lock

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
