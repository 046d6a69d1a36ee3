"""Import Triton for the kernels: compiled on CUDA, interpreted on CPU tensors (no GPU to compile for).

TRITON_INTERPRET=1 is set before Triton is imported when no GPU is present, unless the environment
already says otherwise; it must be set before the kernels are decorated.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into an int with int(1-element array), which
    NumPy >= 2.4 refuses, so data-dependent loop bounds (`range(0, n)` with a loaded n) fail
    (triton-lang/triton#9171). Patch that one conversion, as the upstream fix does."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_orthrus_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._orthrus_fixed = True
    interpreter._patch_lang_tensor = patched


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # how the kernels imported next are decorated
if INTERPRET:
    _fix_interpreter_scalar_index()

__all__ = ["INTERPRET", "triton", "tl"]
