"""Hadamard matrices for the transform of size n = K·2^m: which K are known, and how each is built.

A Hadamard matrix H of order K has ±1 entries and H·Hᵀ = K·I. The transform along a last dim of n uses
H_K ⊗ H_{2^m} (csrc/include/ftcore/quant.h), so n is supported when n = K·2^m for a K built here:

- Sylvester: K = 1, 2 (and every power of two, which needs no K factor at all);
- Paley I: K = q + 1 for a prime power q ≡ 3 (mod 4) (12, 20, 28, 44, 60, 68, 72, 80, 84, 104, 108, 128, 132,
  140, 152, 164, 168, 180, ...);
- Paley II: K = 2(q + 1) for a prime power q ≡ 1 (mod 4) (12, 20, 28, 36, 52, 60, 76, 100, 108, 124, 148, ...);
- Williamson: K = 4w from four symmetric circulant ±1 matrices A, B, C, D of order w with
  A² + B² + C² + D² = 4w·I, for 92, 116, 156 and 172, which neither Paley construction reaches
  (ftcore/data/williamson.json lists the first rows and how they were found);
- doubling: H_{2K} = [[H_K, H_K], [H_K, -H_K]].

The smallest such K is used (the K×K mix costs K multiply-adds an element). Prime powers up to the cube are
handled (q = p, p², p³), which covers every order up to 4096 that Paley reaches with them.
"""

import functools
import json
import math
from importlib import resources
from typing import Optional, Tuple

import torch

__all__ = ["hadamard_matrix", "hadamard_factors", "is_supported", "random_signs", "supported_orders"]


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _prime_power(q: int) -> Optional[Tuple[int, int]]:
    """(p, e) with q = p^e for e in 1..3, else None."""
    for e in (1, 2, 3):
        p = round(q ** (1 / e))
        for cand in (p - 1, p, p + 1):
            if cand >= 2 and cand**e == q and _is_prime(cand):
                return cand, e
    return None


