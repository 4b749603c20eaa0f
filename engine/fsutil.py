"""Small file helpers: where a file may be written, atomic writes, hashing, outputs that
must not be inputs.

Every file the program writes goes through ``atomic_path``: it writes a temporary file
beside the target and renames it onto the target only when complete. A symlink is written
through (its target is replaced, the link stays); a target that exists and is not a
regular file (a device, a FIFO, a directory) is refused, never replaced; an OSError
(a full disk, a read-only filesystem) becomes one clear ``OutputError``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import InputError


class OutputError(InputError):
    """A file could not be written where it was asked for (an InputError: the path is the user's)."""


def write_target(path: str | os.PathLike, label: str = "output") -> Path:
    """The file that writing ``path`` will replace: ``path`` itself, or a symlink's target.
    Refuses, before any work, a target that is not a regular file, a parent that is not a
    directory, and a directory this process cannot create files in (tried, not guessed:
    permissions do not stop root, a read-only filesystem does)."""
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    if target.exists() and not target.is_file():
        kind = "a directory" if target.is_dir() else "not a regular file (a device, FIFO or socket)"
        raise OutputError(f"{label} path {path} is {kind}; name a file to write")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"{label} directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{label} directory {parent} is not a directory")
    try:
        _probe(parent)
    except OSError as e:
        raise OutputError(f"{label} directory {parent} is not writable ({e.strerror or e})") from None
    return target


def output_dir(path: str | os.PathLike, label: str = "--out") -> Path:
    """A directory to write files into, made (its parent must exist) and proven writable
    before any work: the directory counterpart of ``write_target``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{label} {path} exists and is not a directory")
    if not path.parent.is_dir():
        raise OutputError(f"{label} {path}: the directory {path.parent} does not exist")
    try:
        path.mkdir(exist_ok=True)
        _probe(path)
    except OSError as e:
        raise OutputError(f"{label} {path}: cannot write there ({e.strerror or e})") from None
    return path


def _probe(directory: Path) -> None:
    """Create and remove a file in ``directory`` (OSError where none can be written):
    tried, not guessed, because permissions do not stop root and a read-only filesystem does."""
    fd, probe = tempfile.mkstemp(prefix=".nst-probe-", dir=directory)
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, label: str = "output") -> Iterator[Path]:
    """Yield a temporary path beside ``path``'s target; rename it onto the target on success.

    The temporary name starts with a dot and ends in ``.partial`` so that an interrupted
    write never leaves a file under the final name, and never one that looks finished.
    ``suffix`` is kept before ``.partial`` for writers that look at the extension.
    """
    target = Path(path)
    target = target.resolve() if target.is_symlink() else target
    if target.exists() and not target.is_file():
        raise OutputError(f"{label} path {path} is not a regular file; it was not replaced")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=(suffix or "") + ".partial", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        # mkstemp creates 0600 files; give the result the usual permissions (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        yield tmp_path
        os.replace(tmp_path, target)
    except OSError as e:
        why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(f"cannot write {path}: {why}") from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _identity(path: str | os.PathLike) -> tuple[str, tuple[int, int] | None]:
    """(the real path, (device, inode) of an existing file or None): two names of one file
    agree in the first (links, '..', symlinks) or, for hard links, in the second."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return real, None
    return real, (st.st_dev, st.st_ino)


def check_distinct(inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
                   patterns: list[tuple[str, str, re.Pattern]] = ()) -> None:
    """Refuse, before any work, an output that is an input or another output: the same
    path, or the same file through a symlink or a hard link. ``inputs`` and ``outputs`` are
    (label, path) pairs; ``patterns`` are (label, directory, regex of file names) for
    numbered outputs (``--save-every``'s files): the files of that directory that match are
    outputs too (one may be an input, or a link to one)."""
    for label, directory, names in patterns:
        for other_label, other in outputs:
            if os.path.realpath(os.path.dirname(os.path.abspath(other))) == os.path.realpath(directory) \
                    and names.fullmatch(os.path.basename(other)):
                raise OutputError(f"{label} would write {other}, which is the {other_label}: name another file")
    outputs = list(outputs)
    for label, directory, names in patterns:
        with contextlib.suppress(OSError):
            outputs += [(label, os.path.join(directory, n)) for n in sorted(os.listdir(directory))
                        if names.fullmatch(n)]
    ins = [(label, path, _identity(path)) for label, path in inputs]
    seen: list[tuple[str, str, tuple]] = []
    for label, path in outputs:
        ident = _identity(path)
        for k, (other_label, other, other_ident) in enumerate(ins + seen):
            if ident[0] == other_ident[0] or (ident[1] is not None and ident[1] == other_ident[1]):
                how = "" if os.path.abspath(path) == os.path.abspath(other) else " (the same file under another name)"
                role = "an input" if k < len(ins) else "another output"
                raise OutputError(f"{label} {path} is the {other_label} {other}{how}: an output must not replace "
                                  f"{role}; name another file")
        seen.append((label, path, ident))
