"""Serialisation of a VM's saved state (plain data from `Vm.save_state()`).

The state is a tree of dicts, lists, strings, ints, bools, None and bytes (raw
KVM structs). It is written as canonical JSON (sorted keys, no whitespace) with
bytes wrapped as {"$b64": "..."}, so the same state always gives the same bytes
(and so the same blob id in the repository), and any tool can read it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from snapvisor.errors import SnapvisorError

_BYTES_KEY = "$b64"


class StateCodecError(SnapvisorError):
    """Saved VM state that cannot be read back."""


def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES_KEY: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise StateCodecError(f"VM state key {key!r} is not a string; state must be plain data")
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise StateCodecError(f"VM state holds a {type(value).__name__}, which is not plain data")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES_KEY}:
            try:
                return base64.b64decode(value[_BYTES_KEY], validate=True)
            except (ValueError, TypeError) as exc:
                raise StateCodecError(f"VM state holds malformed bytes: {exc}") from None
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def encode_state(state: dict) -> bytes:
    return json.dumps(_to_json(state), sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_state(data: bytes) -> dict:
    try:
        tree = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateCodecError(f"saved VM state is not valid JSON ({exc}); the snapshot is damaged: run `snapvisor verify`") from None
    if not isinstance(tree, dict):
        raise StateCodecError("saved VM state is not an object; the snapshot is damaged: run `snapvisor verify`")
    return _from_json(tree)
