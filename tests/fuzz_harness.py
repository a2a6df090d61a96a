"""Hostile-peer fuzzing (issue 25): what a site, or an isolated site's untrusted ClientApp,
could send, generated and mutated with hypothesis, fed to the code that reads it.

Targets (each a function of hypothesis' `data`, so that the fast tests in
tests/test_fuzz.py and the long run in benchmarks/fuzz_replies.py share them):

- `unpack_case`: core.transport.unpack and check_arrays on packed content with a mutated
  layout or buffer, and on unpacked content with raw Flower Arrays;
- `strategy_case`: one method's server side on one round's replies, one of them mutated:
  the exchange's reading of a reply (server_app.faults.refusal), the strategy's `screen`,
  `aggregate_train` (stacking, robust rules, DP noise, SCAFFOLD's exchange, FuseFL's and
  FedDAF's statistics) and `aggregate_evaluate`;
- `frame_case` / `serve_case`: the warm worker's frame parser (`decode`) and `serve_one`
  over a socket pair, with a stand-in for the site's handlers;
- `round_loop_case`: the real round loop (server_app.rounds.FederatedRun: round 2 and the final
  evaluation of a run prepared once) over a grid that replays a real run's replies, one site's mutated.

The one allowed outcome for bad input: a failed site (or a refused frame) with a reason.
Anything raised out of a target is a finding. Every seed reply is real: a federation of
3 sites trains one round of the method on synthetic data first (`seed_round`).
"""

from __future__ import annotations

import copy
import io
import json
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import strategies as st

from core.transport import LAYOUT_RECORD, PACKED_RECORD, PackingError, check_arrays, pack, unpack
from tests.fl_harness import federation, server_identity, small_config, write_fake_medmnist

#: scenario -> (method, RunConfig changes, the round whose replies are fuzzed)
SCENARIOS: dict[str, tuple[str, dict, int]] = {
    "fusedspacefed": ("fusedspacefed", {}, 1),
    "fedavg": ("fedavg", {}, 1),
    "fedprox": ("fedprox", {}, 1),
    "scaffold": ("scaffold", {}, 2),  # round 2: the server's control variate exists
    "fedbn": ("fedbn", {}, 1),
    "lg-fedavg": ("lg-fedavg", {}, 1),
    "fedper": ("fedper", {}, 1),
    "fedrep": ("fedrep", {}, 1),
    "ditto": ("ditto", {}, 1),
    "fraug": ("fraug", {}, 1),
    "fusefl-stage": ("fusefl", {"num_server_rounds": 3, "fusefl_columns": 3, "fusefl_blocks": 2, "min_replies": 3}, 1),
    "fusefl-calibration": (
        "fusefl",
        {"num_server_rounds": 3, "fusefl_columns": 3, "fusefl_blocks": 2, "min_replies": 3},
        3,
    ),
    "feddaf": ("feddaf", {}, 1),
    "fedavg-dp": ("fedavg", {"dp_clip_norm": 0.5, "dp_noise_multiplier": 1.0}, 1),
    "fedavg-median": ("fedavg", {"aggregation": "median"}, 1),
    "fedavg-trimmed-mean": ("fedavg", {"aggregation": "trimmed-mean"}, 1),
    "fedavg-krum": ("fedavg", {"aggregation": "krum", "max_update_norm": 5.0}, 1),
    "fedbn-measure-gamma": ("fedbn", {"measure_gamma": True}, 1),
}


# -- seeds: one real round per scenario ----------------------------------------------------


@dataclass
class Seed:
    """A strategy ready to aggregate round `server_round`, and that round's real replies."""

    scenario: str
    server_round: int
    strategy: object
    replies: list[Message]


