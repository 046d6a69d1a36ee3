"""Counter-based Gumbel noise for seeded sampling.

g(seed, t, v) depends only on the request's seed, the absolute sequence position t (the token's index
in `Sequence.token_ids`) and the vocabulary index v: splitmix64 integer mixing written with torch
int64 ops (multiplications wrap; right shifts are made logical with a mask), vectorized over rows and
vocabulary. The integers are the same on every device; no generator state is consumed, so the noise
at a position does not depend on which pass, batch or block size draws it.
"""

import torch

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's stream increment
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = (1 << 64) - 1
UNIFORM_BITS = 23  # (x + 0.5) / 2**23 is exact in float32 and lies strictly inside (0, 1)


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    x &= _U64
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 bit patterns."""
    z = (z ^ _srl(z, 30)) * _signed(_M1)
    z = (z ^ _srl(z, 27)) * _signed(_M2)
    return z ^ _srl(z, 31)


def mix64_int(z: int) -> int:
    """The same finalizer on Python ints (unsigned 64-bit): the reference the tests check against."""
    z &= _U64
    z = ((z ^ (z >> 30)) * _M1) & _U64
    z = ((z ^ (z >> 27)) * _M2) & _U64
    return z ^ (z >> 31)


def noise_bits(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] int64 hashes of (seed, positions[i], v)."""
    seed_key = _signed(mix64_int(seed + GOLDEN))  # any Python int: reduced mod 2**64
    row_key = mix64(mix64(positions.to(torch.int64) * _signed(GOLDEN) + _signed(GOLDEN)) ^ seed_key)
    vocab = (torch.arange(1, vocab_size + 1, dtype=torch.int64, device=positions.device) * _signed(GOLDEN))
    return mix64(row_key[:, None] + vocab[None, :])


def uniforms(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] float32 uniforms in (0, 1) on a grid of 2**-23."""
    top = _srl(noise_bits(seed, positions, vocab_size), 64 - UNIFORM_BITS)
    return (top.float() + 0.5) * 2.0**-UNIFORM_BITS


def gumbel_noise(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] float32 standard Gumbel noise g(seed, positions[i], v), finite everywhere."""
    return -torch.log(-torch.log(uniforms(seed, positions, vocab_size)))
