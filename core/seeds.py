"""Every seed formula of a run, written once.

Server, sites, the split tool and the benchmarks derive their random streams from the
run's `seed` through these functions, so a simulated site and a deployed site built
from the same split draw the same numbers.
"""

from __future__ import annotations

# purposes of a site's per-round generator
BATCH_ORDER = 0  # shuffling of the local epochs
GAMMA_BATCH = 1  # the deterministic batch on which Gamma's gradients are measured
SECAGG_ROUNDING = 2  # secure aggregation's stochastic rounding of the update (core/secagg.py)


def site_init_seed(seed: int, site_id: int) -> int:
    """A site's model initialisation: private parts (a fresh encoder) differ between sites."""
    return seed * 7919 + site_id


def private_init_seed(seed: int, site_id: int, shared_encoder: bool) -> int:
    """The seed of a site's fresh model, whose private parts are what it keeps. With
    `shared-encoder-init` (FusedSpaceFed's E_i) every site starts its encoder from the run's
    initial model (the server's seed), so that the decoders they train in round 1 read
    the same features and their average fits each encoder (docs/recipe.md, issue 24)."""
    return seed if shared_encoder else site_init_seed(seed, site_id)


def round_seed(seed: int, server_round: int, site_id: int, purpose: int = BATCH_ORDER) -> int:
    """A site's random stream for one round and purpose."""
    return (seed * 1_000_003 + server_round * 1009 + site_id * 17 + purpose) % 2**63


def local_shard_seed(seed: int, site_id: int, offset: int = 0) -> int:
    """A site's personalised held-out shard (offset 0: test shard, 500: validation shard)."""
    return seed * 1000 + site_id + offset


VAL_SHARD_OFFSET = 500
