import os
import shutil
from pathlib import Path

import pytest
import torch
from support.tiny_models import write_orthrus

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (the built-in model, large sweeps)")


@pytest.fixture(scope="session")
def builtin_dir():
    from orthrus_engines.models.builtin import builtin_model_dir

    return builtin_model_dir()


VOCAB = 49152  # the built-in (SmolLM2) tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, builtin_dir) -> Path:
    """A tiny random Orthrus (Llama) checkpoint with the built-in model's tokenizer files: what the
    serving and cluster tests deploy, so text prompts and chat work and every call is fast."""
    path = tmp_path_factory.mktemp("serve") / "tiny-orthrus"
    path.mkdir()
    write_orthrus(path, "llama", seed=7, twin_noise=0.05, vocab_size=VOCAB)
    for name in TOKENIZER_FILES:
        if (Path(builtin_dir) / name).exists():
            shutil.copy(Path(builtin_dir) / name, path / name)
    return path
