"""Hand-built invoke events of the current protocol, for driving the worker directly."""

from __future__ import annotations

import time
import uuid

import cloudpickle

from lambdafutures_handler import protocol
from lambdafutures_handler.transport import open_store


def new_executor_id() -> str:
    return uuid.uuid4().hex[:16]


_keys: dict[tuple[str, str], bytes] = {}


def signed_event(store: str, reply: str, executor: str, task: int, data: bytes,
                 key: bytes | None = None, **changes) -> tuple[dict, bytes]:
    """An invoke event for payload bytes `data`, signed with `key` (by default the executor's own,
    written where workers read it); `changes` are applied after signing. Returns (event, key)."""
    if key is None:
        key = _keys.get((store, executor))
    if key is None:
        key = _keys[(store, executor)] = protocol.new_key()
        open_store(store).put(protocol.key_object(executor), key)
    event = protocol.make_event(
        key=key, executor=executor, task=task, attempt=0, payload=protocol.inline_blob(data),
        payload_sha256=protocol.digest(data), store=store, reply=reply, timeout=None,
        submitted_at=time.time(), expires_at=None, limit=protocol.DEFAULT_INLINE_LIMIT)
    event.update(changes)
    return event, key


def call_payload(fn, *args, **kwargs) -> bytes:
    return cloudpickle.dumps((fn, [(args, kwargs)], False))
