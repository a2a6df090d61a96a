"""The server's side of secure aggregation (SecAgg+), run by the round loop after the train
exchange when `secure-aggregation = true` (the sites' side: client_app/secagg.py; the
arithmetic: core/secagg.py).

The train replies carry each site's public keys (pk1, pk2) and no shared arrays. Three
more exchanges of the round follow, each a Message-API push and pull through the same
`exchange` as every round (timeouts, failed sites, late sites):

1. share keys: each site gets its neighbours' public keys and answers with one
   ciphertext per neighbour (its shares of its mask seed and of sk1, which the server
   cannot read) and a digest of its seed;
2. masked input: each site gets the ciphertexts addressed to it and answers with its
   masked, weighted, quantised update; the server adds them (mod 2**32);
3. unmask: each site is told which neighbours' inputs are in the sum (active) and which
   dropped after sharing (dead), and answers with shares: of the seed of each active one,
   of sk1 of each dead one. With `threshold` shares of each the server removes every mask
   and learns the sum of the weighted updates and the sum of the weights, nothing else.

Failures: a site that does not answer a stage, or answers it with a malformed reply, is a
failed site of the round (its reason in `failed_sites`), never an exception. A site whose
shares do not rebuild the secret they claim to (checked against the digest of the seed,
and against the advertised pk1 for sk1) is failed too and its shares are left out. When
fewer than max(2, min-replies) sites remain in the sum, or some secret cannot be rebuilt
from the shares that remain, the round raises `TooFewReplies`: the run stops after the
previous round's checkpoint and resumes from it, as when too few sites train.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key, public_key_to_bytes

from core.config import RunConfig
from core.secagg import (
    KEYS_RECORD,
    MASKED_INPUT,
    MASKED_RECORD,
    MOD_RANGE,
    SHARE_HEADER,
    SHARE_KEYS,
    STAGE_BYTES,
    STAGE_CONFIG,
    UNMASK,
    VECTOR_KEY,
    SecAggError,
    dequantised_mean,
    digest,
    mask,
    neighbours,
    recover,
    threshold_for,
    unflatten,
    update_keys,
)
from server_app.faults import Exchange, SiteBook, TooFewReplies, exchange

SEED_SHARE_BYTES = SHARE_HEADER + 48  # a 32-byte seed, padded to 48 (Flower's Shamir)


@dataclass
class SecureSum:
    """What the server learns: the weighted mean of the sites' updates (per array), the
    sites whose inputs are in it, and what it cost."""

    mean_update: dict[str, np.ndarray]
    summed: list[int]  # node ids
    total_weight: float  # sum of q / levels (the weights, as a share of max weight)
    failed: list[str] = field(default_factory=list)
    upload_bytes: dict[int, int] = field(default_factory=dict)  # node -> array bytes it sent in the stages
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _bytes(record: ArrayRecord, key: str) -> bytes | None:
    if record is None or key not in record:
        return None
    values = record[key].numpy()
    return values.tobytes() if values.dtype == np.uint8 and values.ndim == 1 else None


def _array_bytes(msg: Message) -> int:
    return sum(int(r[k].numpy().nbytes) for r in msg.content.array_records.values() for k in r.keys())


class SecureRound:
    """One round's SecAgg+ after its train exchange."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        book: SiteBook,
        server_round: int,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, np.dtype],
    ) -> None:
        self.grid, self.cfg, self.book, self.round = grid, cfg, book, server_round
        self.keys = update_keys(dtypes)
        self.shapes = {k: tuple(shapes[k]) for k in self.keys}
        self.size = 1 + sum(int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.keys)
        self.minimum = max(2, cfg.min_replies)
        self.failed: list[str] = []
        self.uploaded: Counter[int] = Counter()
        self.seconds: dict[str, float] = {}

    # -- helpers ------------------------------------------------------------------------
    def fail(self, node: int, reason: str) -> None:
        self.failed.append(f"{self.book.label(node)}: secure aggregation: {reason}")

    def stop(self, what: str) -> TooFewReplies:
        return TooFewReplies(
            f"round {self.round}: secure aggregation stopped at {what} ({'; '.join(self.failed) or 'no failures'}). "
            f'The run stopped; resume it with resume-from = "latest" (checkpoint of round {self.round - 1})'
        )

    def need(self, nodes: set[int], what: str) -> None:
        if len(nodes) < self.minimum:
            raise self.stop(f"{what}: {len(nodes)} sites left, fewer than max(2, min-replies) = {self.minimum}")

    def stage(self, action: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        messages = [
            Message(content=content, message_type=f"train.{action}", dst_node_id=node)
            for node, content in sorted(contents.items())
        ]
        started = time.time()
        result: Exchange = exchange(
            self.grid, messages, self.cfg.round_timeout, self.book, f"round {self.round} ({action})"
        )
        self.seconds[action] = time.time() - started
        self.failed += [f"{f} (secure aggregation, {action})" for f in result.failed]
        replies = {}
        for msg in result.replies:
            node = msg.metadata.src_node_id
            if node in contents:
                replies[node] = msg
                self.uploaded[node] += _array_bytes(msg)
        return replies

    def config(self, node: int, **values: object) -> ConfigRecord:
        return ConfigRecord({"round": self.round, "node": node, **values})

    # -- the protocol ---------------------------------------------------------------------
    def run(self, train_replies: list[Message]) -> SecureSum:
        public: dict[int, tuple[bytes, bytes]] = {}
        for msg in train_replies:
            record = msg.content.array_records[KEYS_RECORD]
            public[msg.metadata.src_node_id] = (_bytes(record, "pk1"), _bytes(record, "pk2"))
            self.uploaded[msg.metadata.src_node_id] += _array_bytes(msg)
        seen = Counter(k for pair in public.values() for k in pair)
        for node, pair in list(public.items()):
            if any(seen[k] > 1 for k in pair) or pair[0] == pair[1]:
                self.fail(node, "advertised a public key that is not its own alone")
                del public[node]
        self.need(set(public), "the keys")
        if len(public) * self.cfg.secagg_quantization >= MOD_RANGE:
            raise self.stop(f"the keys: {len(public)} sites x secagg-quantization would overflow 2**32")
        graph = neighbours(public, self.cfg.secagg_neighbours)
        group = {u: sorted([u, *graph[u]]) for u in graph}
        threshold = {u: threshold_for(len(group[u]), self.cfg.secagg_threshold) for u in graph}

        # 1. share keys
        contents = {}
        for u in graph:
            keys = {}
            for n in group[u]:
                keys[f"pk1/{n}"] = np.frombuffer(public[n][0], dtype=np.uint8).copy()
                keys[f"pk2/{n}"] = np.frombuffer(public[n][1], dtype=np.uint8).copy()
            contents[u] = RecordDict({STAGE_CONFIG: self.config(u, nodes=group[u]), STAGE_BYTES: _record(keys)})
        ciphertexts: dict[int, dict[int, bytes]] = {}  # dst -> src -> ciphertext
        digests: dict[int, bytes] = {}
        for u, msg in self.stage(SHARE_KEYS, contents).items():
            config = msg.content.config_records.get(STAGE_CONFIG)
            data = msg.content.array_records.get(STAGE_BYTES)
            dsts = config.get("dsts") if config is not None else None
            out = {d: _bytes(data, f"ctxt/{d}") for d in graph[u]}
            seed_digest = _bytes(data, "digest")
            if dsts is None or sorted(dsts) != graph[u] or any(v is None or len(v) > 8192 for v in out.values()):
                self.fail(u, "malformed share-keys reply (not one ciphertext for each neighbour)")
                continue
            if seed_digest is None or len(seed_digest) != 32:
                self.fail(u, "malformed share-keys reply (no seed digest)")
                continue
            digests[u] = seed_digest
            for d, text in out.items():
                ciphertexts.setdefault(d, {})[u] = text
        shared = set(digests)
        self.need(shared, "key sharing")

        # 2. masked input
        contents, sources = {}, {}
        for v in sorted(shared):
            srcs = sorted(u for u in graph[v] if u in shared)
            sources[v] = srcs
            texts = {f"ctxt/{u}": np.frombuffer(ciphertexts[v][u], dtype=np.uint8).copy() for u in srcs}
            contents[v] = RecordDict({STAGE_CONFIG: self.config(v, srcs=srcs), STAGE_BYTES: _record(texts)})
        total = np.zeros(self.size, dtype=np.uint32)
        summed = set()
        for v, msg in self.stage(MASKED_INPUT, contents).items():
            record = msg.content.array_records.get(MASKED_RECORD)
            vector = record[VECTOR_KEY].numpy() if record is not None and VECTOR_KEY in record else None
            if vector is None or vector.dtype != np.uint32 or vector.shape != (self.size,):
                self.fail(v, f"malformed masked input (expected uint32[{self.size}])")
                continue
            total += vector  # (uint32: wraps modulo 2**32)
            summed.add(v)
        self.need(summed, "the masked inputs")
        dead = shared - summed

        # 3. unmask
        contents = {}
        for w in sorted(summed):
            active = sorted(n for n in group[w] if n in summed)
            gone = sorted(n for n in sources[w] if n in dead)
            contents[w] = RecordDict({STAGE_CONFIG: self.config(w, active=active, dead=gone)})
        seed_shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        sk1_shares: dict[int, dict[int, bytes]] = {}
        for w, msg in self.stage(UNMASK, contents).items():
            data = msg.content.array_records.get(STAGE_BYTES)
            asked = contents[w][STAGE_CONFIG]
            got = {n: _bytes(data, f"seed/{n}") for n in asked["active"]}
            lost = {n: _bytes(data, f"sk1/{n}") for n in asked["dead"]}
            if any(s is None or len(s) != SEED_SHARE_BYTES for s in got.values()) or any(
                s is None or len(s) <= SHARE_HEADER or (len(s) - SHARE_HEADER) % 16 for s in lost.values()
            ):
                self.fail(w, "malformed shares in the unmask reply")
                continue
            for n, s in got.items():
                seed_shares.setdefault(n, {})[w] = s
            for n, s in lost.items():
                sk1_shares.setdefault(n, {})[w] = s

        bad: set[int] = set()
        try:
            for a in sorted(summed):
                seed, wrong = recover(
                    seed_shares.get(a, {}), threshold[a], lambda s, a=a: len(s) == 32 and digest(s) == digests[a]
                )
                bad |= set(wrong)
                total -= mask(seed, self.size)
            for d in sorted(dead):
                shares = sk1_shares.get(d, {})
                lengths = Counter(len(s) for s in shares.values())
                if lengths:  # shares of another length than most cannot be right
                    common = lengths.most_common(1)[0][0]
                    bad |= {h for h, s in shares.items() if len(s) != common}
                    shares = {h: s for h, s in shares.items() if len(s) == common}
                secret, wrong = recover(shares, threshold[d], lambda s, d=d: _is_key_of(s, public[d][0]))
                bad |= set(wrong)
                sk1 = bytes_to_private_key(secret)
                for v in sorted(summed):
                    if d not in sources[v]:
                        continue
                    pair = mask(generate_shared_key(sk1, bytes_to_public_key(public[v][0])), self.size)
                    total = total - pair if v > d else total + pair  # undo what v added (core.secagg.masked)
        except SecAggError as exc:
            for w in sorted(bad):
                self.fail(w, "sent shares that do not rebuild the secrets")
            raise self.stop(f"unmasking: {exc}") from None
        for w in sorted(bad):
            self.fail(w, "sent shares that do not rebuild the secrets (left out)")
        flat, weight = dequantised_mean(total, len(summed), self.cfg.secagg_clip, self.cfg.secagg_quantization)
        return SecureSum(
            unflatten(flat, self.shapes, self.keys),
            sorted(summed),
            weight,
            failed=self.failed,
            upload_bytes=dict(self.uploaded),
            stage_seconds=self.seconds,
        )


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def _is_key_of(secret: bytes, pk1: bytes) -> bool:
    try:
        return public_key_to_bytes(bytes_to_private_key(secret).public_key()) == pk1
    except Exception:  # not a private key at all
        return False


def secure_sum(
    grid: Grid,
    cfg: RunConfig,
    book: SiteBook,
    server_round: int,
    train_replies: list[Message],
    specs: Mapping[str, object],
) -> SecureSum:
    """SecAgg+ over the sites of `train_replies` (screened); `specs`: the shared arrays'
    shapes and dtypes (strategies.base.ArraySpec)."""
    shapes = {k: s.shape for k, s in specs.items()}
    dtypes = {k: s.dtype for k, s in specs.items()}
    return SecureRound(grid, cfg, book, server_round, shapes, dtypes).run(train_replies)
