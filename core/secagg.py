"""Secure aggregation (SecAgg+, Bell et al. 2020) of the shared update: the protocol's
arithmetic, shared by the site (client_app/secagg.py) and the server (server_app/secure.py).

Built on Flower's primitives (`flwr.common.secure_aggregation`): elliptic-curve key pairs
and ECDH + HKDF key agreement, Fernet encryption of the shares, Shamir sharing,
stochastic quantisation and the SecAgg+ weighting (the example weight is folded into the
vector as Flower's `secaggplus_mod` does: the update is scaled by q/Q with
q = round(min(w, W) / W * Q), and q travels as the vector's first element, so that the
server unmasks only the sum of the weighted updates and the sum of the weights).

One deviation, and why: Flower's `pseudo_rand_gen` reduces a 32-byte seed to 32 bits
(it XORs the seed's words into one `numpy.random.RandomState` seed), so each mask has
2**32 possible values, few enough for a server to try them all against a masked vector.
Here a mask is the AES-256-CTR keystream of the 32-byte seed (or of the 32 bytes of the
pairwise key, which HKDF derived), read as uint32 values: uniform modulo 2**32, from the
`cryptography` package that Flower's own primitives use. No other primitive is new.

Everything is modulo 2**32 (uint32 arithmetic wraps), so `sites * secagg-quantization`
must stay below 2**32 (checked in core/config.py).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.quantization import dequantize, quantize

MOD_BITS = 32
MOD_RANGE = 2**MOD_BITS
DEFAULT_MAX_WEIGHT = 2**16  # the example weight that maps to factor 1 (more counts as this much)
SHARE_HEADER = 4  # Flower's Shamir shares: a 4-byte index, then 16 bytes per secret chunk

# -- message names ------------------------------------------------------------------------
#: the three stages after training, as message actions (`train.<action>`): the train reply
#: itself advertises the site's two public keys (SecAgg+'s first stage)
SHARE_KEYS, MASKED_INPUT, UNMASK = "secagg_share_keys", "secagg_masked_input", "secagg_unmask"
STAGES = (SHARE_KEYS, MASKED_INPUT, UNMASK)
STAGE_CONFIG = "secagg"  # config record: node ids, lists of ids (both ways)
STAGE_BYTES = "secagg-bytes"  # array record: keys, ciphertexts, shares as uint8 arrays (both ways)
KEYS_RECORD = "secagg-keys"  # array record of the train reply: the site's public keys pk1, pk2
MASKED_RECORD = "secagg-masked"  # array record of the masked-input reply: the masked vector
VECTOR_KEY = "vector"


class SecAggError(ValueError):
    """A protocol step that cannot go on (a site: fails the message; the server: the round)."""


# -- settings -----------------------------------------------------------------------------
def threshold_for(share_num: int, fraction: float) -> int:
    """Shares needed to reconstruct a secret shared among `share_num` nodes (the site and
    its neighbours): ceil(fraction * share_num), never below 2 (one share would be the secret)."""
    return min(share_num, max(2, math.ceil(fraction * share_num)))


def neighbours(nodes: Iterable[int], count: int) -> dict[int, list[int]]:
    """SecAgg+'s communication graph: each node's neighbours (itself not included). With
    `count` = 0 or >= nodes - 1 everyone; else the nodes within ceil(count / 2) places of
    it on the ring of the sorted ids (a symmetric graph, as in SecAgg+)."""
    ring = sorted(set(nodes))
    n = len(ring)
    if count <= 0 or count >= n - 1:
        return {u: [v for v in ring if v != u] for u in ring}
    reach = math.ceil(count / 2)
    out = {}
    for i, u in enumerate(ring):
        near = {ring[(i + d) % n] for d in range(-reach, reach + 1) if d}
        out[u] = sorted(near - {u})
    return out


def max_weight(max_examples: int, weighted: bool) -> int:
    """The weight W of factor 1: every site 1 for an unweighted mean, else max-examples
    when set (the same bound as plain aggregation's), else DEFAULT_MAX_WEIGHT."""
    if not weighted:
        return 1
    return max_examples if max_examples > 0 else DEFAULT_MAX_WEIGHT


# -- the vector -----------------------------------------------------------------------------
def update_keys(dtypes: Mapping[str, np.dtype]) -> list[str]:
    """The arrays whose update is summed, in vector order: the floating-point ones, sorted
    (integer arrays, BatchNorm's batch counters, keep the server's value)."""
    return sorted(k for k, dtype in dtypes.items() if np.issubdtype(np.dtype(dtype), np.floating))


def flatten(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]], keys: Sequence[str]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for key in keys:
        size = int(np.prod(shapes[key], dtype=np.int64))
        out[key] = vector[offset : offset + size].reshape(shapes[key])
        offset += size
    if offset != vector.size:
        raise SecAggError(f"a vector of {vector.size} values for arrays of {offset}")
    return out


