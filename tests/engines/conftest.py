import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run only small ops: one intra-op thread is much faster on a shared 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
