"""Files written whole or not at all: a kill or a full disk mid-write leaves the old file, not a torn one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> None:
    """Call `write` on a file beside `path`, then rename it over `path` (atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a node crash must not leave an empty file
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself, on disk
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def save_figure(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG at `path`, written whole or not at all (a report rerun mid-way, or
    killed, leaves the last picture, not a torn one)."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi), mode="wb")
    return Path(path)


def foreign_file(path: str | Path, header: str) -> bool:
    """Whether `path` is taken by something pretrain did not write, and so must not be written over: a
    directory, or a file that does not start with `header` (the first line pretrain writes into it)."""
    path = Path(path)
    if path.is_dir():
        return True
    if not path.exists():
        return False
    with open(path, errors="replace") as f:
        return f.read(len(header)) != header


def fsync_tree(root: str | Path, mine: Callable[[str], bool] | None = None, dirs: bool = True) -> None:
    """Flush the files under `root` (those whose name `mine` accepts: the ones this process wrote), and
    with `dirs` the directories naming them, to disk: what is marked complete after this (a checkpoint, a
    token cache) must not come back empty or cut short after a node crash."""
    for folder, _, files in os.walk(root):
        for name in files:
            if mine is None or mine(name):
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
        if dirs:
            fsync_dir(folder)


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` at `target` by renames: one there before (an earlier attempt's, or
    empty) is moved aside first and removed after, so `target` is never half-written."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(new, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, data: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent))


def set_aside(path: Path, label: str) -> Path:
    """Rename `path` to STEM.LABEL-N.SUFFIX with the first free N (nothing is overwritten); the new path."""
    n = 1
    while (kept := path.with_name(f"{path.stem}.{label}-{n}{path.suffix}")).exists():
        n += 1
    path.rename(kept)
    return kept
