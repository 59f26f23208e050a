"""Safe file-system access: checkpoint files confined to their checkpoint, atomic and locked outputs.

Inputs: every file read or copied from a checkpoint directory goes through `contained_file`, so a
symlink (or an index entry) cannot pull `/etc/passwd` or a file from another model into an export.

Outputs: `atomic_directory` writes into a temporary sibling and renames it into place only when complete,
under a lock, re-checking at the rename that it still replaces nothing it may not; a SIGTERM cleans up.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CheckpointError, DeployError

PathLike = str | os.PathLike


# --- inputs: containment -------------------------------------------------------------------------------
def containment_root(model_dir: PathLike) -> Path:
    """The folder every file of a checkpoint must resolve inside: the resolved checkpoint directory, or for a
    Hugging Face hub snapshot (`models--ORG--NAME/snapshots/<rev>/`, whose files are symlinks to
    `../../blobs/<hash>`) its repository folder, recognised by holding both `blobs/` and `snapshots/`."""
    d = Path(model_dir).resolve()
    repo = d.parent.parent
    if d.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return d


def contained_file(model_dir: PathLike, name: str, *, what: str, root: Path | None = None) -> Path | None:
    """The regular file `name` in `model_dir`, resolved (so a later swap of a link cannot redirect the read);
    None when absent. CheckpointError when it resolves outside `containment_root(model_dir)` or is not a
    regular file (a directory, a FIFO, a dangling or looping link)."""
    path = Path(model_dir) / name
    if not os.path.lexists(path):
        return None
    root = root or containment_root(model_dir)
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is a dangling symlink: {path}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop is RuntimeError or ELOOP
        raise CheckpointError(f"cannot resolve {what} {path}: {e}") from None
    if not real.is_relative_to(root):
        raise CheckpointError(f"{what} {path} resolves to {real}, outside the checkpoint directory {root}; "
                              "files are only read from inside the checkpoint")
    try:
        mode = real.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} is not a regular file: {path}")
    return real


# --- outputs: checks ------------------------------------------------------------------------------------
def _output_path(out_dir: PathLike) -> Path:
    """The directory an output names. A symlinked output is followed: its target is what gets replaced,
    so the link itself stays and nothing is left beside it."""
    out = Path(out_dir)
    if out.name in ("", ".", ".."):  # "." or "/" has no name to make a sibling from
        out = Path(os.path.abspath(out))
    if out.is_symlink():
        if not out.exists():
            raise DeployError(f"output path is a dangling symlink: {out} -> {os.readlink(out)}")
        return out.resolve()
    return out


def _protected(paths: Iterable[PathLike | None]) -> list[Path]:
    """Resolved protected paths (None skipped); a hub snapshot also protects its repository folder, where
    its files live (blobs/)."""
    result = []
    for p in paths:
        if p is None:
            continue
        real = Path(p).resolve()
        result += [real, containment_root(real)] if real.is_dir() else [real]
    return result


def _check_protect(out: Path, protect: Iterable[PathLike]) -> None:
    real = out.resolve()
    with contextlib.suppress(OSError):  # an output is renamed into place: never over the working directory
        cwd = Path.cwd().resolve()
        if cwd == real or cwd.is_relative_to(real):
            raise DeployError(f"output {out} is or contains the current directory {cwd}; an export replaces "
                              "its output directory: choose a new one")
    for p in _protected(protect):
        if p == real or p.is_relative_to(real):
            raise DeployError(f"output {out} {'is' if p == real else 'contains'} the input {p}; "
                              "writing there would delete it: choose another --output")


def _check_parent(out: Path) -> None:
    """The nearest existing ancestor must be a writable directory (refused before any work is done)."""
    parent = out.absolute().parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if parent.is_symlink() and not parent.exists():
        raise DeployError(f"output parent {parent} is a dangling symlink -> {os.readlink(parent)}")
    if not parent.is_dir():
        raise DeployError(f"output parent {parent} is a file, not a directory (output {out})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeployError(f"output parent {parent} is not writable (read-only file system or no permission)")


def _check_target(out: Path, overwrite: bool) -> None:
    if os.path.lexists(out) and not out.is_dir():
        raise DeployError(f"output path exists and is a file, not a directory: {out}")
    if out.is_dir():
        if os.path.ismount(out):  # renaming onto or away from a mount point fails with EBUSY or EXDEV
            raise DeployError(f"output {out} is a mount point, which an export cannot be renamed onto; "
                              f"give a directory inside it, e.g. {out / 'model'}")
        try:
            busy = any(out.iterdir())
        except OSError as e:
            raise DeployError(f"cannot read output directory {out}: {e.strerror}") from None
        if busy and not overwrite:
            raise DeployError(f"output directory is not empty: {out} (pass --overwrite to replace it)")


def check_output_dir(out_dir: PathLike, *, overwrite: bool = False, protect: Iterable[PathLike] = ()) -> Path:
    """Refuse outputs that would clobber something, before any work: an existing file, a non-empty directory
    without overwrite, a mount point, an unusable parent, or a path that is or contains a `protect`ed input
    (resolved, symlinks followed). Returns the directory that will be written (a symlink's target)."""
    out = _output_path(out_dir)
    _check_protect(out, protect)
    _check_target(out, overwrite)
    _check_parent(out)
    return out


# --- outputs: lock, signals, renames -----------------------------------------------------------------------
@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """An exclusive flock on `.NAME.lock` beside the output, so two writers of one output cannot both win.

    The file is removed on release; a waiter that locked the removed file sees it is no longer the one at
    the path and fails like any other loser."""
    lock = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DeployError(f"cannot create lock file {lock} for output {out}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            same = False
        if not same:
            raise DeployError(f"another process is writing output {out} (lock {lock} held); "
                              "wait for it or choose another --output")
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """For the duration, SIGTERM raises SystemExit(143) so cleanup runs; main thread only (signal handlers
    can only be set there); an ignored SIGTERM stays ignored; the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:  # a second SIGTERM during cleanup must not interrupt the cleanup
            fired.append(signum)
            raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back during the renames that swap outputs, so they never stop half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@functools.lru_cache(maxsize=1)
def _libc_renameat2():
    """libc's renameat2, looked up on first use (nothing happens at import), or None where it is absent."""
    with contextlib.suppress(OSError, AttributeError):
        fn = ctypes.CDLL(None, use_errno=True).renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return fn
    return None


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: PathLike, dst: PathLike) -> None:
    """Rename, failing with FileExistsError when `dst` exists (even an empty directory, which a plain rename
    would silently replace). Atomic where the kernel and file system have renameat2(RENAME_NOREPLACE)."""
    renameat2 = _libc_renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # unsupported here: fall back below
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _commit(tmp: Path, out: Path, overwrite: bool, protect: Iterable[PathLike]) -> None:
    """Move the finished `tmp` into place, re-checking what is at `out` now (it may have changed since the
    start): an empty directory is replaced, a non-empty one only with overwrite, and only after the new
    output is in place is the old one deleted."""
    _check_protect(out, protect)
    try:
        _check_target(out, overwrite)
    except DeployError as e:
        raise DeployError(f"{e}: it was created or filled by something else during the export; it was left "
                          "untouched and this export discarded") from None
    old = None

    def kept() -> str:
        return f" (the previous output is kept at {old})" if old is not None else ""

    try:
        if out.is_dir():
            if overwrite:
                aside = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                rename_noreplace(out, aside)
                old = aside
            else:
                out.rmdir()  # empty at the check; fails if anything arrived since
        try:
            rename_noreplace(tmp, out)
        except BaseException:
            if old is not None:
                rename_noreplace(old, out)
                old = None
            raise
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise DeployError(f"output {out} was created or filled by something else during the export; it was "
                              f"left untouched and this export discarded{kept()}") from None
        raise DeployError(f"cannot move the finished export into place at {out}: {e.strerror}{kept()}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# OSErrors that are about where the output goes, not about the inputs: reported naming the output.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def atomic_directory(out_dir: PathLike, *, overwrite: bool = False,
                     protect: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir`, on failure (including
    SIGTERM and Ctrl-C) it is removed.

    An existing `out_dir` is only replaced after the new one is complete, so it is never half-overwritten;
    `protect` lists inputs (a checkpoint, a tokenizer directory) the output must neither be nor contain.
    """
    protect = list(protect)
    out = check_output_dir(out_dir, overwrite=overwrite, protect=protect)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeployError(f"cannot create the output's parent directory {out.parent}: {e.strerror}") from None
    with _output_lock(out), _sigterm_raises():
        _check_target(out, overwrite)  # again, now that no other export can change it
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        except OSError as e:
            raise DeployError(f"cannot create a directory beside the output {out}: {e.strerror}") from None
        committed = False
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary output directory
            try:
                yield tmp
            except OSError as e:
                if e.errno in OUTPUT_ERRNOS:
                    raise DeployError(f"cannot write the output {out}: {e.strerror}"
                                      + (f" ({e.filename})" if e.filename else "")) from None
                raise
            with _sigterm_deferred():
                _commit(tmp, out, overwrite, protect)
                committed = True
        finally:
            if not committed:
                shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: PathLike, data) -> None:
    """Write `data` (bytes or any buffer) to a temporary sibling and rename it into place (readable by all, like
    any output file: mkstemp's own mode is 0600); the temporary file is removed on any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
