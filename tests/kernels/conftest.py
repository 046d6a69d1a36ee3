import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before Triton is
# imported (orthrus_kernels imports it only when the triton backend is first used).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
