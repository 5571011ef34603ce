"""Seed derivation: every random stream in certkit is seeded from integers (run seed, stream tag, ids).

Results never depend on batch sizes, ``n_jobs`` or the backend, because each piece of randomness (a block of
noise draws for one test point, one ensemble member's training noise, its test noise, its weight init) has
its own seed derived from the tuple that names it.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1

#: Stream tags (the second element of a seed tuple). Keep values stable: they define published results.
STREAM_SELECT = 0  # Cohen CERTIFY selection draws (n0)
STREAM_ESTIMATE = 1  # Cohen CERTIFY estimation draws (n)
STREAM_PREDICT = 2  # Cohen PREDICT draws
STREAM_TRAIN_NOISE = 10  # ensemble member: fixed Gaussian noise on every training input (RAB)
STREAM_TEST_NOISE = 11  # ensemble member: fixed Gaussian noise added to every test input
STREAM_MEMBER_INIT = 12  # ensemble member: weight initialisation and batch order
STREAM_SIGMA = 20  # sample-specific sigma optimisation (certkit.sigma): SGA noise / member choice
STREAM_SIGMA_REFERENCE = 30  # sample-specific ensemble: reference model (init, batch order, augmentation noise)
STREAM_SIGMA_TRAIN = 31  # sample-specific ensemble: seed of the SGA of the training scales
STREAM_SIGMA_TEST = 32  # sample-specific ensemble: seed of the SGA of the test scales
STREAM_ABLATION = 40  # de-randomized smoothing training: the band / block position of each batch
STREAM_LAYOUT = 41  # aggregation ensembles: Finite Aggregation shifts and bootstrap draws
STREAM_CUTOUT = 42  # PatchCleanser's Cutout fine-tune: the mask positions of each batch


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a splitmix64 chain): distinct tuples give unrelated seeds."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)
