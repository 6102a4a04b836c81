"""Deterministic order and randomness: everything a loader draws is a pure function of (seed, epoch, position).

A run resumed at (epoch, batch) therefore sees the same images with the same augmentations as an uninterrupted
one. Positions are global (over all ranks), so one process with batch B*W sees exactly what W processes with
batch B see together, augmentations included.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1

# Streams of randomness that must not coincide for equal (seed, epoch, position)
ORDER, BATCH_AUGMENT, SAMPLE_AUGMENT, SHARDS, SHUFFLE = range(5)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser chained over them): stable across versions and platforms,
    unlike Python's hash() or a library's RNG stream."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def generator(*values: int) -> torch.Generator:
    """A CPU torch.Generator seeded by mix_seed(values)."""
    return torch.Generator().manual_seed(mix_seed(*values))


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch, shared by all ranks."""
    return torch.randperm(num_samples, generator=generator(seed, ORDER, epoch))


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Global batches of batch_size * world_size samples in one epoch; the incomplete last one is dropped."""
    return num_samples // (batch_size * world_size)


def rank_slice(batch_size: int, rank: int) -> slice:
    """This rank's part of a global batch (ranks take consecutive blocks, so their parts are disjoint)."""
    return slice(rank * batch_size, (rank + 1) * batch_size)


def eval_indices(num_samples: int, rank: int, world_size: int) -> range:
    """Evaluation samples of one rank: every world_size-th, so ranks are disjoint and cover the set exactly once."""
    return range(rank, num_samples, world_size)
