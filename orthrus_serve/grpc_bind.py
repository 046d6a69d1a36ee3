"""Ray Serve's gRPC proxy on the config's `host`, as its HTTP proxy is.

Ray Serve 2.60 has no bind address for gRPC: `start_grpc_server` (ray/serve/_private/grpc_util.py) binds
"[::]:<port>", every interface, through `ray.serve._private.default_impl.add_grpc_address`, which it imports
when it runs, in the proxy actor's process. `orthrus-serve up` starts its Ray job with `runtime_env(host)`:
every worker of the job (the Serve controller, and the proxies it starts, inherit the job's runtime env) runs
`bind_to_host` first, which swaps that function for one that binds `<host>:<port>`. A cluster deployed from a
Serve config (cluster/, KubeRay) does not run it: its proxies bind every interface (its pods' host is 0.0.0.0).
"""

import os

HOST_ENV = "ORTHRUS_GRPC_HOST"


def runtime_env(host: str) -> dict:
    """`ray.init`'s runtime_env for a job whose gRPC proxies bind `host`."""
    return {"worker_process_setup_hook": f"{__name__}.bind_to_host", "env_vars": {HOST_ENV: host}}


def address(host: str, port: str) -> str:
    """gRPC's bind address: an IPv6 literal in brackets. gRPC binds "0.0.0.0" as it binds "::" (every interface,
    IPv4 and IPv6) and "127.0.0.1" on an IPv6 socket (the IPv4-mapped ::ffff:127.0.0.1: IPv4 loopback only)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_to_host() -> None:
    """Ray's worker_process_setup_hook: gRPC servers Serve starts in this process bind $ORTHRUS_GRPC_HOST
    (unset: Ray's own "[::]")."""
    host = os.environ.get(HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl

    ray_add_grpc_address = default_impl.add_grpc_address

    def add_grpc_address(server, server_address: str) -> None:
        ray_add_grpc_address(server, address(host, server_address.rpartition(":")[2]))

    default_impl.add_grpc_address = add_grpc_address
