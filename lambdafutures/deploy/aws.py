"""AWS access for the deploy commands: clients from one boto3 session, error helpers, and the
retry policy for IAM's propagation delay.

Endpoints are never written here: boto3 finds them (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>,
profiles), so the same commands run against AWS, a moto server or LocalStack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import boto3
import tenacity
from botocore.config import Config
from botocore.exceptions import ClientError

log = logging.getLogger("lambdafutures")

_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8})


class Aws:
    """Clients for one account and region, all from one session."""

    def __init__(self, profile: str | None = None, region: str | None = None) -> None:
        self.session = boto3.Session(profile_name=profile, region_name=region)
        if not self.session.region_name:
            raise ValueError("no AWS region: pass --region or set AWS_REGION / a profile region")
        self.region: str = self.session.region_name
        self._clients: dict[str, Any] = {}
        self._identity: dict[str, str] | None = None

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self.session.client(service, config=_CONFIG)
        return self._clients[service]

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def iam(self) -> Any:
        return self.client("iam")

    @property
    def lam(self) -> Any:
        return self.client("lambda")

    @property
    def logs(self) -> Any:
        return self.client("logs")

    def identity(self) -> dict[str, str]:
        """Account id and partition of the caller (the partition comes from the caller's ARN,
        so China and GovCloud accounts get the right resource ARNs)."""
        if self._identity is None:
            caller = self.client("sts").get_caller_identity()
            self._identity = {"account_id": caller["Account"],
                              "partition": caller["Arn"].split(":")[1]}
        return self._identity


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_error(exc: BaseException, *codes: str) -> bool:
    return error_code(exc) in codes


# -- IAM propagation ------------------------------------------------------------------------
# A new role (or a new inline policy) takes seconds to reach Lambda. Until then Lambda refuses
# CreateFunction ("The role defined for the function cannot be assumed by Lambda") and refuses
# an SQS destination ("The provided execution role does not have permissions to call
# SendMessage on SQS"). Both are InvalidParameterValueException, which is otherwise a real,
# permanent error, so only these messages are retried.
_PROPAGATION_MESSAGES = (
    "cannot be assumed by lambda",
    "execution role does not have permissions",
)


def is_iam_propagation_delay(exc: BaseException) -> bool:
    if not is_error(exc, "InvalidParameterValueException"):
        return False
    message = str(exc.response.get("Error", {}).get("Message", "")).lower()  # type: ignore[attr-defined]
    return any(text in message for text in _PROPAGATION_MESSAGES)


# Real AWS usually needs ~10 s; give it up to two minutes, then report the error.
IAM_PROPAGATION = tenacity.Retrying(
    retry=tenacity.retry_if_exception(is_iam_propagation_delay),
    wait=tenacity.wait_exponential(multiplier=1, min=1, max=15),
    stop=tenacity.stop_after_delay(120),
    reraise=True,
)


def retry_iam_propagation(call: Callable[[], Any],
                          on_wait: Callable[[str], None] | None = None,
                          policy: tenacity.Retrying = IAM_PROPAGATION) -> Any:
    """Run `call`, retrying while IAM changes propagate; `on_wait` hears each retry."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        message = (f"waiting for IAM to propagate (attempt {state.attempt_number}, "
                   f"next in {state.next_action.sleep:.0f}s)" if state.next_action else
                   "waiting for IAM to propagate")
        log.debug(message)
        if on_wait is not None:
            on_wait(message)

    return policy.copy(before_sleep=before_sleep)(call)
