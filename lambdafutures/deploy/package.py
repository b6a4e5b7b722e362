"""The Lambda function's code: a zip of the worker package plus the host's cloudpickle.

The zip is byte-for-byte reproducible (sorted entries, fixed timestamps and permissions), so
its SHA-256 equals the deployed function's CodeSha256 exactly when the code is the same:
that is how `deploy` skips an unchanged upload and how `status` spots stale code.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
import zipfile
from pathlib import Path

HANDLER = "lambdafutures_handler.worker.handle"

_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest representable time


def _package_dir(module_name: str) -> Path:
    module = importlib.import_module(module_name)
    return Path(module.__path__[0])


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def add_tree(archive: zipfile.ZipFile, root: Path, arcname: str) -> None:
    """Add the .py files under `root` as `arcname/...`, reproducibly."""
    for path in _python_files(root):
        relative = path.relative_to(root).as_posix()
        write_entry(archive, f"{arcname}/{relative}", path.read_bytes())


def write_entry(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.external_attr = 0o644 << 16  # readable by the Lambda runtime user
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data, compresslevel=9)


def build_function_zip() -> bytes:
    """The worker (`lambdafutures_handler`) and cloudpickle, as installed on this host.

    cloudpickle ships from the host, not from PyPI, because the worker refuses payloads
    pickled by another cloudpickle version; it is pure Python, so any platform runs it.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        add_tree(archive, _package_dir("lambdafutures_handler"), "lambdafutures_handler")
        add_tree(archive, _package_dir("cloudpickle"), "cloudpickle")
    return buffer.getvalue()


def code_sha256(data: bytes) -> str:
    """The digest in Lambda's format (base64 of the SHA-256), as in CodeSha256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


# Lambda's limit on a function's code and all its layers, unzipped: 250 MB (MiB, in fact:
# 262,144,000 bytes). Past it, CreateFunction / UpdateFunctionConfiguration fail only after
# the upload; checked here first.
UNZIPPED_LIMIT = 250 * 2**20


class PackageTooLarge(RuntimeError):
    """The function and its layers would unzip to more than Lambda allows."""


def unzipped_size(data: bytes) -> int:
    """The bytes a zip holds once unpacked (what Lambda counts against its limit)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return sum(info.file_size for info in archive.infolist())


def check_unzipped_size(parts: dict[str, int], limit: int | None = None) -> int:
    """Refuse when the parts ({"function": bytes, "layer x": bytes}) add up to more than
    `limit` (default: Lambda's unzipped limit); return the total."""
    limit = UNZIPPED_LIMIT if limit is None else limit
    total = sum(parts.values())
    if total > limit:
        shown = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in parts.items())
        raise PackageTooLarge(
            f"the function and its layers unzip to {total / 2**20:.1f} MB ({shown}), over "
            f"Lambda's {limit / 2**20:.0f} MB limit; nothing was uploaded. Trim the layer's "
            "requirements (a package that is only needed on this host, test or plotting "
            "extras), or split the dependencies and pass a smaller --requirements file")
    return total
