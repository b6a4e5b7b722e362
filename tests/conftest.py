"""Fixtures: real servers for the AWS path, and executors for every backend.

The moto server runs in this test process on a free port of 127.0.0.1; boto3 reaches it
over HTTP through the standard AWS_ENDPOINT_URL variables, with dummy credentials.
"""

from __future__ import annotations

import os

import pytest

AWS_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_server():
    """A moto server on 127.0.0.1; yields its base URL. The environment points boto3 at it."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in [*AWS_DUMMY_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_DUMMY_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def aws_stack(moto_server, tmp_path_factory):
    """The AWS backend's stack: moto for S3/SQS/IAM/Lambda control plane, plus the project's
    Lambda endpoint that runs invocations in real worker processes, deployed into with
    `lambdafutures deploy`. Sets the environment so LambdaExecutor(backend="aws") uses it."""
    from lambdafutures.testing.stack import start_stack

    saved = dict(os.environ)
    stack = start_stack(moto_url=moto_server, name=f"lf-test-{os.getpid()}", concurrency=4,
                        function_timeout=30,
                        config_dir=str(tmp_path_factory.mktemp("lambdafutures-config")))
    yield stack
    stack.stop()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(params=["local", "aws"])
def backend(request) -> str:
    """Each backend in turn; the public-API suite runs against all of them."""
    if request.param == "aws":
        request.getfixturevalue("aws_stack")
    return request.param


@pytest.fixture
def make_executor(backend):
    """make_executor(**kwargs) -> LambdaExecutor on the current backend, shut down after."""
    from lambdafutures import LambdaExecutor

    made = []

    def make(*args, **kwargs):
        executor = LambdaExecutor(*args, backend=backend, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


# -- for the deploy tests ------------------------------------------------------------------------

@pytest.fixture
def name() -> str:
    """A fresh deployment name, so that tests never share AWS resources."""
    import uuid

    return f"d{uuid.uuid4().hex[:10]}"


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Where `lambdafutures deploy` writes, and LambdaExecutor reads, the deployment config."""
    path = tmp_path / "config.json"
    monkeypatch.setenv("LAMBDAFUTURES_CONFIG", str(path))
    return path


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The fault-injection figures (tests/test_faults.py) as a Markdown table."""
    table = getattr(config, "_lambdafutures_fault_table", None)
    if table:
        terminalreporter.write_sep("=", "fault injection")
        terminalreporter.write_line(table)
