"""The dependency layer: wheels for Lambda's platform, fetched by pip on any host, no Docker.

pip can install for another platform when it only takes wheels (`--only-binary=:all:`), so
the layer is built where the user runs `deploy`. A layer version records in its description
the digest of what it was built from (requirements, Python version, architecture), so a
re-run finds it and builds nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lambdafutures")

DEFAULT_REQUIREMENTS = "numpy\n"
DIGEST_MARK = "sha256:"

_ARCH_SUFFIX = {"arm64": "aarch64", "x86_64": "x86_64"}


class LayerBuildError(RuntimeError):
    """pip could not produce the layer (a requirement without a wheel for Lambda, say)."""


@dataclass(frozen=True)
class LayerSource:
    """What a layer is made from: the digest naming the content, and how to make it."""

    digest: str                              # hex SHA-256
    build: Callable[[], bytes] | None        # None: this host cannot rebuild it
    record: dict[str, str]                   # kept in the config so a re-run can rebuild
    summary: str                             # for progress lines

    @property
    def description(self) -> str:
        return f"lambdafutures {self.summary} {DIGEST_MARK}{self.digest}"[:256]


def described_digest(description: str | None) -> str | None:
    """The digest a layer version's description records, if it is one of ours."""
    for word in reversed((description or "").split()):  # ours is the last word
        if word.startswith(DIGEST_MARK):
            return word[len(DIGEST_MARK):]
    return None


def platform_tags(architecture: str, python: str) -> list[str]:
    """pip `--platform` tags for Lambda's OS image of this Python version.

    manylinux2014 (glibc 2.17) runs on every Python runtime. Runtimes from python3.12 on run
    on Amazon Linux 2023 (glibc 2.34), so wheels built for glibc 2.28 are fine there too,
    and some projects publish only those for aarch64.
    """
    suffix = _ARCH_SUFFIX[architecture]
    tags = [f"manylinux2014_{suffix}"]
    if tuple(int(part) for part in python.split(".")) >= (3, 12):
        tags.append(f"manylinux_2_28_{suffix}")
    return tags


def pip_command(requirements_file: Path, target: Path, architecture: str,
                python: str) -> list[str]:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
               "--no-compile", "--quiet"]
    for tag in platform_tags(architecture, python):
        command += ["--platform", tag]
    command += ["--implementation", "cp", "--python-version", python,
                "--only-binary=:all:", "--target", str(target), "-r", str(requirements_file)]
    return command


def build_layer_zip(requirements: str, architecture: str, python: str,
                    run: Callable[[Sequence[str]], Any] | None = None) -> bytes:
    """pip-install `requirements` for Lambda into `python/` and zip it (Lambda puts a
    layer's `python/` directory on sys.path)."""
    with tempfile.TemporaryDirectory(prefix="lambdafutures-layer-") as tmp:
        root = Path(tmp)
        requirements_file = root / "requirements.txt"
        requirements_file.write_text(requirements)
        target = root / "layer" / "python"
        command = pip_command(requirements_file, target, architecture, python)
        log.debug("layer build: %s", " ".join(command))
        if run is not None:
            run(command)
        else:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise LayerBuildError(
                    f"pip could not build the layer for {architecture} / Python {python}:\n"
                    + (done.stderr or done.stdout)[-4000:])
        # Console scripts carry this host's interpreter path in their shebang: useless there.
        shutil.rmtree(target / "bin", ignore_errors=True)
        return zip_directory(target.parent)


def zip_directory(root: Path) -> bytes:
    """Zip every file under `root` (sorted, fixed times, modes kept so binaries stay
    executable), names relative to `root`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), (1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IMODE(os.stat(path).st_mode) | 0o444) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def from_requirements(requirements: str, architecture: str, python: str) -> LayerSource:
    text = requirements if requirements.endswith("\n") else requirements + "\n"
    # The platform is part of what is built: the same requirements for another
    # architecture or Python version are another layer.
    key = f"{text}\0{architecture}\0{python}\0{' '.join(platform_tags(architecture, python))}"
    # A readable summary for the description: the first word of each requirement line
    # (options such as "--hash=sha256:..." left out, so only our digest carries "sha256:").
    words = [line.split("#")[0].split()[:1] for line in text.splitlines()]
    names = [w[0].replace(":", "") for w in words if w and not w[0].startswith("-")]
    return LayerSource(
        digest=hashlib.sha256(key.encode()).hexdigest(),
        build=lambda: build_layer_zip(text, architecture, python),
        record={"requirements": text},
        summary="deps " + (",".join(names)[:120] or "(none)"),
    )


def from_zip(data: bytes, label: str = "prebuilt") -> LayerSource:
    """A layer zip built elsewhere (air-gapped hosts, tests)."""
    digest = hashlib.sha256(data).hexdigest()
    return LayerSource(digest=digest, build=lambda: data, record={"zip_sha256": digest},
                       summary=f"zip {label}"[:120])


def from_record(record: dict[str, str], architecture: str, python: str) -> LayerSource:
    """The source a previous deployment recorded: requirements are rebuilt; a prebuilt zip
    can only be found again among the published versions."""
    if "requirements" in record:
        return from_requirements(record["requirements"], architecture, python)
    digest = record["zip_sha256"]
    return LayerSource(digest=digest, build=None, record=dict(record), summary="zip prebuilt")
