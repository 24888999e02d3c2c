"""Atomic, non-clobbering file writes: nothing half-written, nothing overwritten by surprise.

Every output is written to a hidden sibling named ``.NAME.concept-edit-tmp-<pid>-<rand>`` and
renamed onto ``NAME`` in one step. A folder replaced with ``overwrite`` is swapped in atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old folder is first renamed to
``.NAME.concept-edit-old-<pid>-<rand>``), so at every instant ``NAME`` is the complete old or the
complete new output. Siblings left by killed runs are recognised by that name and removed (or, a
backup whose target is missing, restored) on the next write into the same folder.
"""
from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

TAG = "concept-edit"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\." + TAG + r"-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


class OutputExistsError(FileExistsError):
    pass


class OutputPathError(ValueError):
    """An output path that cannot be written (wrong kind, not writable, overlaps the input)."""


def _kind(directory: bool) -> str:
    return "folder" if directory else "file"


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (which must be a writable folder)."""
    p = path.parent
    while not p.exists():
        if p.is_symlink():  # a dangling symlink: mkdir would fail
            break
        p = p.parent
    if not p.is_dir():
        raise OutputPathError(f"cannot create {path}: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {path}: folder {p} is not writable")
    return p


def check_output(path: str | Path, overwrite: bool = False, *, directory: bool = False) -> Path:
    """Refuse, before any work is done, an output that cannot be written: one that exists (unless
    ``overwrite``), of the other kind (a file where a folder would go or vice versa), a folder that
    is not a model folder, or whose folder is missing and cannot be created or is not writable.
    Creates nothing."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise OutputExistsError(f"{path} already exists; choose another path or pass overwrite=True (CLI: --overwrite)")
        if path.is_dir() != directory:
            raise OutputPathError(f"{path} is a {_kind(not directory)}; refusing to replace it with a {_kind(directory)}")
        if directory and any(path.iterdir()) and not (path / "model_index.json").exists():
            raise OutputPathError(f"refusing to replace folder {path}: it is not empty and not a diffusers model "
                                  "folder (no model_index.json)")
    elif path.is_symlink():
        raise OutputPathError(f"{path} is a dangling symlink; refusing to write through it")
    _writable_ancestor(path)
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot replace {path}: folder {path.parent} is not writable")
    return path


def check_not_inside(output: str | Path, source: str | Path) -> None:
    """Refuse an output that is, contains or lies inside ``source`` (both resolved: symlinks and
    relative paths cannot hide the overlap)."""
    out, src = Path(output).resolve(), Path(source).resolve()
    if out == src or src in out.parents or out in src.parents:
        raise OutputPathError(f"output {output} overlaps the source model {source}; writing there could destroy it. "
                              "Choose an output outside the source")
    if Path(output).exists() and Path(source).exists() and os.path.samefile(output, source):
        raise OutputPathError(f"output {output} is the source model {source} (hard link); choose another output")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove temporaries of dead ConceptEdit processes in ``folder``; a backup of an old output
    whose target went missing (killed mid-swap) is renamed back instead. Returns what was handled."""
    done = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return done
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        target = p.parent / m["name"]
        if m["kind"] == "old" and not target.exists() and not target.is_symlink():
            os.rename(p, target)
        else:
            _remove(p)
        done.append(p)
    return done


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_modes(tmp: Path) -> None:
    """Writers such as safetensors create files 0600; give the output the modes any other tool
    would (0666 / 0777 less the umask)."""
    mask = _umask()
    if tmp.is_dir():
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
    else:
        os.chmod(tmp, 0o666 & ~mask)


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{TAG}-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this filesystem/kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path``, which exists; the old folder is deleted afterwards."""
    if _exchange(tmp, path):
        _remove(tmp)  # now holds the old output; a kill here leaves a -tmp- sibling, cleaned later
        return
    backup = _sibling(path, "old")
    os.rename(path, backup)  # a kill before the next line leaves a -old- sibling, restored later
    os.rename(tmp, path)
    _remove(backup)


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = False, *, directory: bool = False):
    """Yield a fresh temporary sibling path (an empty folder with ``directory``, else an empty
    file); on success it gets the umask's permissions and replaces ``path`` in one step."""
    path = check_output(path, overwrite, directory=directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path.parent)
    tmp = _sibling(path, "tmp")
    if directory:
        os.mkdir(tmp, 0o777)
    else:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        _default_modes(tmp)
        check_output(path, overwrite, directory=directory)  # still true after the (long) write?
        if directory and path.exists():
            _swap_in(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
