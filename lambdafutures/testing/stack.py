"""A whole AWS stack on this machine: a moto server, the Lambda endpoint, and a deployment.

For tests and for a local trial of the AWS backend without an account:

    python -m lambdafutures.testing.stack            # prints the environment to export
    python -m lambdafutures.testing.stack --harsh    # Lambda's limits and CPU share too

The environment it sets (or prints) makes LambdaExecutor(backend="aws") talk to moto for
S3 and SQS and to the Lambda endpoint for invokes, with a deployment config of its own. The
sandboxes get the same (their AWS_ENDPOINT_URL_LAMBDA is the endpoint, LAMBDAFUTURES_CONFIG
the stack's config), so an executor created inside a task runs its tasks on the stack too.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

from .lambda_endpoint import DEFAULT_ACCOUNT_CONCURRENCY, LambdaEndpoint

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}
# A new account's concurrency is far below the default 1,000; the harsh trial uses this.
HARSH_ACCOUNT_CONCURRENCY = 10


@dataclass
class Stack:
    moto_url: str
    lambda_url: str
    config_path: str
    config: dict[str, Any]
    endpoint: LambdaEndpoint
    env: dict[str, str] = field(default_factory=dict)
    _moto: Any = None
    _owned_dir: str | None = None

    def stop(self) -> None:
        self.endpoint.stop()
        if self._moto is not None:
            self._moto.stop()
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def start_stack(*, moto_url: str | None = None, name: str = "lambdafutures-test",
                region: str = "us-east-1", concurrency: int = 4, function_timeout: int = 60,
                latency_s: float = 0.0, run: bool = True, config_dir: str | None = None,
                harsh: bool = False, account_concurrency: int | None = None,
                reserved_concurrency: int | None = None, memory_mb: int | None = None,
                time_scale: float = 1.0,
                max_event_age_s: float | dict[str, float] | None = None,
                cpu_quota: bool | None = None,
                worker_env: dict[str, str | None] | None = None) -> Stack:
    """Start (or join) a moto server, start the Lambda endpoint, deploy into them, and point
    this process's environment at the result.

    The fast setting (default) runs `concurrency` worker processes per function with no
    limits. `harsh=True` enforces `account_concurrency` (default 10, a new account's) and
    the function's `reserved_concurrency` through Lambda's async queue, with its backoff
    (times `time_scale`) and max event age (`max_event_age_s` overrides the function's),
    and gives each sandbox its `memory_mb`'s CPU share (`cpu_quota`, default on). See
    lambda_endpoint.py."""
    moto = None
    if moto_url is None:
        moto, moto_url = start_moto()
    for variable, value in DUMMY_CREDENTIALS.items():
        os.environ.setdefault(variable, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", region)
    owned_dir = None
    if config_dir is None:
        config_dir = owned_dir = tempfile.mkdtemp(prefix="lambdafutures-stack-")
    config_path = os.path.join(config_dir, "config.json")
    if account_concurrency is None:
        account_concurrency = HARSH_ACCOUNT_CONCURRENCY if harsh else DEFAULT_ACCOUNT_CONCURRENCY
    endpoint = LambdaEndpoint(
        moto_url, concurrency=concurrency, latency_s=latency_s, run=run, harsh=harsh,
        account_concurrency=account_concurrency, time_scale=time_scale,
        max_event_age_s=max_event_age_s, cpu_quota=cpu_quota, region=region,
        # Executors created inside tasks find this stack's deployment.
        worker_env={"LAMBDAFUTURES_CONFIG": config_path, **(worker_env or {})})
    lambda_url = endpoint.start()
    env = {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ENDPOINT_URL_LAMBDA": lambda_url,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "LAMBDAFUTURES_CONFIG": config_path,
    }
    os.environ.update(env)
    try:
        config = deploy_for_tests(name=name, region=region, timeout=function_timeout,
                                  memory_mb=memory_mb, reserved_concurrency=reserved_concurrency)
    except BaseException:
        endpoint.stop()
        if moto is not None:
            moto.stop()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
        raise
    return Stack(moto_url, lambda_url, config_path, config, endpoint, env, moto, owned_dir)


def deploy_for_tests(*, name: str, region: str, timeout: int, config_path: str | None = None,
                     memory_mb: int | None = None,
                     reserved_concurrency: int | None = None) -> dict:
    """Deploy with `lambdafutures deploy` (without the numpy layer: the endpoint's workers
    import the host's packages) and return the config it wrote (to LAMBDAFUTURES_CONFIG)."""
    from pathlib import Path

    from lambdafutures import config as lf_config
    from lambdafutures.deploy import cli

    # The endpoint is not Lambda: it runs this host's Python whatever Lambda's runtime
    # calendar says (deploy would refuse python3.11 from 2027-07-31).
    argv = ["deploy", "--name", name, "--region", region, "--timeout", str(timeout),
            "--no-layer", "--ignore-runtime-dates"]
    if memory_mb is not None:
        argv += ["--memory", str(memory_mb)]
    if reserved_concurrency is not None:
        argv += ["--reserved-concurrency", str(reserved_concurrency)]
    code = cli.main(argv)
    if code not in (0, None):
        raise RuntimeError(f"lambdafutures deploy failed with exit code {code}")
    deployed = lf_config.load_deployment(Path(config_path) if config_path else None)
    assert deployed is not None
    return deployed


def _quiet(verbose: bool) -> None:
    """HTTP access lines (moto's werkzeug, the endpoint's) only with --verbose."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        logging.getLogger("lambdafutures").setLevel(logging.DEBUG)
    else:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lambdafutures.testing.stack",
        description="Run moto plus lambdafutures' Lambda endpoint, deployed, until Ctrl-C.")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2,
                        help="worker processes per function behind the endpoint (fast setting)")
    parser.add_argument("--timeout", type=int, default=300, help="function timeout, seconds")
    parser.add_argument("--harsh", action="store_true",
                        help="Lambda's concurrency limits, async queue and CPU share by memory")
    parser.add_argument("--account-concurrency", type=int,
                        help=f"account concurrency limit (default {HARSH_ACCOUNT_CONCURRENCY} "
                             f"with --harsh, else {DEFAULT_ACCOUNT_CONCURRENCY})")
    parser.add_argument("--reserved-concurrency", type=int, help="the function's reservation")
    parser.add_argument("--memory", type=int, dest="memory_mb", help="function memory, MB")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiplies Lambda's throttle backoff and retry delays")
    parser.add_argument("--max-event-age", type=float, dest="max_event_age_s",
                        help="overrides the function's maximum event age, seconds")
    parser.add_argument("--verbose", action="store_true", help="show HTTP access lines")
    args = parser.parse_args(argv)
    _quiet(args.verbose)
    stack = start_stack(concurrency=args.concurrency, function_timeout=args.timeout,
                        harsh=args.harsh, account_concurrency=args.account_concurrency,
                        reserved_concurrency=args.reserved_concurrency, memory_mb=args.memory_mb,
                        time_scale=args.time_scale, max_event_age_s=args.max_event_age_s)
    try:
        print("# moto and the Lambda endpoint are running; in another shell:")
        for variable, value in {**DUMMY_CREDENTIALS, **stack.env}.items():
            print(f"export {variable}={value}")
        print(f"# then: {sys.executable} benchmarks/dgemm.py --backend aws", flush=True)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        try:
            stopped.wait()
        except KeyboardInterrupt:
            pass
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
