"""cluster/serve-cpu.yaml, the one-machine Serve config, deploys with `serve deploy` onto a running
Ray cluster (through the dashboard's REST API, as KubeRay submits serveConfigV2) and answers gRPC
and OpenAI HTTP. The only changes to the file are the ports and the (tiny) model."""

from pathlib import Path

import httpx
import pytest

from orthrus_serve.client import OrthrusClient

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "serve-cpu.yaml"


@pytest.fixture(scope="module")
def deployed(cluster):
    cluster.deploy(cluster.test_config(CONFIG))
    yield cluster
    cluster.shutdown_serve()


def test_serve_deploy_answers_grpc_and_http(deployed):
    c = deployed
    status = c.nodes.run_cli(["serve", "status", "--address", c.nodes.dashboard_url]).stdout
    assert "orthrus" in status and "RUNNING" in status

    with OrthrusClient(c.grpc_address, timeout_s=60) as client:  # application metadata: "orthrus"
        info = client.model_info()
        assert info.model == "tiny-long" and info.max_model_len == 1536
        r = client.generate("The capital of France is", max_tokens=6)
        assert r.completion_tokens == 6 and r.finish_reason == "length"
        streamed = list(client.generate_stream("Count to three:", max_tokens=5, temperature=0.0))
        assert sum(len(m.token_ids) for m in streamed) == 5

    with httpx.Client(base_url=c.http_base, timeout=60) as h:
        assert h.get("/v1/models").json()["data"][0]["id"] == "tiny-long"
        r = h.post("/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        bad = h.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400 and "max_tokens" in bad.text

    # Everything ran where the one-machine config puts it: on the head, on CPU.
    ids = c.node_ids()
    app = c.nodes.serve_applications()["orthrus"]
    for dep in app["deployments"].values():
        assert {r["node_id"] for r in dep["replicas"]} == {ids["head"]}
