"""`lambdafutures deploy` and the runtime it deploys to: Lambda's runtime dates, the layer's
package versions against the host's, .pyc in the layer, layer pruning, the size limit, and
updates of a function that is busy.

AWS parts run against the session's moto server (tests/conftest.py), the CLI in-process
through `main([...])` as in tests/test_deploy.py. "Today" is moved with `runtimes.today`.
"""

from __future__ import annotations

import datetime as dt
import http.client
import importlib.metadata
import io
import json
import logging
import os
import re
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
from botocore.exceptions import ClientError

from lambdafutures.config import load_deployment
from lambdafutures.deploy import environment, layer, package, runtimes
from lambdafutures.deploy.cli import main
from lambdafutures.testing.loopback import LoopbackServer, read_body

PYTHON = "%d.%d" % sys.version_info[:2]
RUNTIME = runtimes.runtime_for(PYTHON)
REGION = "us-east-1"
NUMPY = importlib.metadata.version("numpy")


# -- fixtures and helpers -------------------------------------------------------------------

@pytest.fixture
def lam(moto_server):
    return boto3.Session(region_name=REGION).client("lambda")


@pytest.fixture
def on_day(monkeypatch):
    """on_day(date): the runtime checks believe today is `date`."""

    def move(day: dt.date) -> None:
        monkeypatch.setattr(runtimes, "today", lambda: day)

    return move


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def layer_zip(path: Path, files: dict[str, str]) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    path.write_bytes(buffer.getvalue())
    return path


def dist(name: str, version: str) -> dict[str, str]:
    """The files a wheel installs for a package: its module and its METADATA."""
    return {f"python/{name}/__init__.py": f"__version__ = {version!r}\n",
            f"python/{name}-{version}.dist-info/METADATA":
                f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}


needs_runtime = pytest.mark.skipif(RUNTIME is None, reason=f"no Lambda runtime for {PYTHON}")


# -- the runtime table ----------------------------------------------------------------------

def test_runtime_table_covers_lambdas_pythons_in_date_order():
    assert [r.identifier for r in runtimes.PYTHON_RUNTIMES] == [
        f"python3.{minor}" for minor in range(9, 15)]
    for r in runtimes.PYTHON_RUNTIMES:
        assert r.deprecated <= r.block_create < r.block_update
    assert runtimes.runtime_for("3.10").block_create == dt.date(2026, 11, 30)
    assert runtimes.runtime_for("3.11").block_create.year == 2027
    assert runtimes.runtime_for("3.8") is None


def test_python310_is_refused_from_the_day_lambda_blocks_it():
    day = dt.date(2026, 11, 30)
    with pytest.raises(runtimes.RuntimeBlocked) as refused:
        runtimes.check("3.10", day)
    message = str(refused.value)
    assert "Lambda blocks creating python3.10 functions since 2026-11-30" in message
    assert "python3.11, python3.12, python3.13, python3.14" in message
    assert "uv venv -p 3.13" in message and "pyenv install 3.13" in message
    # The day before, it deploys, with a warning: it is deprecated already.
    [warning] = runtimes.check("3.10", day - dt.timedelta(days=1))
    assert "deprecated since 2026-10-31" in warning
    # An existing python3.10 function can still be updated until the update block.
    [warning] = runtimes.check("3.10", day, deployed_runtime="python3.10")
    assert "this update still goes through" in warning
    with pytest.raises(runtimes.RuntimeBlocked, match="neither created nor updated"):
        runtimes.check("3.10", runtimes.runtime_for("3.10").block_update,
                       deployed_runtime="python3.10")
    with pytest.raises(runtimes.RuntimeBlocked, match="no python3.8 runtime"):
        runtimes.check("3.8", day)


def test_no_warning_far_from_deprecation_and_one_within_the_window():
    runtime = runtimes.runtime_for("3.12")
    far = runtime.deprecated - dt.timedelta(days=runtimes.WARN_DAYS + 1)
    assert runtimes.check("3.12", far) == []
    near = runtime.deprecated - dt.timedelta(days=30)
    [warning] = runtimes.check("3.12", near)
    assert warning.startswith("python3.12 is deprecated on 2028-10-31 (in 30 days)")


