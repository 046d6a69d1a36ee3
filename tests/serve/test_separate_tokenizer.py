"""A replica whose engine arguments name a separate tokenizer directory: the ingress tokenizes (text
prompts, chat) with that tokenizer, the one the engine uses, not with the model directory's (here none)."""

import shutil

import httpx
import pytest
from serve_helpers import ENGINE_ARGS

from orthrus_engines import SamplingParams

pytestmark = pytest.mark.slow

APP = "septok"
TOKENIZER_ONLY = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def weights_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model without its tokenizer files."""
    path = tmp_path_factory.mktemp("septok") / "weights-only"
    shutil.copytree(tiny_model_dir, path, ignore=shutil.ignore_patterns(*TOKENIZER_ONLY))
    return path


@pytest.fixture(scope="module")
def app(serve_cluster, weights_dir, tiny_model_dir):
    deployed = serve_cluster.deploy(APP, model=str(weights_dir),
                                    engine=ENGINE_ARGS | {"tokenizer": str(tiny_model_dir)})
    yield deployed
    serve_cluster.delete(APP)


def test_the_ingress_uses_the_engines_tokenizer(app, client, reference_llm, tiny_model_dir):
    sp = SamplingParams(max_tokens=6)
    ref = reference_llm.generate("The capital of France is", sp)[0]
    r = client.generate("The capital of France is", max_tokens=6)
    assert list(r.token_ids) == ref.token_ids and r.prompt_tokens == ref.prompt_tokens

    chat_ref = reference_llm.chat(CHAT, sp)[0]
    with httpx.Client(base_url=app.http_base, timeout=60) as http:
        body = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 6}).json()
    assert body["choices"][0]["message"]["content"] == chat_ref.text
    assert body["usage"]["prompt_tokens"] == chat_ref.prompt_tokens

    info = app.engine_handle().model_info.remote().result(timeout_s=30)
    assert info["tokenizer"] == str(tiny_model_dir) and info["model"] != info["tokenizer"]
