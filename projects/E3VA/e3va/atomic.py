"""Atomic file writes: a temporary file in the same directory, flushed to disk, then renamed over the target.

A process killed at any point leaves either the previous file or the new one, never a truncated one (the
rename is atomic on POSIX file systems within one directory). Every checkpoint, weight and JSON file the
project writes goes through here: :func:`atomic_torch_save`, :func:`atomic_write_json`,
:func:`atomic_write_text` and :func:`atomic_write_bytes` are the only writers; write nothing with a
temporary name and ``os.replace`` by hand.

:func:`file_lock` is the one inter-process lock, for files that several processes may want to generate
at once (the shapes data): ``filelock``'s ``FileLock``, which ``torch`` already depends on.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Union

import torch
from filelock import FileLock

__all__ = [
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_lock",
    "refuse_overwriting_inputs",
]

PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    # mkstemp creates 0600 files; give the permissions open() would (0666 less the umask). Read once, at
    # import: os.umask can only be read by setting it.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory, so best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *, durable: bool = True) -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path`` for writing; on a clean exit it is flushed, fsync'ed and
    renamed over ``path``, on an exception it is removed and ``path`` is left as it was.

    ``durable=False`` skips the fsyncs (the rename still hides partial files from readers): for many small
    files that can be regenerated, such as the shapes data's images, where one fsync each costs more than
    the file."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'wb' or 'w', not {mode!r}.")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the name of the file to write.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_directory(path.parent)


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see the module docstring); returns ``path``."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def atomic_write_text(text: str, path: PathLike) -> Path:
    """Writes ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(data: bytes, path: PathLike, *, durable: bool = True) -> Path:
    """Writes ``data`` to ``path`` atomically; ``durable=False`` skips the fsyncs (see :func:`atomic_open`).
    Returns ``path``."""
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_json(obj: Any, path: PathLike) -> Path:
    """Writes ``obj`` to ``path`` as JSON indented by two spaces, with a final newline, atomically (a
    reader, or a run killed mid-write, never sees half a file); creates the folder. Returns ``path``."""
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


@contextlib.contextmanager
def file_lock(lock_path: PathLike) -> Iterator[None]:
    """Holds an exclusive inter-process lock on ``lock_path`` (created if missing, left in place after)
    for the ``with`` block; blocks until it is free. Several processes (DDP ranks, a data loader and an
    evaluator) may generate the same files at once: the second waits, then finds them made."""
    with FileLock(os.fspath(lock_path)):
        yield


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)  # also catches links and different spellings of one path
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwriting_inputs(output: PathLike, **inputs: PathLike) -> None:
    """Raises ``ValueError`` when ``output`` is the same file as one of the named ``inputs`` (empty
    ones are skipped): a tool must never replace what it reads."""
    for name, path in inputs.items():
        if path and _same_file(output, path):
            raise ValueError(
                f"The output {output} is the input given as {name} ({path}); writing it would replace that "
                "file. Choose another output path."
            )
