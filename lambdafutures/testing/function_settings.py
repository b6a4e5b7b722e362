"""What the Lambda endpoint knows about functions, read from moto's control plane.

moto stores functions, their reserved concurrency (PutFunctionConcurrency) and their async
invoke config, but runs none of them; the endpoint reads these settings here, cached for a
couple of seconds so that a changed setting takes effect soon, as in Lambda.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import boto3

_TTL_S = 2.0
DEFAULT_MAX_EVENT_AGE_S = 21600  # Lambda's default: 6 hours
DEFAULT_MAX_RETRIES = 2           # Lambda's default for async invokes


@dataclass
class FunctionSettings:
    name: str
    region: str
    arn: str
    timeout: float
    memory: int
    variables: dict[str, str]
    failure_queue_url: str | None
    reserved: int | None
    max_event_age_s: float
    max_retries: int
    loaded_at: float = field(default_factory=time.monotonic)

    @property
    def sandbox_key(self) -> tuple:
        """What a sandbox is made from: a change means new sandboxes, as in Lambda."""
        return (self.timeout, self.memory, tuple(sorted(self.variables.items())))


class FunctionCatalog:
    def __init__(self, moto_url: str, *,
                 max_event_age_s: float | dict[str, float] | None = None) -> None:
        self.moto_url = moto_url
        # moto keeps the first event invoke config it was given (updates are not visible
        # through it) and boto3 refuses ages under 60 s, so tests set the age they need
        # here: for every function, or by function name.
        self.max_event_age_override = max_event_age_s
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}
        self._functions: dict[tuple[str, str], FunctionSettings] = {}
        self._reserved_totals: dict[str, tuple[float, int, int]] = {}

    def client(self, service: str, region: str) -> Any:
        with self._lock:
            key = (service, region)
            if key not in self._clients:
                self._clients[key] = boto3.client(service, endpoint_url=self.moto_url,
                                                  region_name=region)
            return self._clients[key]

    def get(self, region: str, name: str, *, fresh: bool = True) -> FunctionSettings:
        """The function's settings (reloaded when older than a few seconds and `fresh`);
        raises moto's ResourceNotFoundException for an unknown function."""
        name = name.split(":")[6] if name.startswith("arn:") else name
        with self._lock:
            known = self._functions.get((region, name))
        if known is not None and (not fresh or time.monotonic() - known.loaded_at < _TTL_S):
            return known
        settings = self._load(region, name)
        with self._lock:
            self._functions[(region, name)] = settings
        return settings

    def _load(self, region: str, name: str) -> FunctionSettings:
        lam = self.client("lambda", region)
        config = lam.get_function_configuration(FunctionName=name)
        reserved = lam.get_function_concurrency(FunctionName=name).get(
            "ReservedConcurrentExecutions")
        try:
            invoke_config = lam.get_function_event_invoke_config(FunctionName=name)
        except lam.exceptions.ResourceNotFoundException:
            invoke_config = {}
        destination = ((invoke_config.get("DestinationConfig") or {}).get("OnFailure")
                       or {}).get("Destination")
        override = self.max_event_age_override
        if isinstance(override, dict):
            override = override.get(name)
        max_age = override or invoke_config.get("MaximumEventAgeInSeconds") \
            or DEFAULT_MAX_EVENT_AGE_S
        max_retries = invoke_config.get("MaximumRetryAttempts")
        return FunctionSettings(
            name=name, region=region, arn=config["FunctionArn"],
            timeout=float(config.get("Timeout", 3)), memory=int(config.get("MemorySize", 128)),
            variables=dict((config.get("Environment") or {}).get("Variables") or {}),
            failure_queue_url=self._queue_url(region, destination),
            reserved=reserved, max_event_age_s=float(max_age),
            max_retries=DEFAULT_MAX_RETRIES if max_retries is None else int(max_retries))

    def _queue_url(self, region: str, arn: str | None) -> str | None:
        if not arn or ":sqs:" not in arn:
            return None
        _, _, _, queue_region, account, queue_name = arn.split(":", 5)
        return self.client("sqs", queue_region or region).get_queue_url(
            QueueName=queue_name, QueueOwnerAWSAccountId=account)["QueueUrl"]

    def reserved_total(self, region: str) -> tuple[int, int]:
        """(the sum of every function's reserved concurrency in `region`, the function
        count), cached like the settings."""
        with self._lock:
            cached = self._reserved_totals.get(region)
        if cached is not None and time.monotonic() - cached[0] < _TTL_S:
            return cached[1], cached[2]
        lam = self.client("lambda", region)
        total = count = 0
        for page in lam.get_paginator("list_functions").paginate():
            for function in page.get("Functions", []):
                count += 1
                try:
                    reserved = lam.get_function_concurrency(
                        FunctionName=function["FunctionName"]).get("ReservedConcurrentExecutions")
                except lam.exceptions.ResourceNotFoundException:
                    continue  # deleted meanwhile
                total += reserved or 0
        with self._lock:
            self._reserved_totals[region] = (time.monotonic(), total, count)
        return total, count

    def forget(self) -> None:
        with self._lock:
            self._functions.clear()
            self._reserved_totals.clear()
