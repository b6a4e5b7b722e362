"""The environment a Lambda sandbox starts with, for the endpoint's local sandboxes.

Lambda does not pass its host's environment: a sandbox sees the variables Lambda defines
(function name, memory, version, log group and stream, region, the runtime's identity, task
and runtime directories, TZ, LANG, PATH, the execution role's credentials) plus the
function's own `Environment.Variables`. The same here, with what a local run needs on top:
endpoint URLs pointing at moto (and at the endpoint itself, for executors nested in tasks),
dummy credentials in place of the role's, and the host's interpreter and PYTHONPATH so that
the real handler imports. Nothing else of the host leaks in (BLAS thread counts included:
the worker chooses them itself, see handler/sandbox.py).
"""

from __future__ import annotations

import datetime
import os
import sys
import uuid

from ..backends.local.processes import with_changes

HANDLER = "lambdafutures_handler.worker.handle"

# Stand-ins for the credentials of the function's execution role.
ROLE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


def runtime_name() -> str:
    """Lambda's runtime identifier for this interpreter, e.g. python3.11."""
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def lambda_environment(
    *,
    function_name: str,
    memory_mb: int,
    region: str,
    moto_url: str,
    lambda_url: str | None,
    task_root: str,
    function_variables: dict[str, str] | None = None,
    extra: dict[str, str | None] | None = None,
    version: str = "$LATEST",
) -> dict[str, str]:
    """A sandbox's environment. `function_variables` are the function's configured ones
    (they cannot override Lambda's reserved names, as in Lambda); `extra` goes on last for
    tests (a None value removes a variable)."""
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y/%m/%d")
    interpreter_dir = os.path.dirname(sys.executable)
    env: dict[str, str] = dict(function_variables or {})
    env.update({
        "AWS_LAMBDA_FUNCTION_NAME": function_name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "AWS_LAMBDA_FUNCTION_VERSION": version,
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function_name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": f"{today}/[{version}]{uuid.uuid4().hex}",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_EXECUTION_ENV": f"AWS_Lambda_{runtime_name()}",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": _runtime_dir(),
        "_HANDLER": HANDLER,
        "TZ": ":UTC",
        "LANG": "en_US.UTF-8",
        "PATH": os.pathsep.join([interpreter_dir, "/usr/local/bin", "/usr/bin", "/bin"]),
        "PYTHONUNBUFFERED": "1",
        **ROLE_CREDENTIALS,
        # The local stand-ins for AWS's endpoints.
        "AWS_ENDPOINT_URL": moto_url,
    })
    if lambda_url:
        env["AWS_ENDPOINT_URL_LAMBDA"] = lambda_url
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return with_changes(env, extra)


def without_host(env: dict[str, str]) -> dict[str, str | None]:
    """`env` as overrides for a pool that starts from the host's environment (WorkerPool):
    every other host variable removed."""
    removals: dict[str, str | None] = {name: None for name in os.environ if name not in env}
    return {**removals, **env}


def _runtime_dir() -> str:
    try:
        import awslambdaric
    except ImportError:
        return os.path.dirname(os.path.dirname(os.__file__))
    return os.path.dirname(os.path.dirname(awslambdaric.__file__))
