"""Randomness, seeded one way: private generators, the global RNG of model initialisation, and random
numbers keyed by (seed, stream, example), the same draws whatever the batching.

Every random stream in sirobust starts here: :func:`generator` (a private ``torch.Generator`` from an
integer seed), :func:`seed_from_words` (one seed from several integers: a data loader's seed, epoch,
purpose and batch), :func:`seed_global` (the global RNG, which ``torch.nn``'s weight initialisation
draws from), :func:`stream_key` (one word for a named stream) and :class:`KeyedNoise`; a training run
checkpoints its streams with :func:`rng_state` and :func:`set_rng_state`.

An evaluation draws each example's random start from a hash of the seed, the
attack's stream (its name and restart) and the example's index in its dataset,
never from a generator shared across a batch. So the per-example results of a
report do not depend on ``--batch-size``, on how many processes share the work,
or on which examples an earlier attack already broke; the draws themselves are
also the same on every device (exact integer arithmetic), though the attack's
floating-point results may differ between devices in the last bits.

The hash is ``lowbias32`` (C. Wellons, "Hash Prospector"), a bijection on 32-bit
integers with near-ideal avalanche, written with int64 tensor arithmetic that
never overflows.

Example::

    noise = KeyedNoise(seed=0, stream="pgd/restart-0", keys=torch.tensor([17, 42]))
    u = noise.uniform(x)     # (2, C, H, W) in (0, 1): example 17 always gets the same numbers
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import Optional, Union

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF


def generator(seed: Optional[int] = None, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A private ``torch.Generator`` on ``device``, seeded with ``seed`` (None: fresh entropy from the OS).
    Drawing from it never moves the global RNG (DESIGN.md, habit 4)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def seed_from_words(*words: int) -> int:
    """One 63-bit seed from non-negative integers, well mixed (NumPy's ``SeedSequence``): nearby words,
    e.g. consecutive epochs, give unrelated streams."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seed_global(seed: int) -> None:
    """Seed the global RNG (CPU and every GPU): only for what cannot take a generator, the weight
    initialisation of ``torch.nn`` modules."""
    torch.manual_seed(int(seed))


def rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """What a training run checkpoints of its streams: the global CPU RNG, its attack generator ``gen`` and,
    on a GPU, the device's global RNG."""
    state = {"torch": torch.get_rng_state(), "attack": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    """Restore :func:`rng_state`, so that a resumed run draws what the uninterrupted run would have."""
    torch.set_rng_state(state["torch"])
    gen.set_state(state["attack"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """x · m mod 2³² for x in [0, 2³²): split m in 16-bit halves so no product exceeds 2⁴⁸."""
    lo, hi = m & 0xFFFF, m >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(v: int) -> int:
    """:func:`mix32` of one Python integer, in Python arithmetic: the same bits, with no tensor made (a derived
    stream, one per target class or restart, hashes its name without touching torch)."""
    v &= _MASK32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & _MASK32
    v ^= v >> 15
    v = (v * 0x846CA68B) & _MASK32
    return v ^ (v >> 16)


def _word(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@functools.lru_cache(maxsize=4096)
def stream_key(seed: int, stream: str) -> int:
    """One 32-bit word for (seed, stream); seeds of any size are folded in 32-bit pieces."""
    h = _mix_int(_word(stream))
    seed = int(seed)
    for _ in range(4):  # up to 128-bit seeds
        h = _mix_int(h ^ (seed & _MASK32))
        seed >>= 32
    return h


class KeyedNoise:
    """Uniform and Gaussian draws for a batch whose examples have stable integer ``keys`` (B,)."""

    def __init__(self, seed: int, stream: str, keys: torch.Tensor):
        if keys.dim() != 1:
            raise ValueError(f"keys must be a 1-D tensor of example indices, got shape {tuple(keys.shape)}")
        self.seed, self.stream = int(seed), str(stream)
        keys = keys.to(torch.int64)
        self._keys = keys
        base = stream_key(self.seed, self.stream)
        lo, hi = keys & _MASK32, (keys >> 32) & _MASK32
        self._rows = mix32(mix32(lo ^ base) ^ mix32(hi ^ 0x9E3779B9))  # (B,)

    def subset(self, index: torch.Tensor) -> "KeyedNoise":
        """The same streams for a subset of the batch (e.g. the examples still being attacked)."""
        out = KeyedNoise.__new__(KeyedNoise)
        out.seed, out.stream, out._rows = self.seed, self.stream, self._rows[index.to(self._rows.device)]
        out._keys = self._keys[index.to(self._keys.device)]
        return out

    @property
    def keys(self) -> torch.Tensor:
        return self._keys

    def derive(self, name: str) -> "KeyedNoise":
        """An independent stream for a part of the attack (a target class, an iteration), same examples."""
        return KeyedNoise(self.seed, f"{self.stream}/{name}", self._keys)

    _CHUNK = 1 << 20  # elements hashed at once: bounds the int64 temporaries to a few MB whatever the batch

    def _uniform(self, shape: tuple, device, dtype: torch.dtype, salt: int, offset: int = 0) -> torch.Tensor:
        b = shape[0]
        per = math.prod(shape[1:]) if b else 0
        out = torch.empty((b, per), dtype=dtype, device=device)
        if b == 0 or per == 0:
            return out.reshape(shape)
        salt_word = _mix_int(salt)
        positions = torch.arange(offset, offset + per, device=device, dtype=torch.int64)
        cols = mix32(((positions * 2 + 1) & _MASK32) ^ salt_word)  # (per,)
        rows_all = self._rows.to(device)
        step = max(1, self._CHUNK // per)
        for i in range(0, b, step):
            rows = rows_all[i:i + step, None]
            bits = mix32(mix32(rows ^ cols[None, :]) ^ rows)  # (chunk, per), values in [0, 2^32)
            out[i:i + step] = ((bits.double() + 0.5) / 2.0 ** 32).to(dtype)
        return out.reshape(shape)

    def uniform(self, like: torch.Tensor, salt: int = 0, offset: int = 0) -> torch.Tensor:
        """Values in (0, 1), shaped and typed like ``like`` (B, ...). ``offset``: where in each example's
        stream the draw starts, so a long stream can be drawn in pieces (positions ``offset`` onwards)."""
        return self._uniform(tuple(like.shape), like.device, like.dtype, salt, offset)

    def normal(self, like: torch.Tensor, salt: int = 0) -> torch.Tensor:
        """Standard Gaussian values (Box–Muller on two keyed uniform streams), shaped like ``like``."""
        shape = tuple(like.shape)
        u1 = self._uniform(shape, like.device, torch.float64, 2 * salt + 101)
        u2 = self._uniform(shape, like.device, torch.float64, 2 * salt + 102)
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(like.dtype)


class GeneratorNoise:
    """The same interface over a ``torch.Generator`` (draws depend on the order of calls)."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def subset(self, index: torch.Tensor) -> "GeneratorNoise":
        return self

    def derive(self, name: str) -> "GeneratorNoise":
        return self

    def uniform(self, like: torch.Tensor, salt: int = 0, offset: int = 0) -> torch.Tensor:
        return torch.rand(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def normal(self, like: torch.Tensor, salt: int = 0) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)


Noise = Union[KeyedNoise, GeneratorNoise]


def as_noise(source) -> Noise:
    """A noise source from a KeyedNoise/GeneratorNoise, a torch.Generator or None (the global RNG)."""
    if isinstance(source, (KeyedNoise, GeneratorNoise)):
        return source
    if source is None or isinstance(source, torch.Generator):
        return GeneratorNoise(source)
    raise TypeError(f"expected a torch.Generator or a noise source, got {type(source).__name__}")
