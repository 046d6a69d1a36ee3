"""The committed gRPC stubs are what protoc makes of protos/orthrus/v1/orthrus.proto today, up to the
version stamps of the protoc and grpcio-tools releases that made them (a patch release of either must not
turn a clean clone red)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("orthrus_pb2.py", "orthrus_pb2.pyi", "orthrus_pb2_grpc.py")
# What a generator's release stamps into the code: the protobuf version comment and runtime check, and the
# grpcio version the stub asks for. Everything else (descriptor bytes, messages, service code) must match.
VERSION_STAMPS = [
    (re.compile(r"^# Protobuf Python Version: .*$", re.M), "# Protobuf Python Version: X"),
    (re.compile(r"(_runtime_version\.Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,"), r"\1X, X, X,"),
    (re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M), "GRPC_GENERATED_VERSION = 'X'"),
]


def without_version_stamps(code: str) -> str:
    for pattern, replacement in VERSION_STAMPS:
        code = pattern.sub(replacement, code)
    return code


def test_version_stamps_are_all_that_is_ignored():
    stamped = "# Protobuf Python Version: 7.35.1\n_runtime_version.Domain.PUBLIC,\n    7,\n    35,\n    1,\n"
    assert without_version_stamps(stamped) == without_version_stamps(stamped.replace("35", "36"))
    assert without_version_stamps("GRPC_GENERATED_VERSION = '1.85.1'") == "GRPC_GENERATED_VERSION = 'X'"
    assert without_version_stamps("b'\\x12\\x0e'") != without_version_stamps("b'\\x12\\x0f'")


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iorthrus_serve/api=protos/orthrus/v1",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         "protos/orthrus/v1/orthrus.proto"],
        cwd=ROOT, check=True,
    )
    for name in STUBS:
        fresh = without_version_stamps((tmp_path / "orthrus_serve" / "api" / name).read_text())
        committed = without_version_stamps((ROOT / "orthrus_serve" / "api" / name).read_text())
        assert fresh == committed, f"{name} is stale: run `make protos`"


def test_service_shape():
    from orthrus_serve.api import orthrus_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Orthrus"]
    assert service.full_name == "orthrus.v1.Orthrus"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "GenerateStream", "ModelInfo"}
    assert methods["GenerateStream"].server_streaming and not methods["Generate"].server_streaming
    req = {f.name for f in pb.GenerateRequest.DESCRIPTOR.fields}
    assert {"prompt", "prompt_token_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "request_id"} <= req
    resp = {f.name for f in pb.GenerateResponse.DESCRIPTOR.fields}
    assert {"text", "token_ids", "finish_reason", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
            "forward_passes", "drafted_tokens", "accepted_tokens"} <= resp
