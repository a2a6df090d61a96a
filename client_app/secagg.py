"""The site's side of secure aggregation (SecAgg+; the arithmetic is core/secagg.py).

A train message with `secure-aggregation = true` trains as ever, but the reply carries no
shared arrays: the site keeps its update (the shared floating-point arrays minus those it
received, clipped first under DP) and its example weight in `context.state`, makes two key
pairs and sends only the public keys (`advertise`). Three more messages of the same round
follow, each answered from that state:

1. `share_keys`: the public keys of its neighbours arrive; the site draws its mask seed
   b, splits b and its first secret key sk1 into Shamir shares, and sends each neighbour
   its shares encrypted with their agreed key (sk2, pk2), with a digest of b.
2. `masked_input`: the ciphertexts addressed to it arrive; it keeps the shares, and sends
   its weighted, quantised update plus the mask of b plus, for every neighbour that sent
   shares, the pairwise mask agreed from (sk1, pk1) (added or subtracted by node order).
3. `unmask`: the server says which sites' masked inputs it holds (active) and which
   dropped after sharing (dead); the site sends its share of b for each active neighbour
   and its share of sk1 for each dead one (never both for one site), then forgets the
   round's secrets.

The secret keys, the seed, the shares it holds for others, the agreed keys and the update
never leave the site: they live in `context.state` (the SuperNode's memory, or the warm
worker's) and are deleted after `unmask` or by the next round's train message.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from core.secagg import (
    MASKED_INPUT,
    MASKED_RECORD,
    SHARE_KEYS,
    STAGE_BYTES,
    STAGE_CONFIG,
    UNMASK,
    VECTOR_KEY,
    SecAggError,
    digest,
    masked,
    share,
    threshold_for,
    weighted_quantised,
)

SECRETS = "secagg-secrets"  # array record in context.state: keys, seed, shares, the update (never sent)
SETTINGS = "secagg-settings"  # config record in context.state: the round and the settings it used


def _b(value: bytes) -> Array:
    return Array(np.frombuffer(value, dtype=np.uint8).copy())


def _bytes(record: ArrayRecord, key: str) -> bytes:
    if key not in record:
        raise SecAggError(f"missing {key!r}")
    values = record[key].numpy()
    if values.dtype != np.uint8 or values.ndim != 1:
        raise SecAggError(f"{key!r} is not a byte string")
    return values.tobytes()


def _ids(config: ConfigRecord, key: str) -> list[int]:
    values = config.get(key)
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SecAggError(f"{key!r} is not a list of node ids")
    if len(set(values)) != len(values):
        raise SecAggError(f"{key!r} lists a node twice")
    return list(values)


def forget(state: RecordDict) -> None:
    for name in (SECRETS, SETTINGS):
        if name in state:
            del state[name]


def advertise(
    state: RecordDict, update: np.ndarray, weight: float, server_round: int, settings: dict[str, Any]
) -> ArrayRecord:
    """Keep the update and two fresh key pairs; the public keys to send (SecAgg+ stage 0)."""
    forget(state)  # an earlier round's secrets (a round that failed) are never reused
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    secrets = {
        "sk1": _b(private_key_to_bytes(sk1)),
        "sk2": _b(private_key_to_bytes(sk2)),
        "pk1": _b(public_key_to_bytes(pk1)),
        "pk2": _b(public_key_to_bytes(pk2)),
        "update": Array(np.asarray(update, dtype=np.float64)),
    }
    state[SECRETS] = ArrayRecord(secrets)
    state[SETTINGS] = ConfigRecord({"round": server_round, "weight": float(weight), "stage": 0, **settings})
    return ArrayRecord({"pk1": secrets["pk1"], "pk2": secrets["pk2"]})


def _held(context: Context, stage: int) -> tuple[ArrayRecord, ConfigRecord]:
    state = context.state
    if SECRETS not in state.array_records or SETTINGS not in state.config_records:
        raise SecAggError("this site holds no secure-aggregation state (no train message of this round reached it)")
    settings = state.config_records[SETTINGS]
    if int(settings["stage"]) != stage - 1:
        raise SecAggError(f"stage {stage} asked after stage {settings['stage']}: stages run once, in order")
    return state.array_records[SECRETS], settings


def _check_round(content: RecordDict, settings: ConfigRecord) -> ConfigRecord:
    config = content.config_records.get(STAGE_CONFIG)
    if config is None or config.get("round") != settings["round"]:
        raise SecAggError(
            f"a stage message of round {None if config is None else config.get('round')}, "
            f"this site's update is of round {settings['round']}"
        )
    return config


def share_keys(content: RecordDict, context: Context, timeline: Any = None) -> RecordDict:
    """Stage 1: shares of the mask seed and of sk1, one ciphertext per neighbour."""
    secrets, settings = _held(context, 1)
    config = _check_round(content, settings)
    keys = content.array_records.get(STAGE_BYTES, ArrayRecord())
    me = config.get("node")
    nodes = _ids(config, "nodes")  # this site and its neighbours, in share order
    if me not in nodes:
        raise SecAggError("the server's list of neighbours leaves this site out")
    public = {n: (_bytes(keys, f"pk1/{n}"), _bytes(keys, f"pk2/{n}")) for n in nodes}
    flat = [k for pair in public.values() for k in pair]
    if len(set(flat)) != len(flat):
        raise SecAggError("some public keys are identical")
    if public[me] != (_bytes(secrets, "pk1"), _bytes(secrets, "pk2")):
        raise SecAggError("the server lists other public keys for this site than it advertised")
    threshold = threshold_for(len(nodes), float(settings["threshold"]))
    seed = os.urandom(32)
    seed_shares = share(seed, threshold, len(nodes))
    sk1_shares = share(_bytes(secrets, "sk1"), threshold, len(nodes))
    sk2 = bytes_to_private_key(_bytes(secrets, "sk2"))
    held = {"seed": _b(seed)}
    out: dict[str, Array] = {"digest": _b(digest(seed))}
    dsts = []
    for index, node in enumerate(nodes):
        if node == me:
            held[f"share-seed/{node}"], held[f"share-sk1/{node}"] = _b(seed_shares[index]), _b(sk1_shares[index])
            continue
        agreed = generate_shared_key(sk2, bytes_to_public_key(public[node][1]))
        held[f"ss2/{node}"], held[f"pk1/{node}"] = _b(agreed), _b(public[node][0])
        plaintext = share_keys_plaintext_concat(me, node, seed_shares[index], sk1_shares[index])
        out[f"ctxt/{node}"] = _b(encrypt(agreed, plaintext))
        dsts.append(node)
    for key, value in held.items():
        secrets[key] = value
    settings["stage"], settings["node"], settings["threshold-count"] = 1, me, threshold
    return RecordDict({STAGE_CONFIG: ConfigRecord({"dsts": dsts}), STAGE_BYTES: ArrayRecord(out)})


def masked_input(content: RecordDict, context: Context, timeline: Any = None) -> RecordDict:
    """Stage 2: the shares addressed to this site kept; the masked weighted update sent."""
    secrets, settings = _held(context, 2)
    config = _check_round(content, settings)
    me, threshold = int(settings["node"]), int(settings["threshold-count"])
    srcs = _ids(config, "srcs")
    if len(srcs) + 1 < threshold:
        raise SecAggError(f"{len(srcs) + 1} sites shared keys with this one, fewer than the threshold {threshold}")
    ciphertexts = content.array_records.get(STAGE_BYTES, ArrayRecord())
    pair_keys = {}
    sk1 = bytes_to_private_key(_bytes(secrets, "sk1"))
    for src in srcs:
        if f"ss2/{src}" not in secrets:
            raise SecAggError(f"node {src} is not one of this site's neighbours")
        plaintext = decrypt(_bytes(secrets, f"ss2/{src}"), _bytes(ciphertexts, f"ctxt/{src}"))
        actual, dst, seed_share, sk1_share = share_keys_plaintext_separate(plaintext)
        if actual != src or dst != me:
            raise SecAggError(f"a ciphertext from node {actual} to node {dst} arrived as one from {src} to {me}")
        secrets[f"share-seed/{src}"], secrets[f"share-sk1/{src}"] = _b(seed_share), _b(sk1_share)
        pair_keys[src] = generate_shared_key(sk1, bytes_to_public_key(_bytes(secrets, f"pk1/{src}")))
    vector = weighted_quantised(
        secrets["update"].numpy(),
        float(settings["weight"]),
        int(settings["max-weight"]),
        float(settings["clip"]),
        int(settings["levels"]),
        int(settings["rounding-seed"]),
    )
    out = masked(vector, _bytes(secrets, "seed"), me, pair_keys)
    del secrets["update"]  # the plain update is not needed any more
    settings["stage"] = 2
    return RecordDict({MASKED_RECORD: ArrayRecord({VECTOR_KEY: Array(out)})})


def unmask(content: RecordDict, context: Context, timeline: Any = None) -> RecordDict:
    """Stage 3: seed shares of active neighbours, sk1 shares of dead ones; then forget."""
    secrets, settings = _held(context, 3)
    config = _check_round(content, settings)
    threshold = int(settings["threshold-count"])
    active, dead = _ids(config, "active"), _ids(config, "dead")
    if set(active) & set(dead):
        raise SecAggError("the server lists a site as both active and dropped")
    held = {int(k.split("/")[1]) for k in secrets.keys() if k.startswith("share-seed/")}
    if not set(active) | set(dead) <= held:
        raise SecAggError("the server asks for shares this site does not hold")
    if len(active) < threshold:
        raise SecAggError(f"{len(active)} active sites, fewer than the threshold {threshold}")
    out = {f"seed/{n}": secrets[f"share-seed/{n}"] for n in active}
    out.update({f"sk1/{n}": secrets[f"share-sk1/{n}"] for n in dead})
    forget(context.state)
    return RecordDict(
        {STAGE_CONFIG: ConfigRecord({"active": active, "dead": dead}), STAGE_BYTES: ArrayRecord(dict(out))}
    )


HANDLERS = {SHARE_KEYS: share_keys, MASKED_INPUT: masked_input, UNMASK: unmask}