@needs_runtime
def test_deploy_refuses_a_blocked_runtime_before_making_anything(
        moto_server, config_file, lam, name, capsys, on_day):
    on_day(RUNTIME.block_create)
    code, out, err = run(capsys, "deploy", "--name", name, "--no-layer")
    assert code == 2, out
    assert f"Lambda blocks creating {RUNTIME.identifier} functions since " \
           f"{RUNTIME.block_create}" in err
    assert "uv venv -p" in err and "pyenv" in err
    assert "deploying" not in out  # refused before the first resource
    s3 = boto3.Session(region_name=REGION).client("s3")
    with pytest.raises(ClientError):
        s3.head_bucket(Bucket=f"{name}-123456789012-{REGION}")
    with pytest.raises(ClientError, match="ResourceNotFound"):
        lam.get_function(FunctionName=name)
    assert not config_file.exists()

    # An endpoint that is not Lambda (moto here) may be told to skip the dates.
    code, out, _ = run(capsys, "deploy", "--name", name, "--no-layer", "--ignore-runtime-dates")
    assert code == 0 and "warning" not in out, out
    assert lam.get_function(FunctionName=name)["Configuration"]["Runtime"] == RUNTIME.identifier
    assert run(capsys, "destroy", "--yes")[0] == 0


@needs_runtime
def test_deploy_warns_near_deprecation_and_updates_until_the_update_block(
        moto_server, config_file, lam, name, capsys, on_day, caplog):
    on_day(RUNTIME.deprecated - dt.timedelta(days=20))
    with caplog.at_level(logging.WARNING, logger="lambdafutures"):
        code, out, _ = run(capsys, "deploy", "--name", name, "--no-layer")
    assert code == 0, out
    expected = f"warning: {RUNTIME.identifier} is deprecated on {RUNTIME.deprecated} (in 20 days)"
    assert expected in out
    assert any("(in 20 days)" in record.getMessage() for record in caplog.records)

    # Creation is blocked now, but the function exists on this runtime: updates go on.
    on_day(RUNTIME.block_create)
    code, out, _ = run(capsys, "deploy", "--memory", "1024")
    assert code == 0, out
    assert "this update still goes through" in out
    assert lam.get_function(FunctionName=name)["Configuration"]["MemorySize"] == 1024

    on_day(RUNTIME.block_update)
    code, out, err = run(capsys, "deploy", "--memory", "512")
    assert code == 2 and "neither created nor updated" in err
    assert lam.get_function(FunctionName=name)["Configuration"]["MemorySize"] == 1024
    code, out, _ = run(capsys, "status")
    assert f"runtime {RUNTIME.identifier}: BLOCKED for updates" in out
    assert run(capsys, "destroy", "--yes")[0] == 0


# -- the environment: layer versions against the host's ---------------------------------------

def test_differences_lists_only_what_differs():
    config = {"layer_arn": "arn:aws:lambda:us-east-1:123456789012:layer:x-deps:1",
              "layer_packages": {"numpy": "2.2.6", "six": importlib.metadata.version("six"),
                                 "not-on-this-host": "1.0"}}
    assert environment.differences(config) == {"numpy": (NUMPY, "2.2.6"),
                                               "not-on-this-host": (None, "1.0")}
    assert environment.difference_for(config, "NumPy") == (NUMPY, "2.2.6")
    assert environment.difference_for(config, "six") is None
    # Nothing known, or no layer: nothing to warn about.
    assert environment.differences({"layer_arn": None}) == {}
    assert environment.differences({"layer_arn": "arn:x"}) == {}


