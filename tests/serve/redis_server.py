"""A throwaway `redis-server` for tests: free loopback port, temp dir, no persistence.

    with redis_server() as url: ...             # a context manager (wrap it in a pytest fixture)
    server = new_redis_server(); server.start(); server.stop(); server.start()   # same port again

Without a `redis-server` binary the tests that need one FAIL with the install command, unless
ORTHRUS_ALLOW_NO_REDIS=1 says skipping them is fine on this machine.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
from support.net import free_port

ALLOW_NO_REDIS = "ORTHRUS_ALLOW_NO_REDIS"
INSTALL = "apt-get install -y redis-server"


class RedisNotInstalled(RuntimeError):
    pass


class RedisServer:
    def __init__(self, port: int | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RedisNotInstalled(f"redis-server not found on PATH (Debian: {INSTALL})")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="orthrus-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 5.0) -> str:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--loglevel", "warning", "--logfile", "redis.log"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self._ping():
                return self.url
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def new_redis_server(port: int | None = None) -> RedisServer:
    """A RedisServer; without the binary the calling test fails (or skips, with ORTHRUS_ALLOW_NO_REDIS=1)."""
    try:
        return RedisServer(port)
    except RedisNotInstalled as e:
        if os.environ.get(ALLOW_NO_REDIS) == "1":
            pytest.skip(f"{e}; skipped as {ALLOW_NO_REDIS}=1")
        pytest.fail(f"{e}. Install it, or set {ALLOW_NO_REDIS}=1 to skip the Redis tests", pytrace=False)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Start a server, yield its URL, stop it and remove its directory."""
    for attempt in range(3):  # a free port can be taken by someone else before the server binds it
        server = new_redis_server()
        try:
            server.start()
            break
        except RuntimeError:
            server.close()
            if attempt == 2:
                raise
    try:
        yield server.url
    finally:
        server.close()
