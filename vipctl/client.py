"""The CLI's requests to the gateway: vipwire's control client, with a clear error when
a request is built wrongly (an unknown op or a mistyped field is our bug, said in one line)."""

from __future__ import annotations

from typing import Callable

from clustercore.errors import LocalControlError
from clustercore.messages import REGISTRY, Message, Progress
from vipwire.client import ControlClient, default_socket  # noqa: F401  (re-exported)
from vipwire.client import call as _call


def call(request: Message | str, socket_path: str | None = None, timeout: float = 30.0,
         on_progress: Callable[[dict], None] | None = None, **fields):
    """Send one request (a clustercore.messages message, or its op name and fields) and
    return its result; progress lines go to `on_progress` as {"step", "detail"}."""
    if isinstance(request, str):
        cls = REGISTRY.get(request)
        if cls is None:
            raise LocalControlError(f"unknown request '{request}'")
        request = cls(**fields)
    elif fields:
        raise LocalControlError("pass either a message or an op name with fields, not both")
    relay = None
    if on_progress is not None:
        def relay(p: Progress) -> None:
            on_progress({"step": p.step, "detail": p.detail})
    return _call(request, socket_path, timeout, relay)