class _Field:
    """GF(p^e), e ≤ 3: elements are the integers 0..q-1, read as base-p digit vectors of polynomials modulo a
    monic irreducible polynomial (for degree ≤ 3, irreducible means no root in GF(p))."""

    def __init__(self, p: int, e: int):
        self.p, self.e, self.q = p, e, p**e
        self.modulus = self._irreducible() if e > 1 else None

    def _digits(self, a):
        return [(a // self.p**i) % self.p for i in range(self.e)]

    def _number(self, digits):
        return sum(d * self.p**i for i, d in enumerate(digits))

    def _irreducible(self):
        p, e = self.p, self.e
        for low in range(p**e):  # x^e + lower terms, lower coefficients from the digits of `low`
            coeffs = [(low // p**i) % p for i in range(e)]
            if all((sum(c * x**i for i, c in enumerate(coeffs)) + x**e) % p for x in range(p)):
                return coeffs
        raise AssertionError("an irreducible polynomial always exists")

    def difference_table(self) -> torch.Tensor:
        """(q, q) int64: the element a_i − a_j (subtraction works digit by digit)."""
        a = torch.arange(self.q)
        digits = torch.stack([(a // self.p**i) % self.p for i in range(self.e)], -1)  # (q, e)
        diff = (digits[:, None, :] - digits[None, :, :]) % self.p
        return (diff * torch.tensor([self.p**i for i in range(self.e)])).sum(-1)

    def mul(self, a, b):
        p, e = self.p, self.e
        prod = [0] * (2 * e - 1)
        for i, x in enumerate(self._digits(a)):
            for j, y in enumerate(self._digits(b)):
                prod[i + j] = (prod[i + j] + x * y) % p
        for deg in range(2 * e - 2, e - 1, -1):  # reduce x^deg = -(lower terms) · x^(deg-e)
            c = prod[deg]
            if c:
                prod[deg] = 0
                for i, m in enumerate(self.modulus):
                    prod[deg - e + i] = (prod[deg - e + i] - c * m) % p
        return self._number(prod[:e])


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(a_i − a_j), χ the quadratic character of GF(q)."""
    p, e = _prime_power(q)
    field = _Field(p, e)
    squares = {field.mul(b, b) for b in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    return chi[field.difference_table()]


def _paley1(k: int) -> torch.Tensor:  # q = k − 1 ≡ 3 (mod 4): I + [[0, 1ᵀ], [−1, Q]] (skew core)
    q = k - 1
    core = torch.zeros(k, k, dtype=torch.float64)
    core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
    return core + torch.eye(k, dtype=torch.float64)


def _paley2(k: int) -> torch.Tensor:  # q = k/2 − 1 ≡ 1 (mod 4): expand the symmetric core S by 2×2 blocks
    q = k // 2 - 1
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, plus) + torch.kron((core == 0).double(), zero)


@functools.lru_cache(maxsize=None)
def _williamson_rows() -> dict:
    with resources.files("ftcore").joinpath("data/williamson.json").open() as f:
        table = json.load(f)
    return {int(w): entry for w, entry in table["orders"].items()}


def _williamson(k: int) -> torch.Tensor:
    rows = _williamson_rows()[k // 4]["rows"]
    w = k // 4

    def circulant(row: str) -> torch.Tensor:
        first = torch.tensor([1.0 if c == "+" else -1.0 for c in row], dtype=torch.float64)
        return torch.stack([torch.roll(first, i) for i in range(w)])

    a, b, c, d = (circulant(r) for r in rows)
    return torch.cat(
        [
            torch.cat([a, b, c, d], 1),
            torch.cat([-b, a, -d, c], 1),
            torch.cat([-c, d, a, -b], 1),
            torch.cat([-d, -c, b, a], 1),
        ]
    )


def _construct(k: int) -> Optional[torch.Tensor]:
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if k == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    if k % 4:
        return None
    q = _prime_power(k - 1)
    if q and (k - 1) % 4 == 3:
        return _paley1(k)
    q = _prime_power(k // 2 - 1)
    if q and (k // 2 - 1) % 4 == 1:
        return _paley2(k)
    if k // 4 in _williamson_rows():
        return _williamson(k)
    half = _construct(k // 2)
    if half is not None:
        return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)])
    return None


@functools.lru_cache(maxsize=None)
def _matrix(k: int) -> Optional[torch.Tensor]:
    h = _construct(k)
    if h is not None:  # every construction is checked once, here, before anything uses it
        assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)), f"Hadamard construction of order {k}"
        h = h.float()
    return h


def hadamard_matrix(k: int) -> torch.Tensor:
    """The K×K ±1 Hadamard matrix ftcore uses (float32, CPU); raises ValueError when none is known."""
    h = _matrix(int(k)) if k >= 1 else None
    if h is None:
        raise ValueError(f"no Hadamard matrix of order {k} is known to ftcore (see ftcore.hadamard.supported_orders)")
    return h


def _odd_part(n: int) -> Tuple[int, int]:
    twos = (n & -n).bit_length() - 1
    return n >> twos, twos


@torch._dynamo.assume_constant_result  # a pure function of n: torch.compile calls it instead of tracing it
def hadamard_factors(n: int) -> Tuple[int, int]:
    """(K, P) with n = K·P, P a power of two and K the smallest order with a known Hadamard matrix.

    Raises ValueError naming n when there is none (then a block-diagonal transform is the way:
    ``hadamard_transform(x, block_size=b)``)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the transform size must be a positive integer, got {n!r}")
    odd, twos = _odd_part(n)
    if odd == 1:
        return 1, n
    for j in range(2, twos + 1):
        k = odd << j
        if _matrix(k) is not None:
            return k, n // k
    raise ValueError(
        f"no Hadamard transform of size {n} = {odd}·2^{twos}: no known Hadamard matrix of order {odd}·2^j for "
        f"2 ≤ j ≤ {twos}. Pass block_size= (a supported divisor of {n}) for a block-diagonal rotation."
    )


def is_supported(n: int) -> bool:
    """Whether a (full, orthogonal) Hadamard transform of size n is available."""
    try:
        hadamard_factors(n)
    except ValueError:
        return False
    return True


def supported_orders(limit: int = 200) -> list:
    """Orders K ≤ limit with a known Hadamard matrix (K = 1, 2 or a multiple of 4)."""
    return [k for k in range(1, limit + 1) if (k in (1, 2) or k % 4 == 0) and _matrix(k) is not None]


def random_signs(n: int, seed: int = 0, *, device=None) -> torch.Tensor:
    """A fixed random ±1 diagonal of length n (float32) from `seed`: the same seed gives the same signs on every
    machine (drawn on the CPU generator, then moved)."""
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return signs.to(device) if device is not None else signs


_device_cache: dict = {}


@torch._dynamo.assume_constant_result  # torch.compile takes the cached matrix as a constant input
def hadamard_k_on(k: int, device: torch.device) -> Optional[torch.Tensor]:
    """H_K on `device` (None for K = 1), cached: the ops take it as an argument every call."""
    if k == 1:
        return None
    key = (k, str(device))
    h = _device_cache.get(key)
    if h is None:
        h = _device_cache[key] = hadamard_matrix(k).to(device)
    return h
