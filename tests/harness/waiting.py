"""One way to wait for a condition: poll it, and fail with what was awaited once the deadline passes."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 10.0,
    what: str | Callable[[], str] | None = None,
    interval: float = 0.02,
    retry_on: tuple[type[BaseException], ...] = (),
) -> T:
    """condition()'s first truthy value. At the deadline, AssertionError naming `what` (a callable is asked
    then, so it can describe the state it found; none given: the condition's source line). Exceptions in
    `retry_on` (a server not up yet) count as not yet; any other propagates."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except retry_on:
            pass
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {_describe(what, condition)}")
        time.sleep(interval)


def _describe(what, condition) -> str:
    if callable(what):
        return what()
    if what is not None:
        return what
    try:
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)
