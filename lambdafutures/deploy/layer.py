"""The dependency layer: wheels for Lambda's platform, fetched by pip on any host, no Docker.

pip can install for another platform when it only takes wheels (`--only-binary=:all:`), so
the layer is built where the user runs `deploy`. A layer version records in its description
the digest of what it was built from (requirements, Python version, architecture, the host
versions it pins), so a re-run finds it and builds nothing.

The cloud should run what the host runs: a requirement named without a version is pinned
to the host's installed version. Where no wheel of that version exists for Lambda's
platform (numpy 2.3+ needs glibc 2.28, Amazon Linux 2 has 2.26), the pin is dropped and
pip takes the newest that exists; the build records both, and `deploy` and `status` show
the difference (see environment.py).
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.metadata
import io
import logging
import os
import py_compile
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from .package import unzipped_size

log = logging.getLogger("lambdafutures")

DEFAULT_REQUIREMENTS = "numpy\n"
DIGEST_MARK = "sha256:"

_ARCH_SUFFIX = {"arm64": "aarch64", "x86_64": "x86_64"}
# Lambda mounts a layer at /opt; its python/ directory is on sys.path.
LAYER_SITE = "/opt/python"
# A requirement line that is only a project name (with extras): the ones pinned to the host.
_BARE_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(#.*)?$")
# pip's words for "no such version for this platform": the pins it names are dropped.
_UNAVAILABLE = re.compile(r"(?:No matching distribution found for|Could not find a version "
                          r"that satisfies the requirement)\s+([A-Za-z0-9._-]+)==")


class LayerBuildError(RuntimeError):
    """pip could not produce the layer (a requirement without a wheel for Lambda, say)."""


@dataclass(frozen=True)
class LayerSource:
    """What a layer is made from: the digest naming the content, and how to make it."""

    digest: str                              # hex SHA-256
    build: Callable[[], bytes] | None        # None: this host cannot rebuild it
    record: dict[str, str]                   # kept in the config so a re-run can rebuild
    summary: str                             # for progress lines
    # Filled by build(): "packages" {name: version} in the zip, "fallbacks" {name: host
    # version that had no wheel for Lambda}, "unzipped_bytes", "pyc" (compiled or not).
    built: dict[str, Any] = field(default_factory=dict)

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


def canonical_name(name: str) -> str:
    """A project name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def host_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_pins(requirements: str) -> dict[str, str]:
    """{canonical name: host version} for each requirement named without a version that the
    host has installed."""
    pins = {}
    for line in requirements.splitlines():
        match = _BARE_NAME.match(line)
        if match and (version := host_version(match.group(1))) is not None:
            pins[canonical_name(match.group(1))] = version
    return pins