def seed_round(scenario: str, root: Path) -> Seed:
    """Train the scenario's method with 3 sites up to its fuzzed round; the strategy as it
    stands before aggregating that round, and the round's replies (unpacked)."""
    method, changes, fuzz_round = SCENARIOS[scenario]
    write_fake_medmnist(root / "data")
    cfg = small_config(root, method, **changes)
    node_extra = {"allow-gradients": True} if changes.get("measure_gamma") else {}
    fed = federation(root, cfg, **node_extra)
    for server_round in range(1, fuzz_round):
        fed.run_round(server_round)
    with server_identity():
        messages = fed.strategy.configure_train(fuzz_round, fed.arrays, fed.config(), fed.grid)
        replies = fed.grid.send_and_receive(messages)
    for reply in replies:
        reply.content = unpack(reply.content)
    return Seed(scenario, fuzz_round, fresh(fed.strategy), replies)


def fresh(strategy):
    """A deep copy of a strategy (the DP ledger keeps Flower's accounting module, which is shared, not copied)."""
    ledger = getattr(strategy, "ledger", None)
    memo = {id(ledger.types): ledger.types} if ledger is not None else {}
    return copy.deepcopy(strategy, memo)


# -- hypothesis strategies for hostile values ----------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
HUGE_DIMS = st.sampled_from([0, 1, 2, 7, 2**31, 2**32 + 1, 2**61 + 1, 2**63 - 1, 2**63, 2**64 + 1])
DTYPE_NAMES = st.sampled_from(
    ["<f4", "<f8", ">f4", "<f2", "<i8", "|u1", "|b1", "<c8", "|O", "|V8", "<U3", "f4,f4", "(2,)f4", "", "x"]
)
STYPES = st.sampled_from(["numpy.ndarray", "torch.Tensor", "", "numpy"])
SPECIAL_FLOATS = st.sampled_from([np.nan, np.inf, -np.inf, 3.0e38, -3.0e38, 1e300, 1e-300, 0.0, -0.0, 1e200])
NUMERIC_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_])
METRIC_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.sampled_from([0, -1, 2**62, float("nan"), float("inf")]),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
)
METRIC_NAMES = st.sampled_from(["num-examples", "site-id", "train_loss", "test_acc", "round", "x_worst"]) | st.text(
    max_size=10
)
RECORD_NAMES = st.sampled_from(["arrays", "gradients", "scaffold-dc", "fusefl-statistics", "encoder", "metrics"])


def _special_values(data: st.DataObject, like: np.ndarray) -> np.ndarray:
    """`like` with one to three entries replaced by special values, perhaps all scaled."""
    values = np.array(like)
    flat = values.reshape(-1)
    for _ in range(data.draw(st.integers(1, 3))):
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(SPECIAL_FLOATS)
    if data.draw(st.booleans()):
        values = values * data.draw(st.sampled_from([1e3, 1e30, -1e6, 0.0]))
    return np.asarray(values, dtype=like.dtype)


def _npy_header(descr: str, shape: tuple, fortran: bool = False) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return stream.getvalue()