def test_deploy_and_status_report_a_planted_difference(moto_server, config_file, name, capsys,
                                                      tmp_path):
    if NUMPY == "2.2.6":
        pytest.skip("the host runs the planted version")
    six = importlib.metadata.version("six")
    planted = layer_zip(tmp_path / "layer.zip", {**dist("numpy", "2.2.6"), **dist("six", six)})
    code, out, _ = run(capsys, "deploy", "--name", name, "--layer-zip", str(planted))
    assert code == 0, out
    assert "environment: 1 of 2 layer package(s) differ from this host:" in out
    assert f"numpy  host {NUMPY:<12} layer 2.2.6        DIFFERENT" in out
    config = load_deployment()
    assert config["layer_packages"] == {"numpy": "2.2.6", "six": six}
    assert environment.differences(config) == {"numpy": (NUMPY, "2.2.6")}

    code, out, _ = run(capsys, "status")
    assert code == 0 and out.splitlines()[-1] == "all good", out  # a report, not a fault
    assert f"numpy  host {NUMPY:<12} layer 2.2.6        DIFFERENT" in out
    assert f"six    host {six:<12} layer {six:<12} same" in out

    # A re-run reuses the layer and keeps what the config knows about it.
    code, out, _ = run(capsys, "deploy")
    assert code == 0 and load_deployment()["layer_packages"] == config["layer_packages"]
    assert run(capsys, "destroy", "--yes")[0] == 0


def fake_pip(available: dict[str, list[str]], attempts: list[str]):
    """Stands in for pip (an external program): 'installs' the newest available version of
    each requirement, or the pinned one, and fails as pip does when a pin has no wheel."""

    def pip(command):
        target = Path(command[command.index("--target") + 1])
        text = Path(command[command.index("-r") + 1]).read_text()
        attempts.append(text)
        for line in text.split():
            project, _, version = line.partition("==")
            if version and version not in available[project]:
                raise layer.LayerBuildError(
                    f"ERROR: Could not find a version that satisfies the requirement "
                    f"{line} (from versions: {', '.join(available[project])})\n"
                    f"ERROR: No matching distribution found for {line}")
            for member, content in dist(project, version or available[project][-1]).items():
                path = target / Path(member).relative_to("python")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)

    return pip


def test_layer_pins_the_host_version_and_falls_back_to_the_newest_wheel():
    pins = layer.host_pins("numpy\nsix  # comment\nrequests>=2\n")
    assert pins == {"numpy": NUMPY, "six": importlib.metadata.version("six")}
    attempts, built = [], {}
    older = ["2.2.5", "2.2.6"]  # what "PyPI" has for Lambda's platform: not the host's
    data = layer.build_matching_host("numpy\n", {"numpy": NUMPY}, "x86_64", PYTHON, built,
                                     run=fake_pip({"numpy": older}, attempts))
    assert attempts == [f"numpy=={NUMPY}\n", "numpy\n"]
    assert built["packages"] == {"numpy": "2.2.6"} == layer.packages_in_zip(data)
    assert built["fallbacks"] == {"numpy": NUMPY}

    # When the host's version exists for the platform, it is what the layer holds.
    attempts, built = [], {}
    layer.build_matching_host("numpy\n", {"numpy": NUMPY}, "x86_64", PYTHON, built,
                              run=fake_pip({"numpy": ["2.2.6", NUMPY]}, attempts))
    assert attempts == [f"numpy=={NUMPY}\n"]
    assert built["packages"] == {"numpy": NUMPY} and built["fallbacks"] == {}


def test_requirements_from_env_names_installed_packages_only(moto_server, config_file, name,
                                                              capsys):
    source = layer.from_host_packages(["six"], "arm64", PYTHON)
    assert source.record == {"requirements": "six\n"}
    # The host's version is part of the layer's identity: another version, another layer.
    assert source.digest != layer.from_requirements("six==0.1\n", "arm64", PYTHON).digest
    code, _, err = run(capsys, "deploy", "--name", name,
                       "--requirements-from-env", "six", "no-such-package-here")
    assert code == 2 and "not installed on this host: no-such-package-here" in err


# -- .pyc --------------------------------------------------------------------------------------