def pinned(requirements: str, pins: dict[str, str]) -> str:
    """The requirements with each bare name in `pins` pinned to its version."""
    lines = []
    for line in requirements.splitlines():
        match = _BARE_NAME.match(line)
        name = canonical_name(match.group(1)) if match else None
        if match and name in pins:
            line = f"{match.group(1)}{match.group(2) or ''}=={pins[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def compile_for_runtime(site: Path, python: str) -> bool:
    """Compile every module under `site` to .pyc with unchecked-hash invalidation: /opt is
    read-only on Lambda, so without them each cold start compiles numpy again (0.31 s of
    import instead of 0.10 s), and an unchecked hash skips even the stat of each source.
    Bytecode is specific to the Python minor: only possible when this host runs the
    runtime's. Returns whether it compiled."""
    if python != "%d.%d" % sys.version_info[:2]:
        log.info("layer: no .pyc (this host runs Python %d.%d, the runtime %s)",
                 *sys.version_info[:2], python)
        return False
    compileall.compile_dir(str(site), quiet=2, workers=0, stripdir=str(site),
                           prependdir=LAYER_SITE,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    return True


def packages_in_zip(data: bytes) -> dict[str, str]:
    """{canonical name: version} of the distributions installed in a layer zip."""
    found = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[1].endswith(".dist-info") and parts[2] == "METADATA":
                headers = HeaderParser().parsestr(archive.read(name).decode("utf-8", "replace"))
                if headers.get("Name") and headers.get("Version"):
                    found[canonical_name(headers["Name"])] = headers["Version"]
    return dict(sorted(found.items()))


def build_matching_host(requirements: str, pins: dict[str, str], architecture: str,
                        python: str, built: dict[str, Any],
                        run: Callable[[Sequence[str]], Any] | None = None) -> bytes:
    """Build with the host's versions pinned; a pin pip cannot satisfy for Lambda's platform
    is dropped (pip then takes the newest version that has a wheel) and recorded in
    `built["fallbacks"]`."""
    wanted, fallbacks = dict(pins), {}
    while True:
        try:
            data = build_layer_zip(pinned(requirements, wanted), architecture, python,
                                   run=run)
            break
        except LayerBuildError as exc:
            named = {canonical_name(n) for n in _UNAVAILABLE.findall(str(exc))} & set(wanted)
            # An unnamed failure with pins in place (conflicting pins, say): drop them all
            # once; without pins, the requirements themselves cannot be built.
            dropped = named or set(wanted)
            if not dropped:
                raise
            for name in sorted(dropped):
                fallbacks[name] = wanted.pop(name)
                log.info("layer: %s %s has no wheel for %s / Python %s; taking the newest "
                         "that has", name, fallbacks[name], architecture, python)
    built.update(packages=packages_in_zip(data), fallbacks=fallbacks,
                 unzipped_bytes=unzipped_size(data),
                 pyc=python == "%d.%d" % sys.version_info[:2])
    return data


def build_layer_zip(requirements: str, architecture: str, python: str,
                    run: Callable[[Sequence[str]], Any] | None = None) -> bytes:
    """pip-install `requirements` for Lambda into `python/`, compile it for the runtime
    when this host can, and zip it (Lambda puts a layer's `python/` on sys.path)."""
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
        compile_for_runtime(target, python)
        return zip_directory(target.parent)


def zip_directory(root: Path) -> bytes:
    """Zip every file under `root` (sorted, fixed times, modes kept so binaries stay
    executable), names relative to `root`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            if path.is_dir():
                continue
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), (1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IMODE(os.stat(path).st_mode) | 0o444) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def from_requirements(requirements: str, architecture: str, python: str) -> LayerSource:
    text = requirements if requirements.endswith("\n") else requirements + "\n"
    pins = host_pins(text)
    # The platform is part of what is built: the same requirements for another
    # architecture or Python version are another layer; so are other host versions.
    key = (f"{text}\0{architecture}\0{python}\0{' '.join(platform_tags(architecture, python))}"
           f"\0pins:{' '.join(f'{n}=={v}' for n, v in sorted(pins.items()))}")
    # A readable summary for the description: the first word of each requirement line
    # (options such as "--hash=sha256:..." left out, so only our digest carries "sha256:").
    words = [line.split("#")[0].split()[:1] for line in text.splitlines()]
    names = [w[0].replace(":", "") for w in words if w and not w[0].startswith("-")]
    built: dict[str, Any] = {}
    return LayerSource(
        digest=hashlib.sha256(key.encode()).hexdigest(),
        build=lambda: build_matching_host(text, pins, architecture, python, built),
        record={"requirements": text},
        summary="deps " + (",".join(names)[:120] or "(none)"),
        built=built,
    )


def from_host_packages(names: Sequence[str], architecture: str, python: str) -> LayerSource:
    """`deploy --requirements-from-env NAME...`: the named packages at the host's versions."""
    missing = [name for name in names if host_version(name) is None]
    if missing:
        raise ValueError(f"--requirements-from-env: not installed on this host: "
                         f"{', '.join(missing)}")
    return from_requirements("".join(f"{name}\n" for name in names), architecture, python)


def from_zip(data: bytes, label: str = "prebuilt") -> LayerSource:
    """A layer zip built elsewhere (air-gapped hosts, tests)."""
    digest = hashlib.sha256(data).hexdigest()
    built: dict[str, Any] = {}

    def build() -> bytes:
        built.update(packages=packages_in_zip(data), fallbacks={},
                     unzipped_bytes=unzipped_size(data), pyc=False)
        return data

    return LayerSource(digest=digest, build=build, record={"zip_sha256": digest},
                       summary=f"zip {label}"[:120], built=built)


def from_record(record: dict[str, str], architecture: str, python: str) -> LayerSource:
    """The source a previous deployment recorded: requirements are rebuilt; a prebuilt zip
    can only be found again among the published versions."""
    if "requirements" in record:
        return from_requirements(record["requirements"], architecture, python)
    digest = record["zip_sha256"]
    return LayerSource(digest=digest, build=None, record=dict(record), summary="zip prebuilt")