def hostile_array(data: st.DataObject, like: np.ndarray | None) -> Array:
    """An Array as a hostile site could build it: real values of another shape or dtype,
    special values, or raw bytes whose .npy header and declared shape lie."""
    kind = data.draw(st.sampled_from(["values", "shape-dtype", "raw-header", "raw-bytes", "declared-lie"]))
    if kind == "values" and like is not None and like.size and np.issubdtype(like.dtype, np.floating):
        with np.errstate(all="ignore"):  # overflow to inf is what is wanted here
            return Array(_special_values(data, like))
    if kind in ("values", "shape-dtype"):
        shape = tuple(data.draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype, fill = data.draw(NUMERIC_DTYPES), data.draw(st.sampled_from([0, 1, -7]))
        # np.asarray: a 0-d result of arithmetic is a numpy scalar, which Array() does not take;
        # astype: numpy 2 refuses `uint8 + -7` (OverflowError) where a cast wraps around
        return Array(np.asarray(np.full(shape, fill).astype(dtype)))
    shape = tuple(data.draw(st.lists(HUGE_DIMS, max_size=3)))
    if kind == "raw-header":
        descr = data.draw(st.sampled_from(["<f4", "<f8", "|O", ">i8", "<c16", "|b1"]))
        try:
            body = _npy_header(descr, shape, data.draw(st.booleans()))
        except Exception:  # numpy refuses to write some descriptors
            body = b""
        body += data.draw(st.binary(max_size=64))
    elif kind == "raw-bytes":
        body = data.draw(st.binary(max_size=200))
    else:  # an honest .npy image whose declared dtype and shape say otherwise
        body = Array(like if like is not None else np.zeros(3, np.float32)).data
    dtype = data.draw(DTYPE_NAMES | st.text(max_size=6))
    return Array(dtype=dtype, shape=shape, stype=data.draw(STYPES), data=body)


def _arrays(record: ArrayRecord) -> dict[str, Array]:
    return {k: record[k] for k in record.keys()}


def mutate_records(data: st.DataObject, content: RecordDict) -> RecordDict:
    """One to three hostile changes to an unpacked reply's records (a new RecordDict)."""
    content = copy.deepcopy(content)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(
            st.sampled_from(
                ["array", "array", "drop-key", "add-key", "drop-record", "add-record", "metric", "gradients"]
            )
        )
        names = sorted(content.array_records)
        if op in ("array", "drop-key", "add-key") and names:
            name = data.draw(st.sampled_from(names))
            arrays = _arrays(content[name])
            keys = sorted(arrays)
            if op == "array" and keys:
                key = data.draw(st.sampled_from(keys))
                arrays[key] = hostile_array(data, _readable(arrays[key]))
            elif op == "drop-key" and keys:
                del arrays[data.draw(st.sampled_from(keys))]
            else:
                key = data.draw(
                    st.sampled_from(["encoder.conv.weight", "classifier.head.weight", "x"]) | st.text(max_size=8)
                )
                arrays[key] = hostile_array(data, None)
            content[name] = ArrayRecord(arrays)
        elif op == "drop-record" and list(content.keys()):
            del content[data.draw(st.sampled_from(sorted(content.keys())))]
        elif op == "add-record":
            name = data.draw(RECORD_NAMES | st.text(max_size=8))
            record = data.draw(st.sampled_from(["array", "metric", "config"]))
            try:
                if record == "array":
                    content[name] = ArrayRecord({"x": hostile_array(data, None)})
                elif record == "metric":
                    content[name] = MetricRecord({data.draw(METRIC_NAMES): data.draw(METRIC_VALUES)})
                else:
                    content[name] = ConfigRecord({"x": data.draw(st.text(max_size=8))})
            except Exception:  # a record Flower itself refuses to build cannot be sent either
                pass
        elif op == "metric":
            name = data.draw(st.sampled_from(["metrics", "evaluation", "site-data"]))
            values = dict(content[name]) if name in content.metric_records else {}
            values[data.draw(METRIC_NAMES)] = data.draw(METRIC_VALUES)
            try:
                content[name] = MetricRecord(values)
            except Exception:
                pass
        elif op == "gradients":
            shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
            grads = {"orig": Array(np.ones(shape, np.float32))}
            if data.draw(st.booleans()):
                grads["fused"] = hostile_array(data, np.ones(shape, np.float32))
            content["gradients"] = ArrayRecord(grads)
    return content


def _readable(array: Array) -> np.ndarray | None:
    try:
        check_arrays(RecordDict({"r": ArrayRecord({"k": array})}))
        return np.array(array.numpy())
    except PackingError:
        return None


def on_the_wire(data: st.DataObject, content: RecordDict) -> RecordDict:
    """The content as it arrives: packed, unpacked (a site may skip the packing), or packed
    with its layout or its buffer changed."""
    form = data.draw(st.sampled_from(["packed", "unpacked", "layout", "layout", "buffer"]))
    if form == "unpacked":
        return content
    try:
        packed = pack(content)
    except Exception:  # pack reads every array: a hostile one travels unpacked
        return content
    if form == "packed" or LAYOUT_RECORD not in packed.config_records:
        return packed
    if form == "layout":
        layout = json.loads(str(packed[LAYOUT_RECORD]["layout"]))
        if layout and data.draw(st.booleans()):
            entry = layout[data.draw(st.integers(0, len(layout) - 1))]
            field = data.draw(st.integers(0, 5))
            entry[field] = data.draw(
                JSON_VALUES
                | st.lists(HUGE_DIMS, max_size=3)
                | st.sampled_from([2**61 + 1, 2**63, -1, 10**30, "<f8", "|O", [2**61 + 1, 8]])
            )
            text = json.dumps(layout)
        else:
            text = data.draw(
                st.sampled_from(["[" * 5000, "{}", "null", "[[]]", '[["arrays", "k", "<f4", [1], 0, 4]]'])
                | st.text(max_size=40)
            )
        packed[LAYOUT_RECORD] = ConfigRecord({"layout": text})
        return packed
    buffer = np.array(packed[PACKED_RECORD]["bytes"].numpy())
    change = data.draw(st.sampled_from(["truncate", "extend", "flip", "float"]))
    if change == "truncate":
        buffer = buffer[: data.draw(st.integers(0, max(0, buffer.size - 1)))]
    elif change == "extend":
        buffer = np.concatenate([buffer, np.frombuffer(data.draw(st.binary(min_size=1, max_size=64)), np.uint8)])
    elif change == "flip" and buffer.size:
        buffer[data.draw(st.integers(0, buffer.size - 1))] ^= 0xFF
    else:
        buffer = buffer[: buffer.size // 4 * 4].view(np.float32)
    packed[PACKED_RECORD] = ArrayRecord({"bytes": Array(np.ascontiguousarray(buffer))})
    return packed


# -- targets -----------------------------------------------------------------------------


def unpack_case(data: st.DataObject, seed: Seed) -> str:
    """unpack + check_arrays raise PackingError or nothing; what happened."""
    reply = seed.replies[data.draw(st.integers(0, len(seed.replies) - 1))]
    content = on_the_wire(data, mutate_records(data, reply.content) if data.draw(st.booleans()) else reply.content)
    try:
        check_arrays(unpack(content))
    except PackingError as exc:
        assert str(exc)
        return "refused"
    return "read"


def strategy_case(data: st.DataObject, seed: Seed) -> str:
    """One round's aggregation with one hostile reply: it is read, screened and aggregated
    with the honest ones, or it is a failed site with a reason; nothing is raised and the
    global model stays finite."""
    from server_app.faults import refusal

    strategy = fresh(seed.strategy)
    replies = [copy.copy(m) for m in seed.replies]
    victim = data.draw(st.integers(0, len(replies) - 1))
    for i, msg in enumerate(replies):
        content = copy.deepcopy(msg.content)
        if i == victim:
            content = on_the_wire(data, mutate_records(data, content))
        msg.content = content
    read, failed = [], []
    for msg in replies:
        reason = refusal(msg)
        (failed.append(reason) if reason else read.append(msg))
    good, bad = strategy.screen(read)
    failed += [reason for _, reason in bad]
    assert all(isinstance(r, str) and r for r in failed), failed
    assert len(good) + len(failed) == len(replies)
    if good:
        arrays, _ = strategy.aggregate_train(seed.server_round, good)
        for key in arrays.keys():
            values = arrays[key].numpy()
            assert not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all(), key
    strategy.aggregate_evaluate(seed.server_round, read)
    return "failed site" if failed else "aggregated"


# -- the worker --------------------------------------------------------------------------


class EchoSite:
    """Stands in for client_app.site in a Worker: replies with what it received."""

    IMPORTED = 0.0
    HANDLERS = {"train": lambda content, context, timeline: content, "evaluate": lambda c, x, t: c}


def echo_worker():
    from client_app import worker

    w = worker.Worker.__new__(worker.Worker)  # torch, data and models are not needed to read frames
    w.site, w.code, w.states, w.node_config = EchoSite, worker.code_digest(), {}, None
    from flwr.app import Context

    w.Context = Context
    return w


def hostile_frame(data: st.DataObject, code: str) -> bytes:
    """A frame (length prefix included) as the untrusted ClientApp could send it."""
    import struct

    from client_app import worker

    header = {"protocol": worker.PROTOCOL, "code": code, "kind": "train", "node_config": {}, "run_id": 1}
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
            "config": ConfigRecord({"server-round": 1}),
            "metrics": MetricRecord({"num-examples": 3}),
        }
    )
    kind = data.draw(st.sampled_from(["valid", "header-field", "header-json", "records", "layout", "bytes", "prefix"]))
    if kind == "header-field":
        header[data.draw(st.sampled_from(sorted(header)))] = data.draw(JSON_VALUES)
    frame = worker.encode(header, content)
    (size,) = struct.unpack_from("!Q", frame)
    head, body = frame[8 : 8 + size], frame[8 + size :]
    if kind == "header-json":
        head = data.draw(
            st.sampled_from([b'"x"', b"1", b"[" * 200_000, b"{" * 1000, b'{"records": 5}'])
            | JSON_VALUES.map(lambda v: json.dumps(v).encode())
            | st.binary(max_size=64)
        )
    elif kind == "records":
        parsed = json.loads(head)
        parsed["records"][data.draw(st.sampled_from(["configs", "metrics", "arrays"]))] = data.draw(JSON_VALUES)
        head = json.dumps(parsed).encode()
    elif kind == "layout":
        parsed = json.loads(head)
        parsed["records"]["configs"][LAYOUT_RECORD] = {"layout": data.draw(JSON_VALUES.map(json.dumps))}
        head = json.dumps(parsed).encode()
    elif kind == "bytes":
        body = data.draw(st.binary(max_size=64)) if data.draw(st.booleans()) else body[: data.draw(st.integers(0, 24))]
    inner = struct.pack("!Q", len(head)) + head + body
    if kind == "prefix":
        inner = struct.pack("!Q", data.draw(st.sampled_from([0, 1, 7, 2**63, 2**64 - 1]))) + inner[8:]
    return inner