def test_layer_pyc_is_compiled_with_unchecked_hash_for_the_runtime():
    import importlib.util

    def pip(command):
        target = Path(command[command.index("--target") + 1])
        (target / "tinydep").mkdir(parents=True)
        (target / "tinydep" / "__init__.py").write_text("VALUE = 42\n")

    data = layer.build_layer_zip("tinydep\n", "arm64", PYTHON, run=pip)
    archive = zipfile.ZipFile(io.BytesIO(data))
    tag = sys.implementation.cache_tag
    pyc = archive.read(f"python/tinydep/__pycache__/__init__.{tag}.pyc")
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    flags = int.from_bytes(pyc[4:8], "little")
    assert flags == 0b01  # hash-based, source not checked (PEP 552)
    import marshal
    code = marshal.loads(pyc[16:])
    assert code.co_filename == "/opt/python/tinydep/__init__.py"  # where Lambda mounts it

    # Another Python's runtime: bytecode would not load there, so none is shipped.
    other = "3.12" if PYTHON != "3.12" else "3.13"
    names = zipfile.ZipFile(io.BytesIO(
        layer.build_layer_zip("tinydep\n", "arm64", other, run=pip))).namelist()
    assert names == ["python/tinydep/__init__.py"]


# -- pruning, size, busy functions ---------------------------------------------------------------

def test_old_layer_versions_are_pruned_to_the_newest_three(moto_server, config_file, lam, name,
                                                           capsys, tmp_path):
    first = layer_zip(tmp_path / "v1.zip", {"python/dep.py": "VERSION = 1\n"})
    assert run(capsys, "deploy", "--name", name, "--layer-zip", str(first))[0] == 0
    layer_name = f"{name}-deps"
    for number in (2, 3, 4):  # as if published by earlier deploys
        lam.publish_layer_version(LayerName=layer_name, Content={"ZipFile": layer_zip(
            tmp_path / f"v{number}.zip", {"python/dep.py": f"VERSION = {number}\n"}
        ).read_bytes()}, CompatibleRuntimes=[f"python{PYTHON}"],
            CompatibleArchitectures=["arm64"])
    latest = layer_zip(tmp_path / "v5.zip", {"python/dep.py": "VERSION = 5\n"})
    code, out, _ = run(capsys, "deploy", "--layer-zip", str(latest))
    assert code == 0 and "pruned 2 old layer version(s)" in out, out
    versions = lam.list_layer_versions(LayerName=layer_name)["LayerVersions"]
    assert sorted(v["Version"] for v in versions) == [3, 4, 5]
    assert load_deployment()["layer_arn"].endswith(":5")
    assert run(capsys, "destroy", "--yes")[0] == 0


def test_a_package_over_lambdas_unzipped_limit_is_refused_before_upload(
        moto_server, config_file, lam, name, capsys, tmp_path, monkeypatch):
    # Lambda's real limit, with real numbers: a 251 MB layer does not fit.
    with pytest.raises(package.PackageTooLarge, match="over Lambda's 250 MB limit"):
        package.check_unzipped_size({"function": 200_000, "layer": 251 * 2**20})
    assert package.check_unzipped_size({"function": 1, "layer": 250 * 2**20 - 1}) == 250 * 2**20

    # End to end with the limit at 1 MB: 2 MB of zeros compress to a 2 KB zip.
    monkeypatch.setattr(package, "UNZIPPED_LIMIT", 2**20)
    big = layer_zip(tmp_path / "big.zip", {"python/zeros.txt": "0" * (2 * 2**20)})
    assert big.stat().st_size < 20_000
    code, _, err = run(capsys, "deploy", "--name", name, "--layer-zip", str(big))
    assert code == 2 and "over Lambda's 1 MB limit" in err, err
    assert re.search(r"unzip to 2\.\d MB \(function 0\.\d MB, layer \S+ 2\.0 MB\)", err), err
    assert "nothing was uploaded" in err
    assert lam.list_layer_versions(LayerName=f"{name}-deps")["LayerVersions"] == []
    assert run(capsys, "destroy", "--yes", "--name", name)[0] == 0


