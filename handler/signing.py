"""Signing of the wire protocol's messages (see protocol.py for the messages themselves).

An executor's key signs a fixed list of each message's fields, behind a label per direction,
so an event's signature can never pass for a completion's, and a blob is bound by its
SHA-256 (one of the signed fields), not by signing its bytes again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

_EVENT_DOMAIN = b"lambdafutures/3/event\n"
_COMPLETION_DOMAIN = b"lambdafutures/3/completion\n"
# Signed text is a JSON list of fixed fields: compact, and the same bytes on both ends (a
# float survives a JSON round trip exactly, and a dict's keys keep the order in which the
# signer wrote them: JSON and pickle both keep it, so sorting them would only cost time).
_canonical = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def new_key() -> bytes:
    return os.urandom(32)


def key_object(executor: str) -> str:
    """Where the executor's key lives in the object store (never in a message)."""
    return f"{executor}/key"


def digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _mac(key: bytes, domain: bytes, fields: list) -> str:
    return hmac.digest(key, domain + _canonical(fields).encode(), "sha256").hex()


def _event_fields(event: dict[str, Any]) -> list:
    host = event.get("host") or {}
    return [event.get("v"), event.get("executor"), event.get("task"), event.get("attempt"),
            "stored" in (event.get("payload") or {}), event.get("payload_sha256"),
            event.get("store"), event.get("reply"), event.get("inline_limit"),
            host.get("python"), host.get("cloudpickle"), event.get("submitted_at"),
            event.get("timeout"), event.get("expires_at"), event.get("output_limit")]


def _completion_fields(message: dict[str, Any]) -> list:
    return [message.get("v"), message.get("executor"), message.get("task"),
            message.get("attempt"), message.get("status"),
            "stored" in (message.get("result") or {}), message.get("result_sha256"),
            message.get("error"), message.get("stats"), message.get("output")]


def sign_event(key: bytes, event: dict[str, Any]) -> None:
    event["sig"] = _mac(key, _EVENT_DOMAIN, _event_fields(event))


def event_is_signed(key: bytes, event: dict[str, Any]) -> bool:
    return _is_signed(key, _EVENT_DOMAIN, _event_fields, event)


def sign_completion(key: bytes, message: dict[str, Any]) -> dict[str, Any]:
    message["sig"] = _mac(key, _COMPLETION_DOMAIN, _completion_fields(message))
    return message


def completion_is_signed(key: bytes, message: dict[str, Any]) -> bool:
    return _is_signed(key, _COMPLETION_DOMAIN, _completion_fields, message)


def _is_signed(key: bytes, domain: bytes, fields: Any, message: dict[str, Any]) -> bool:
    signature = message.get("sig")
    try:
        expected = _mac(key, domain, fields(message))
    except (TypeError, ValueError, RecursionError):  # values no signer could have written
        return False
    return isinstance(signature, str) and hmac.compare_digest(expected, signature)