def weighted_quantised(
    update: np.ndarray, weight: float, max_w: int, clip: float, levels: int, rounding_seed: int | None = None
) -> np.ndarray:
    """Flower's SecAgg+ input: [q, quantise(update * q / levels)] as uint32, with
    q = round(min(weight, max_w) / max_w * levels) (values clipped to +-clip first).
    Flower's stochastic rounding draws from numpy's global generator: with `rounding_seed`
    it is seeded for this call (and restored after), so that a run repeats exactly."""
    q_ratio = round(min(float(weight), float(max_w)) / float(max_w) * levels)
    if q_ratio <= 0:
        raise SecAggError(f"example weight {weight} is too small for max weight {max_w}")
    scaled = np.asarray(update, dtype=np.float64) * (q_ratio / levels)
    saved = np.random.get_state()
    try:
        if rounding_seed is not None:
            np.random.seed(rounding_seed % 2**32)
        (quantised,) = quantize([scaled], clip, levels)
    finally:
        np.random.set_state(saved)
    return np.concatenate([[q_ratio], quantised.astype(np.int64)]).astype(np.uint32)


def dequantised_mean(total: np.ndarray, count: int, clip: float, levels: int) -> tuple[np.ndarray, float]:
    """(the weighted mean update, the total factor sum(q) / levels) from the unmasked sum of
    `count` sites' `weighted_quantised` vectors (Flower's SecAggPlusWorkflow.unmask_stage)."""
    q_total = int(total[0])
    if q_total <= 0:
        raise SecAggError("the unmasked total weight is zero: the sum cannot be right")
    (values,) = dequantize([total[1:].astype(np.int64)], clip, levels)
    values = values - (count - 1) * clip  # each site's quantiser shifted by +clip, dequantize removed one
    return values * (levels / q_total), q_total / levels


def quantisation_step(clip: float, levels: int) -> float:
    return 2 * clip / levels


# -- masks ----------------------------------------------------------------------------------
def seed_bytes(key: bytes) -> bytes:
    """32 key bytes: a mask seed as it is, a Flower shared key (urlsafe base64 of 32) decoded."""
    if len(key) == 32:
        return key
    raw = base64.urlsafe_b64decode(key)
    if len(raw) != 32:
        raise SecAggError(f"a mask key of {len(raw)} bytes, expected 32")
    return raw


def mask(key: bytes, size: int) -> np.ndarray:
    """`size` uint32 values of the AES-256-CTR keystream of `key` (see the module's note)."""
    encryptor = Cipher(algorithms.AES(seed_bytes(key)), modes.CTR(b"\x00" * 16)).encryptor()
    stream = encryptor.update(b"\x00" * (4 * size)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def masked(vector: np.ndarray, own_seed: bytes, me: int, pair_keys: Mapping[int, bytes]) -> np.ndarray:
    """vector + mask(own seed) + sum over neighbours v of +-mask(k_uv) (+ when me > v), mod 2**32."""
    out = vector.astype(np.uint32) + mask(own_seed, vector.size)
    for node, key in sorted(pair_keys.items()):
        pair = mask(key, vector.size)
        out = out + pair if me > node else out - pair
    return out


def digest(secret: bytes) -> bytes:
    """A site's commitment to its mask seed (sent with its shares): the server checks a
    reconstructed seed against it, so a site that sends a bad share is found and left out."""
    return hashlib.sha256(b"fusedspacefed-secagg-seed" + secret).digest()


# -- Shamir -----------------------------------------------------------------------------------
def share(secret: bytes, threshold: int, num: int) -> list[bytes]:
    return create_shares(secret, threshold, num)


def share_ok(value: bytes, length: int) -> bool:
    """A share of Flower's format for a secret whose shares are `length` bytes long."""
    return isinstance(value, bytes) and len(value) == length and (len(value) - SHARE_HEADER) % 16 == 0


def recover(
    shares: Mapping[int, bytes], threshold: int, check: Callable[[bytes], bool], tries: int = 256
) -> tuple[bytes, list[int]]:
    """(the secret, the holders whose shares disagree with it) from the shares held by
    `shares`' keys. Subsets of `threshold` shares are tried in order until one gives a secret
    that passes `check`; every other share is then tested against it. SecAggError when
    fewer than `threshold` shares are given or no subset within `tries` passes."""
    holders = sorted(shares)
    if len(holders) < threshold:
        raise SecAggError(f"{len(holders)} shares, {threshold} needed")
    for subset in itertools.islice(itertools.combinations(holders, threshold), tries):
        secret = _combine([shares[h] for h in subset])
        if secret is not None and check(secret):
            break
    else:
        raise SecAggError(f"no {threshold} of the {len(holders)} shares give the secret")
    bad = []
    for holder in holders:
        if holder in subset:
            continue
        trial = _combine([shares[h] for h in subset[:-1]] + [shares[holder]])
        if trial != secret:
            bad.append(holder)
    return secret, bad


def _combine(shares: list[bytes]) -> bytes | None:
    try:
        return combine_shares(shares)
    except Exception:  # a malformed share (bad padding, duplicated index): no secret from these
        return None
