"""Write artefacts under a temporary name and rename them, so a killed run never leaves a half-written file.

The temporary file sits beside the final one (a rename across file systems would not be atomic) and is named
`.<final name>.<random>.tmp`. A run killed outright (SIGKILL, power loss) can leave such a file behind, never a
partial file under the final name; the next run writes a fresh temporary and succeeds.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; some file systems cannot fsync a folder, which is harmless here."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it is renamed onto `final`, on failure removed.
    An OSError (no permission, disk full, a file where a folder should be) is a UserError naming `final`."""
    final = Path(final)
    tmp_path = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; artefacts get the usual permissions
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())  # the data reaches the disk before the name does
        os.replace(tmp_path, final)
        _fsync_folder(final.parent)
    except OSError as e:
        raise UserError(f"{final}: cannot write it: {e.strerror or e}") from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_json(final: str | os.PathLike, obj) -> None:
    write_bytes(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