def frame_case(data: st.DataObject) -> str:
    """decode() raises FrameError or returns; Worker.handle always answers with a frame."""
    from client_app import worker

    w = echo_worker()
    frame = hostile_frame(data, w.code)
    try:
        worker.decode(frame)
        outcome = "read"
    except worker.FrameError as exc:
        assert str(exc)
        outcome = "refused"
    header, _ = worker.decode(w.handle(frame))
    assert outcome == "read" or header.get("error")
    return outcome


def serve_case(data: st.DataObject) -> str:
    """serve_one over a socket pair: it returns (never raises), with a reply frame that
    decodes, or a dropped connection; the client may send a short or over-long frame, or
    hang up early."""
    import struct

    from client_app import worker

    w = echo_worker()
    frame = hostile_frame(data, w.code)
    declared = data.draw(st.sampled_from(["exact", "exact", "short", "long", "huge"]))
    length = {"exact": len(frame), "short": max(0, len(frame) - 3), "long": len(frame) + 5, "huge": 2**40}[declared]
    client, server = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            worker.serve_one(w, server)
        except BaseException as exc:  # a finding: serve_one must never raise
            errors.append(exc)
        finally:
            server.close()  # as serve() does after each connection

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    reply = None
    try:
        client.settimeout(5)
        client.sendall(struct.pack("!Q", length) + frame)
        if declared == "long":
            client.shutdown(socket.SHUT_WR)  # hangs up before the frame is complete
        reply = worker._receive(client)
    except (OSError, ConnectionError):
        pass
    finally:
        thread.join(worker.RECEIVE_TIMEOUT + 5)
        client.close()
    assert not thread.is_alive(), "serve_one still runs"
    assert not errors, errors
    if reply is None:
        return "dropped"
    header, _ = worker.decode(reply)
    return "refused" if header.get("error") else "served"


