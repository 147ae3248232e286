"""Run-directory files written so that a crash never leaves something that looks complete.

Everything a stage produces is written under a temporary name in the same directory and
renamed into place at the end: rename is atomic on POSIX file systems, so readers see either
the old state or the whole new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (shared clusters).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_tmp_dir(parent: Path, prefix: str) -> Path:
    """A fresh temporary directory in `parent` with the permissions `mkdir` would give it.

    `tempfile.mkdtemp` creates mode 0700, which the final rename would keep: on a shared cluster
    file system the other users of a run directory could not read the data.
    """
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    return path


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def software_versions() -> dict:
    """Versions that decide what a checkpoint or a number means; recorded in every manifest."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("nemo-btx", "torch", "megatron-core", "hydra-core", "omegaconf", "lm-eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def replace_dir(new: Path, final: Path) -> None:
    """Put the complete directory `new` at `final`, replacing what was there.

    `new` must be a sibling of `final` (same file system). The old directory is renamed away
    first and deleted only after the new one is in place, so at every instant `final` is either
    the whole old directory or the whole new one (or, for the moment between two renames, absent).
    """
    import shutil

    new, final = Path(new), Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out: Path, doing: str) -> Iterator[Path]:
    """Build a new output directory as `.<out>.tmp` beside it; rename it to `out` only when the
    block completes. A leftover from a killed run is removed first; on any error the staging
    directory is removed and `out` never appears. `out` must not exist (checked again at the
    end, so a concurrent writer is never overwritten); `doing` names the work in that error."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        logging.getLogger(__name__).warning("removing %s left by an interrupted run", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            from nemo_btx.errors import BtxError

            raise BtxError(f"{out}: appeared while {doing}; not overwriting it")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
