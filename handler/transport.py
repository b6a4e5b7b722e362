"""Object stores and reply channels, addressed by URL.

The invoke event names where blobs live (`store`) and where the completion goes (`reply`)
as URLs, so the same worker code serves every backend:

    store: file:///tmp/lambdafutures-x/   or   s3://bucket/prefix
    reply: local:                         or   https://sqs.<region>.amazonaws.com/<acct>/<q>

AWS clients come from boto3's default chain (the Lambda role, or the environment; endpoints
from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL_SQS). No credential ever travels in an event.
Clients are cached per process so a warm sandbox reuses its connections.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlparse

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def aws_client(service: str) -> Any:
    with _clients_lock:
        client = _clients.get(service)
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(service, config=Config(retries={"mode": "standard"}))
            _clients[service] = client
        return client


class FileStore:
    """An object store in a local directory (the local backend's S3)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.url = "file://" + root

    def _path(self, key: str) -> str:
        if ".." in key.split("/"):
            raise ValueError(f"object key {key!r} leaves the store")
        # One flat directory: on a disk file system, making a directory per task costs as
        # much as writing a megabyte. Escaping "%" and "/" keeps distinct keys distinct.
        return os.path.join(self.root, key.replace("%", "%25").replace("/", "%2F"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            f = open(temporary, "wb")
        except FileNotFoundError:
            os.makedirs(self.root, exist_ok=True)
            f = open(temporary, "wb")
        with f:
            f.write(data)
        os.replace(temporary, path)  # readers never see half an object

    def get(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                os.remove(self._path(key))
            except FileNotFoundError:
                pass


class S3Store:
    """An object store under one prefix of one S3 bucket."""

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client if client is not None else aws_client("s3")
        self.url = f"s3://{bucket}/{self.prefix}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def delete(self, keys: Iterable[str]) -> None:
        keys = [self._key(key) for key in keys]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch,
                                                                   "Quiet": True})

    def delete_prefix(self, sub_prefix: str) -> int:
        """Delete every object under `sub_prefix`; returns how many."""
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(sub_prefix)):
            keys.extend(item["Key"] for item in page.get("Contents", ()))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch,
                                                                   "Quiet": True})
        return len(keys)


_stores: dict[str, Any] = {}


def open_store(url: str) -> FileStore | S3Store:
    store = _stores.get(url)
    if store is None:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            store = FileStore(parsed.path)
        elif parsed.scheme == "s3":
            store = S3Store(parsed.netloc, parsed.path)
        else:
            raise ValueError(f"unknown object store {url!r}")
        _stores[url] = store
    return store


# The local worker loop installs the function that carries completions back to its host.
_local_reply: Callable[[dict], None] | None = None


def set_local_reply(send: Callable[[dict], None] | None) -> None:
    global _local_reply
    _local_reply = send


def send_reply(url: str, message: dict[str, Any]) -> None:
    if url == "local:":
        if _local_reply is None:
            raise RuntimeError("reply address 'local:' outside a local worker")
        _local_reply(message)
    elif url.startswith(("https://", "http://")):
        aws_client("sqs").send_message(QueueUrl=url, MessageBody=json.dumps(message))
    else:
        raise ValueError(f"unknown reply address {url!r}")
