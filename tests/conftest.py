import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (the built-in model, large sweeps)")


@pytest.fixture(scope="session")
def builtin_dir():
    from orthrus_engines.models.builtin import builtin_model_dir

    return builtin_model_dir()