class BusyLambda:
    """An HTTP proxy in front of moto's Lambda API that plays a function mid-update: the
    next `polls` GetFunctionConfiguration answers say LastUpdateStatus InProgress, and the
    next `conflicts` UpdateFunctionConfiguration calls get 409 ResourceConflictException,
    as real Lambda answers while another update runs (moto never does)."""

    def __init__(self, target: str) -> None:
        self.target = urlparse(target)
        self.polls = self.conflicts = 0
        self.seen: list[str] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def handle_one(self) -> None:
                proxy.serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = handle_one

        self.server = LoopbackServer(("127.0.0.1", 0), Handler)
        self.url = self.server.start("busy-lambda")

    def serve(self, request: BaseHTTPRequestHandler) -> None:
        body = read_body(request)
        path = urlparse(request.path).path
        kind = f"{request.command} {path.rsplit('/', 1)[-1]}"
        with self.lock:
            self.seen.append(kind)
            conflict = kind == "PUT configuration" and self.conflicts > 0
            poll = kind == "GET configuration" and self.polls > 0
            self.conflicts -= conflict
            self.polls -= poll
        if conflict:
            return self.reply(request, 409, json.dumps({
                "Type": "User", "message": "The operation cannot be performed at this time. "
                "An update is in progress for resource"}).encode(),
                [("x-amzn-ErrorType", "ResourceConflictException")])
        upstream = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=30)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        upstream.request(request.command, request.path, body=body, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        upstream.close()
        if poll and response.status == 200:
            data = json.dumps({**json.loads(data), "LastUpdateStatus": "InProgress"}).encode()
        self.reply(request, response.status, data,
                   [(k, v) for k, v in response.getheaders()
                    if k.lower() not in ("content-length", "connection", "transfer-encoding")])

    @staticmethod
    def reply(request, status: int, data: bytes, headers) -> None:
        request.send_response(status)
        for key, value in headers:
            request.send_header(key, value)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def test_update_waits_for_a_busy_function_and_retries_a_conflict(
        moto_server, config_file, lam, name, capsys, monkeypatch):
    assert run(capsys, "deploy", "--name", name, "--no-layer")[0] == 0
    busy = BusyLambda(moto_server)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", busy.url)
        busy.polls, busy.conflicts = 2, 1
        code, out, _ = run(capsys, "deploy", "--memory", "1024")
    finally:
        monkeypatch.delenv("AWS_ENDPOINT_URL_LAMBDA")
        busy.server.stop()
    assert code == 0, out
    assert "function busy with another update (attempt 1); waiting" in out
    assert lam.get_function(FunctionName=name)["Configuration"]["MemorySize"] == 1024
    # Polled through the two InProgress answers before the first try, tried, was refused,
    # waited again and tried again.
    updates = [i for i, kind in enumerate(busy.seen) if kind == "PUT configuration"]
    assert len(updates) == 2, busy.seen
    assert busy.seen[:updates[0]].count("GET configuration") >= 3
    assert busy.polls == 0 and busy.conflicts == 0
    assert run(capsys, "destroy", "--yes")[0] == 0


# -- a real layer build --------------------------------------------------------------------------

@pytest.mark.network
@pytest.mark.skipif(os.environ.get("LAMBDAFUTURES_OFFLINE") == "1",
                    reason="builds a layer from PyPI (LAMBDAFUTURES_OFFLINE=1)")
@needs_runtime
def test_layer_from_env_holds_the_host_version_compiled(moto_server, config_file, name, capsys,
                                                        monkeypatch):
    built: list[bytes] = []
    real_build = layer.build_layer_zip

    def spy(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(layer, "build_layer_zip", spy)
    six = importlib.metadata.version("six")
    code, out, _ = run(capsys, "deploy", "--name", name, "--requirements-from-env", "six")
    assert code == 0, out
    assert ".pyc compiled (unchecked-hash)" in out
    assert "environment: the layer's 1 package(s) match this host" in out
    [data] = built
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    assert f"python/__pycache__/six.{sys.implementation.cache_tag}.pyc" in names
    config = load_deployment()
    assert config["layer_packages"] == {"six": six} and config["layer_fallbacks"] == {}
    assert config["layer_pyc"] is True
    assert run(capsys, "destroy", "--yes")[0] == 0
