"""The API key: read from an environment variable by the process that checks it (never from a
config), sent as `Authorization: Bearer <key>` (an HTTP header or gRPC metadata)."""

import hmac
import os

DEFAULT_API_KEY_ENV = "ORTHRUS_API_KEY"


def key_from_env(env_name: str | None = DEFAULT_API_KEY_ENV) -> str | None:
    """The key in `env_name`, or None when the name is None or the variable is unset or empty."""
    return (os.environ.get(env_name) or None) if env_name else None


def bearer(key: str) -> str:
    return f"Bearer {key}"


def add_api_key_argument(parser) -> None:
    parser.add_argument("--api-key", help=f"the API key (default: ${DEFAULT_API_KEY_ENV}); "
                        "prefer the variable: a flag shows in the process list")


class ApiKey:
    """What the ingress checks requests against. Its repr never shows the key."""

    def __init__(self, key: str | None):
        self._key = key.encode() if key else None

    @classmethod
    def from_env(cls, env_name: str | None) -> "ApiKey":
        return cls(key_from_env(env_name))

    @property
    def required(self) -> bool:
        return self._key is not None

    def accepts(self, authorization: str | None) -> bool:
        """True when no key is configured or `authorization` is `Bearer <the key>`."""
        if self._key is None:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self._key)  # constant time: no timing oracle

    def __repr__(self) -> str:
        return f"ApiKey(required={self.required})"


def grpc_authorization(grpc_context) -> str | None:
    """The `authorization` metadata of a gRPC call (keys arrive lower-case)."""
    for key, value in grpc_context.invocation_metadata():
        if key == "authorization":
            return value
    return None
