"""Where the local backend keeps task objects: one directory per backend, named after its host.

An object lives only from its writer to its one reader; payloads and results too large to
travel inline go there. A host that dies without shutting down (SIGKILL, a kernel restart)
leaves its directory behind, in memory when it is on /dev/shm: the next local backend of the
same user removes the directories of hosts that are no longer alive.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

log = logging.getLogger("lambdafutures")

# Free space that makes /dev/shm the default home of task objects.
_SHM_MIN_FREE = 2 * 1024 ** 3
_SHM = "/dev/shm"
_PREFIX = "lambdafutures-"
# lambdafutures-<host pid>-<random>: what `new_store_root` makes (other lambdafutures-*
# names, such as the trial stack's, are not ours to remove).
_OWN_NAME = re.compile(r"lambdafutures-(\d+)-[A-Za-z0-9_]+")


def new_store_root(store_dir: str | None) -> str:
    """A new directory for task objects: in `store_dir` if given, else in /dev/shm when it
    is roomy and TMPDIR names no other place, else in the temporary directory. On a disk
    file system creating each file can cost a millisecond; in memory it costs little."""
    prefix = f"{_PREFIX}{os.getpid()}-"
    if store_dir is None and "TMPDIR" not in os.environ and _roomy(_SHM):
        try:
            return tempfile.mkdtemp(prefix=prefix, dir=_SHM)
        except OSError:
            pass  # not usable after all: the temporary directory below
    return tempfile.mkdtemp(prefix=prefix, dir=store_dir)


def remove_stale_roots(store_dir: str | None = None) -> list[str]:
    """Remove the store directories that hosts of this user left behind when they died; the
    paths removed."""
    removed = []
    for parent in {_SHM, tempfile.gettempdir(), *([store_dir] if store_dir else [])}:
        try:
            entries = list(os.scandir(parent))
        except OSError:
            continue  # no such directory, or not ours to read
        for entry in entries:
            match = _OWN_NAME.fullmatch(entry.name)
            if match is None or not _is_own_directory(entry):
                continue
            if _alive(int(match.group(1))):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        log.info("removed %d store director%s left by local backends whose host process "
                 "had died: %s", len(removed), "y" if len(removed) == 1 else "ies",
                 ", ".join(removed))
    return removed


def _is_own_directory(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def _roomy(path: str) -> bool:
    try:
        space = os.statvfs(path)
    except (OSError, AttributeError):  # no such directory, or no statvfs (Windows)
        return False
    return os.access(path, os.W_OK) and space.f_bavail * space.f_frsize >= _SHM_MIN_FREE
