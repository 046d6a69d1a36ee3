"""Network and polling helpers for the tests that start servers or clusters."""

import socket
import time

import pytest


def free_port() -> int:
    """A loopback port free right now (another process may still take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout_s: float, what, interval_s: float = 0.1):
    """Poll `cond` until it returns a true value, and return that value; fail the test after `timeout_s`.
    `what` (a string, or a callable giving one at the time of failure) says what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")
        time.sleep(interval_s)
