"""A whole AWS stack on this machine: a moto server, the Lambda endpoint, and a deployment.

For tests and for a local trial of the AWS backend without an account:

    python -m lambdafutures.testing.stack            # prints the environment to export

The environment it sets (or prints) makes LambdaExecutor(backend="aws") talk to moto for
S3 and SQS and to the Lambda endpoint for invokes, with a deployment config of its own.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from .lambda_endpoint import LambdaEndpoint

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


@dataclass
class Stack:
    moto_url: str
    lambda_url: str
    config_path: str
    config: dict[str, Any]
    endpoint: LambdaEndpoint
    env: dict[str, str] = field(default_factory=dict)
    _moto: Any = None

    def stop(self) -> None:
        self.endpoint.stop()
        if self._moto is not None:
            self._moto.stop()


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def start_stack(*, moto_url: str | None = None, name: str = "lambdafutures-test",
                region: str = "us-east-1", concurrency: int = 4, function_timeout: int = 60,
                latency_s: float = 0.0, run: bool = True,
                config_dir: str | None = None) -> Stack:
    """Start (or join) a moto server, start the Lambda endpoint, deploy into them, and point
    this process's environment at the result."""
    moto = None
    if moto_url is None:
        moto, moto_url = start_moto()
    for variable, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(variable, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    endpoint = LambdaEndpoint(moto_url, concurrency=concurrency, latency_s=latency_s, run=run)
    lambda_url = endpoint.start()
    env = {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ENDPOINT_URL_LAMBDA": lambda_url,
        "AWS_DEFAULT_REGION": region,
    }
    os.environ.update(env)
    config_dir = config_dir or tempfile.mkdtemp(prefix="lambdafutures-stack-")
    config_path = os.path.join(config_dir, "config.json")
    env["LAMBDAFUTURES_CONFIG"] = config_path
    os.environ["LAMBDAFUTURES_CONFIG"] = config_path
    config = deploy_for_tests(name=name, region=region, timeout=function_timeout,
                              config_path=config_path)
    return Stack(moto_url, lambda_url, config_path, config, endpoint, env, moto)


def deploy_for_tests(*, name: str, region: str, timeout: int, config_path: str) -> dict:
    """Deploy with `lambdafutures deploy` (without the numpy layer: the endpoint's workers
    import the host's packages) and return the config it wrote."""
    from lambdafutures import config as lf_config
    from lambdafutures.deploy import cli

    code = cli.main(["deploy", "--name", name, "--region", region, "--timeout", str(timeout),
                     "--no-layer"])
    if code not in (0, None):
        raise RuntimeError(f"lambdafutures deploy failed with exit code {code}")
    from pathlib import Path

    deployed = lf_config.load_deployment(Path(config_path))
    assert deployed is not None
    return deployed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lambdafutures.testing.stack",
        description="Run moto plus lambdafutures' Lambda endpoint, deployed, until Ctrl-C.")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2,
                        help="worker processes behind the Lambda endpoint")
    parser.add_argument("--timeout", type=int, default=300, help="function timeout, seconds")
    args = parser.parse_args(argv)
    stack = start_stack(concurrency=args.concurrency, function_timeout=args.timeout)
    print("# moto and the Lambda endpoint are running; in another shell:")
    for variable, value in {**DUMMY_CREDENTIALS, **stack.env}.items():
        print(f"export {variable}={value}")
    print("# then: python benchmarks/dgemm.py --backend aws", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
