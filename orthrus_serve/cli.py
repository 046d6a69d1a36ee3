"""`orthrus-serve`: `up` serves the application; `generate` is a gRPC client."""

import argparse
import json
import os
import sys
import time

from orthrus_serve import grpc_bind
from orthrus_serve.auth import add_api_key_argument, key_from_env
from orthrus_serve.bench import add_arguments as add_bench_arguments
from orthrus_serve.client import add_tls_arguments


def up_message(cfg, key_set: bool | None) -> str:
    """What `up` prints: where each API listens (both on the config's host; gRPC through grpc_bind) and
    whether an API key is asked for (None: unknown here, an existing cluster's nodes decide)."""
    auth = f" -H \"Authorization: Bearer ${cfg.api_key_env}\"" if key_set is not False else ""
    every_interface = cfg.host in ("0.0.0.0", "::")
    grpc_where = grpc_bind.address(cfg.host, str(cfg.grpc_port)) + (" (every interface)" if every_interface else "")
    grpc_target = grpc_bind.address("127.0.0.1" if every_interface else cfg.host, str(cfg.grpc_port))
    key_line = {True: f"API key: required (${cfg.api_key_env}); /health and gRPC Health/Check are open",
                False: f"API key: none (set ${cfg.api_key_env} or pass --api-key): anyone who reaches the ports "
                       "can call",
                None: f"API key: required if ${cfg.api_key_env} is set in the Ray nodes' environment"}[key_set]
    scheme, cacert = ("https", f" --cacert {cfg.ssl_certfile}") if cfg.ssl_certfile else ("http", "")
    return f"""
orthrus-serve is up: {cfg.served_model_name}
  {scheme.upper()} (OpenAI) on {cfg.host}:{cfg.http_port}:
    curl{cacert} {scheme}://{cfg.host}:{cfg.http_port}/v1/completions -H 'Content-Type: application/json'{auth} \\
         -d '{{"prompt": "The capital of France is", "max_tokens": 16}}'
  gRPC on {grpc_where}:
    orthrus-serve generate "The capital of France is" --address {grpc_target}
  {key_line}
Ctrl-C stops it."""


def serve_start_options(cfg) -> dict:
    """`serve.start`'s keyword arguments for a ServeConfig: where the proxies listen, HTTPS."""
    from ray.serve.config import gRPCOptions, HTTPOptions

    from orthrus_serve.app import GRPC_SERVICERS

    return {"http_options": HTTPOptions(host=cfg.host, port=cfg.http_port, ssl_certfile=cfg.ssl_certfile,
                                        ssl_keyfile=cfg.ssl_keyfile),
            "grpc_options": gRPCOptions(port=cfg.grpc_port, grpc_servicer_functions=GRPC_SERVICERS)}


def up_config(args):
    """The ServeConfig that `up` serves: the --config file (or the defaults) with the flags over it."""
    from orthrus_serve.config import ServeConfig

    cfg = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    overrides = {k: v for k, v in (("model", args.model), ("http_port", args.http_port),
                                   ("grpc_port", args.grpc_port), ("ssl_certfile", args.ssl_certfile),
                                   ("ssl_keyfile", args.ssl_keyfile)) if v is not None}
    return ServeConfig.model_validate(cfg.model_dump() | overrides)  # validated again: cert and key together


def _up(args) -> int:
    import ray
    from ray import serve

    from orthrus_serve.app import build_app

    try:
        cfg = up_config(args)
    except ValueError as e:  # pydantic's ValidationError is one
        sys.exit(f"orthrus-serve up: {e}")
    if args.api_key:
        if cfg.api_key_env is None:
            sys.exit("--api-key: the config's api_key_env is null (no key is read)")
        if os.environ.get("RAY_ADDRESS"):
            sys.exit(f"--api-key works with the local Ray cluster that `up` starts; on an existing cluster set "
                     f"{cfg.api_key_env} in every node's environment before `ray start`")
        os.environ[cfg.api_key_env] = args.api_key  # the local Ray cluster started below inherits it
    remote = os.environ.get("RAY_ADDRESS")
    # Without RAY_ADDRESS always a new local cluster (not one found in /tmp/ray): it inherits this
    # process's environment, so what is printed about the key is true.
    # The job's runtime env binds the gRPC proxies to cfg.host (Ray Serve has no option for it; see grpc_bind).
    ray.init(address=remote or "local", ignore_reinit_error=True, runtime_env=grpc_bind.runtime_env(cfg.host))
    serve.start(**serve_start_options(cfg))
    serve.run(build_app(cfg.model_dump()), name=cfg.app_name, route_prefix="/")
    print(up_message(cfg, None if remote else key_from_env(cfg.api_key_env) is not None), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _generate(args) -> int:
    from orthrus_serve.client import OrthrusClient

    with OrthrusClient(args.address, application=args.application, api_key=args.api_key, tls=args.tls,
                       ca_file=args.ca_file) as client:
        if args.stream:
            for delta in client.generate_stream(args.prompt, max_tokens=args.max_tokens,
                                                temperature=args.temperature):
                print(delta.text, end="", flush=True)
            print()
        else:
            r = client.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature)
            if args.json:
                from orthrus_engines.outputs import COUNTERS  # only here: orthrus_engines brings torch

                print(json.dumps({"text": r.text, "token_ids": list(r.token_ids), "finish_reason": r.finish_reason,
                                  **{name: getattr(r, name) for name in COUNTERS}}))
            else:
                print(r.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orthrus-serve")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="serve on a local Ray cluster (or RAY_ADDRESS)")
    up.add_argument("--config", help="a ServeConfig YAML file")
    up.add_argument("--model")
    up.add_argument("--http-port", type=int)
    up.add_argument("--grpc-port", type=int)
    up.add_argument("--ssl-certfile", help="HTTPS: the server's certificate chain (PEM); with --ssl-keyfile")
    up.add_argument("--ssl-keyfile", help="HTTPS: the server's private key (PEM)")
    add_api_key_argument(up)
    gen = sub.add_parser("generate", help="call a running server over gRPC")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:9000")
    gen.add_argument("--application", default="orthrus")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--stream", action="store_true")
    gen.add_argument("--json", action="store_true")
    add_api_key_argument(gen)
    add_tls_arguments(gen)
    bench = sub.add_parser("bench", help="benchmark a running server (gRPC, or HTTP with --http)")
    add_bench_arguments(bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv if argv is not None else sys.argv[1:])
    if args.command == "bench":
        from orthrus_serve.bench import main as bench_main
        return bench_main(args)
    return _up(args) if args.command == "up" else _generate(args)


if __name__ == "__main__":
    sys.exit(main())
