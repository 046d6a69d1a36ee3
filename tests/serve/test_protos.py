"""The committed gRPC stubs are what protoc makes of protos/orthrus/v1/orthrus.proto today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("orthrus_pb2.py", "orthrus_pb2.pyi", "orthrus_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iorthrus_serve/api=protos/orthrus/v1",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         "protos/orthrus/v1/orthrus.proto"],
        cwd=ROOT, check=True,
    )
    for name in STUBS:
        fresh = (tmp_path / "orthrus_serve" / "api" / name).read_text()
        assert fresh == (ROOT / "orthrus_serve" / "api" / name).read_text(), f"{name} is stale: run `make protos`"


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