# -- the round loop ----------------------------------------------------------------------


@dataclass
class ReplayGrid:
    """Flower's Grid over canned replies: every message gets the real reply its node gave
    in a real run (train or evaluate); node `hostile`'s goes through `mutate` first."""

    canned: dict[tuple[int, str], Message]
    mutate: object = None
    hostile: int = 2
    outbox: dict | None = None
    pushed: int = 0

    def get_node_ids(self) -> list[int]:
        return sorted({node for node, _ in self.canned})

    def push_messages(self, messages) -> list[str]:
        self.outbox = self.outbox or {}
        ids = []
        for msg in messages:
            self.pushed += 1
            ids.append(f"message-{self.pushed}")
            reply = copy.copy(self.canned[(msg.metadata.dst_node_id, msg.metadata.message_type)])
            reply.content = copy.deepcopy(reply.content)
            if msg.metadata.dst_node_id == self.hostile and self.mutate is not None:
                reply.content = self.mutate(reply.content)
            self.outbox[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


@dataclass
class RoundLoop:
    """A real FederatedRun of 2 rounds, prepared and through round 1 with honest replies;
    `snapshot` is its state after round 1, which every case starts from."""

    run: object
    grid: ReplayGrid
    snapshot: tuple


def round_loop(root: Path, method: str = "fusedspacefed") -> RoundLoop:
    """Record a real 2-round run of `method` with 3 sites (the last train reply of each
    node, which carries its evaluation of round 1, and its final evaluate reply), then
    prepare a FederatedRun over a ReplayGrid of those replies and run its round 1."""
    from server_app.rounds import FederatedRun
    from tests.test_server_resume import LocalGrid, run

    write_fake_medmnist(root / "data")
    cfg = small_config(root, method, run_name="canned", num_server_rounds=2, min_replies=2)
    canned: dict[tuple[int, str], Message] = {}

    class Recording(LocalGrid):
        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            for reply in replies:
                canned[(reply.metadata.src_node_id, reply.metadata.message_type)] = copy.deepcopy(reply)
            return replies

    run(cfg, Recording(root / "site-state"))
    grid = ReplayGrid(canned)
    case_cfg = cfg.replace(results_dir=str(root / "fuzz"), run_name="fuzz", track_tensorboard=False, keep_checkpoints=1)
    with server_identity():
        loop = FederatedRun(grid, case_cfg)
        loop.first_round = loop.prepare()
        loop.run_round(1)
    snapshot = (loop.arrays, fresh(loop.strategy), copy.deepcopy(loop.rows), copy.deepcopy(loop.book))
    return RoundLoop(loop, grid, snapshot)


def round_loop_case(data: st.DataObject, loop: RoundLoop) -> str:
    """Round 2 and the final evaluation of the real round loop (FederatedRun.run_round,
    evaluate_final: the exchange, the data reports, screening, aggregation, evaluation
    records, metrics rows and checkpoint), node 2's replies mutated: it ends with node 2 a
    failed site or aggregated, never an exception, and a finite global model. (With
    min-replies = 2, the two honest sites are enough: TooFewReplies would be a finding.)"""

    def mutate(content: RecordDict) -> RecordDict:
        return on_the_wire(data, mutate_records(data, unpack(content)))

    run = loop.run
    arrays, strategy, rows, book = loop.snapshot
    run.arrays, run.strategy, run.rows, run.book = arrays, fresh(strategy), copy.deepcopy(rows), copy.deepcopy(book)
    run.data_reports = {}
    loop.grid.mutate = mutate
    with server_identity():
        run.run_round(2)
        run.evaluate_final()
    failures = [f for row in run.rows for f in row.get("failed_sites", []) + row.get("failed_eval_sites", [])]
    assert all(f.startswith("node 2") for f in failures), failures
    assert [row["round"] for row in run.rows] == [1, 2] and all("num_evaluated" in row for row in run.rows)
    for key in run.arrays.keys():
        values = run.arrays[key].numpy()
        assert not np.issubdtype(values.dtype, np.floating) or np.isfinite(values).all(), key
    return "failed site" if failures else "aggregated"
