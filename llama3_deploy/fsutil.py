"""Atomic outputs: write into a temporary sibling directory, rename into place when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import DeployError


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse outputs that would clobber something: an existing file, or a non-empty directory without overwrite."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DeployError(f"output path exists and is a file, not a directory: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DeployError(f"output directory is not empty: {out} (pass --overwrite to replace it)")
    return out


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    An existing `out_dir` is only replaced after the new one is complete, so it is never half-overwritten.
    """
    out = check_output_dir(out_dir, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary output directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
