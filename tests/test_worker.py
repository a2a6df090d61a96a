"""The warm site worker: the thin ClientApp hands messages to a long-running process
over a Unix socket and gets exactly the reply it would have computed itself; a worker
restart continues from the site's state on disk; a missing or mismatched worker falls
back to running the message in the ClientApp process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client_app import worker
from core.transport import pack
from tests.fl_harness import federation, server_identity, small_config, state_dict

REPO = Path(__file__).resolve().parents[1]


def start_worker(sock: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "client_app.worker", "--socket", str(sock), *args]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.time() + 120
    while not sock.exists():
        assert proc.poll() is None, "the worker exited"
        assert time.time() < deadline, "the worker did not open its socket"
        time.sleep(0.1)
    return proc


def test_the_wire_format_keeps_every_record_exactly():
    content = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "a.weight": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
                    "a.count": Array(np.array(7, dtype=np.int64)),
                    "empty": Array(np.zeros((0, 4), dtype=np.float64)),
                }
            ),
            "config": ConfigRecord({"method": "fedavg", "lr": 0.1, "server-round": 3, "task-aware": True}),
            "metrics": MetricRecord({"num-examples": 12, "train_loss": 0.5}),
        }
    )
    header, back = worker.decode(worker.encode({"kind": "train"}, content))
    assert header == {"kind": "train"}
    assert list(back["arrays"].keys()) == list(content["arrays"].keys())
    for key in content["arrays"].keys():
        a, b = content["arrays"][key].numpy(), back["arrays"][key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert dict(back["config"]) == dict(content["config"]) and dict(back["metrics"]) == dict(content["metrics"])
    # one wire format: the frame carries core.transport's packed bytes as they are, so a
    # packed message passes through the thin app to the worker and back without re-encoding
    packed = pack(content)
    frame = worker.encode({"kind": "train"}, packed)
    buffer = packed["packed"]["bytes"].numpy().tobytes()
    assert frame.endswith(buffer)
    _, forwarded = worker.decode(frame, keep_packed=True)
    assert forwarded["packed"]["bytes"].numpy().tobytes() == buffer
    assert dict(forwarded["packing"]) == dict(packed["packing"])
    # and a layout that does not describe its buffer is refused by core.transport's checks
    forged = RecordDict(
        {**dict(packed.items()), "packing": ConfigRecord({"layout": '[["arrays", "x", "<f4", [10000], 0, 40000]]'})}
    )
    with pytest.raises(worker.FrameError, match="does not fit the buffer"):
        worker.decode(worker.encode({}, forged))


@pytest.fixture
def short_tmp():
    """Unix socket paths must stay short (about 100 characters)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsf-") as folder:
        yield Path(folder)


def _arrays(replies):
    return [state_dict(m.content["arrays"]) for m in sorted(replies, key=lambda m: m.metadata.src_node_id)]


def _same(a, b):
    return all(k in y and np.array_equal(x[k].numpy(), y[k].numpy()) for x, y in zip(a, b) for k in x)


@pytest.mark.slow  # starts and restarts a site worker process, ~20 s
def test_worker_replies_equal_in_process_replies_and_survive_a_restart(tmp_path, short_tmp, caplog):
    cfg = small_config(tmp_path, "fusedspacefed", num_server_rounds=3)
    reference = federation(tmp_path / "ref", cfg.replace(results_dir=str(tmp_path / "ref-results")))
    expected = [_arrays(reference.run_round(r)) for r in (1, 2, 3)]

    sock = short_tmp / "w.sock"
    proc = start_worker(sock)
    try:
        fed = federation(tmp_path / "w", cfg, **{worker.WORKER_KEY: str(sock)})
        got = [_arrays(fed.run_round(1))]
        timeline = fed.grid.replies[0].content["timeline"]
        assert timeline["worker"] == 1.0  # it really went through the worker
        proc.terminate()
        proc.wait(30)
        proc = start_worker(sock)  # a restarted worker: empty memory, the sites' disks
        got.append(_arrays(fed.run_round(2)))
        assert fed.grid.replies[-1].content["metrics"]["restored"] == 1
    finally:
        proc.terminate()
        proc.wait(30)
    # worker down: the ClientApp process runs the message itself, from the same disk state
    got.append(_arrays(fed.run_round(3)))
    assert fed.grid.replies[-1].content["timeline"]["worker"] == 0.0
    assert "running this message in the ClientApp process instead" in caplog.text
    for r in range(3):
        assert _same(expected[r], got[r]), f"round {r + 1} differs from the in-process reference"


def test_a_worker_refuses_messages_from_different_site_code(short_tmp, monkeypatch):
    sock = short_tmp / "w.sock"
    proc = start_worker(sock)
    try:
        monkeypatch.setattr(worker, "code_digest", lambda root=None: "another version")
        with pytest.raises(worker.WorkerUnavailable, match="different site code"):
            worker.call(str(sock), "train", RecordDict(), {}, 1, timeout=60)
    finally:
        proc.terminate()
        proc.wait(30)
    with pytest.raises(worker.WorkerUnavailable, match="no site worker"):
        worker.call(str(sock), "train", RecordDict(), {}, 1, timeout=5)


def test_a_worker_with_its_own_node_config_ignores_the_one_a_message_claims(monkeypatch):
    """An isolated site's ClientApp is untrusted: it must not point the worker at other
    files or switch the site's gradient opt-in on by sending another node config."""
    own = {"data-path": "/srv/site.npz", "state-dir": "/srv/state", "allow-gradients": False}
    w = worker.Worker(node_config=own)
    seen = []

    def record(content, context, timeline):
        seen.append(dict(context.node_config))
        return RecordDict()

    monkeypatch.setitem(w.site.HANDLERS, "train", record)
    claimed = {"data-path": "/etc/shadow", "state-dir": "/tmp/elsewhere", "allow-gradients": True}
    header = {"protocol": worker.PROTOCOL, "code": w.code, "kind": "train", "run_id": 1, "node_config": claimed}
    reply_header, _ = worker.decode(w.handle(worker.encode(header, RecordDict())))
    assert "error" not in reply_header and seen == [own]


@pytest.mark.slow  # starts a worker process, ~10 s
def test_an_isolated_sites_worker_socket_is_for_the_app_users_group(short_tmp):
    sock = short_tmp / "w.sock"
    proc = start_worker(sock, "--group", str(os.getgid()), "--node-config", 'data-path="/srv/site.npz"')
    try:
        info = sock.stat()
        assert oct(info.st_mode & 0o777) == oct(0o660) and info.st_gid == os.getgid()
    finally:
        proc.terminate()
        proc.wait(30)


def test_an_isolated_clientapp_never_runs_a_message_itself(monkeypatch, short_tmp):
    """With `site-worker-required` (its user cannot read the data) and no worker, the thin
    app says what is wrong at once instead of trying the site code in-process."""
    from flwr.app import Context

    from client_app import app, site

    monkeypatch.setattr(site, "HANDLERS", {})  # any in-process attempt would fail differently
    node_config = {"data-path": "/srv/site.npz", worker.WORKER_KEY: str(short_tmp / "none.sock")}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    with pytest.raises(KeyError):  # without the flag: the in-process fallback
        app.handle("train", RecordDict(), context)
    node_config[worker.WORKER_REQUIRED_KEY] = True
    with pytest.raises(worker.WorkerUnavailable, match="only the site worker can serve the message"):
        app.handle("train", RecordDict(), context)


def test_a_deployed_site_tells_the_server_the_kind_of_failure_only(tmp_path, monkeypatch, caplog):
    """A failing message at a deployed site (node config `data-path`) reaches the server as
    the exception's class; its text (local paths, what the data looks like) stays in the
    site's log. A simulated site's error keeps its text: its log is the operator's console."""
    from flwr.app import Context, Message, RecordDict

    from client_app import app

    secret = "/srv/hospital-a/private/site.npz is corrupt at byte 1234"

    def broken(kind, content, context):
        raise ValueError(secret)

    monkeypatch.setattr(app, "handle", broken)
    with server_identity():
        msg = Message(content=RecordDict(), dst_node_id=1, message_type="train")

    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    with pytest.raises(app.SiteFailure) as failure:
        app.reply("train", msg, context({"data-path": "/srv/hospital-a/private/site.npz"}))
    assert "ValueError" in str(failure.value) and secret not in str(failure.value)
    assert failure.value.__cause__ is None and secret in caplog.text  # the details, in the site's log only
    with pytest.raises(ValueError, match="corrupt at byte"):
        app.reply("train", msg, context({"partition-id": 0, "num-partitions": 2}))


class EchoWorker:
    """Stands in for Worker: replies with the message's records."""

    def handle(self, frame: bytes) -> bytes:
        header, content = worker.decode(frame)
        return worker.encode({}, content)


def _serve_in_thread(connection):
    import threading

    thread = threading.Thread(target=worker.serve_one, args=(EchoWorker(), connection), daemon=True)
    thread.start()
    return thread


@pytest.mark.slow  # over ~5 s (several rounds or sites); `make test` runs it, the fast tier leaves it
def test_the_worker_survives_clients_that_stall_hang_up_send_garbage_or_too_much(monkeypatch, capsys):
    import socket
    import struct

    monkeypatch.setattr(worker, "RECEIVE_TIMEOUT", 0.5)
    monkeypatch.setattr(worker, "MAX_FRAME", 10_000)
    good = worker.encode({"kind": "train"}, RecordDict({"m": MetricRecord({"x": 1.0})}))

    def exchange(send: bytes, close: bool = False) -> bytes | None:
        client, server = socket.socketpair()
        thread = _serve_in_thread(server)
        client.sendall(send)
        if close:
            client.close()
            thread.join(5)
            server.close()
            return None
        client.settimeout(5)
        try:
            return worker._receive(client)
        except (ConnectionError, OSError):
            return None
        finally:
            thread.join(5)
            assert not thread.is_alive()
            client.close()
            server.close()

    assert exchange(b"") is None  # a client that connects and stalls: dropped after the timeout
    assert exchange(struct.pack("!Q", 10**12)) is None  # a length far over the limit: refused unread
    assert exchange(struct.pack("!Q", 100) + b"abc", close=True) is None  # hangs up mid-frame
    garbage = struct.pack("!Q", 20) + b"\x00" * 20
    header, _ = worker.decode(exchange(garbage))
    assert "malformed message" in header["error"]
    reply_header, reply = worker.decode(exchange(struct.pack("!Q", len(good)) + good))  # and it still serves
    assert reply_header == {} and reply["m"]["x"] == 1.0
    log = capsys.readouterr().out
    assert log.count("dropped a connection") == 3 and "over the limit" in log


def _frame(header_json: bytes, body: bytes = b"") -> bytes:
    import struct

    return struct.pack("!Q", len(header_json)) + header_json + body


HOSTILE_HEADERS = {
    "a string": b'"x"',
    "a number": b"1",
    "configs not a mapping": b'{"records": {"configs": 5, "metrics": {}}}',
    "a config record not a mapping": b'{"records": {"configs": {"c": [1]}, "metrics": {}}}',
    "200k nested lists": b"[" * 200_000,
    "node_config a list": b'{"protocol": 2, "code": "", "kind": "train", "run_id": 1, "node_config": [], '
    b'"records": {"configs": {}, "metrics": {}}}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_a_hostile_frame_header_is_a_refusal_and_the_worker_goes_on(name, monkeypatch):
    """Security review, finding 3: a header of "x", 1, {"records": {"configs": 5}} or 200k
    nested '[' made the worker raise AttributeError or RecursionError out of serve_one, and
    it exited. Now each is a refused frame with a reason."""
    w = worker.Worker.__new__(worker.Worker)  # no torch or data needed to refuse a frame
    w.code, w.node_config, w.states = worker.code_digest(), None, {}
    w.site = type("Site", (), {"HANDLERS": {"train": None}})
    from flwr.app import Context

    w.Context = Context
    monkeypatch.setattr(worker, "MAX_HEADER", 1 << 20, raising=False)
    header, _ = worker.decode(
        w.handle(_frame(HOSTILE_HEADERS[name].replace(b'"code": ""', b'"code": "%s"' % w.code.encode())))
    )
    assert header["refused"] and "malformed message" in header["error"]


def test_a_header_larger_than_the_json_bound_is_refused_unparsed(monkeypatch):
    """Security review, finding 3: below the 1 GiB frame cap the JSON header expanded about
    24 times in memory. Now a header over MAX_HEADER bytes is refused before json reads it."""
    monkeypatch.setattr(worker, "MAX_HEADER", 1000, raising=False)
    parsed = []
    monkeypatch.setattr(worker.json, "loads", lambda text: parsed.append(len(text)) or {})
    with pytest.raises(worker.FrameError, match="header of 2000 bytes"):
        worker.decode(_frame(b" " * 2000))
    assert parsed == []


def test_a_client_trickling_bytes_cannot_hold_the_worker(monkeypatch):
    """Security review, finding 3: the receive timeout applied per recv, so a client sending
    one byte just inside it held the single-threaded worker for ever. Now the whole frame has
    RECEIVE_TIMEOUT seconds (asserted by the bytes it got, not by timing)."""
    import socket
    import struct
    import threading

    monkeypatch.setattr(worker, "RECEIVE_TIMEOUT", 1.0)
    client, server = socket.socketpair()
    thread = threading.Thread(target=worker.serve_one, args=(EchoWorker(), server), daemon=True)
    thread.start()
    client.sendall(struct.pack("!Q", 1000))
    sent = 0
    try:
        for _ in range(40):  # 40 bytes, one every 0.2 s: each recv is well inside 1 s, the frame is not
            client.sendall(b" ")
            sent += 1
            time.sleep(0.2)
            if not thread.is_alive():
                break
    except OSError:  # the worker hung up
        pass
    thread.join(10)
    assert not thread.is_alive() and sent < 40
    client.close()
    server.close()


def test_a_socket_path_too_long_for_unix_is_a_clear_error_that_no_restart_repeats(tmp_path, capsys):
    """A Unix socket's path holds 107 bytes: a longer one stops the worker with the path, its
    length and EX_CONFIG (78), which pilot/start-supernode.sh's supervisor does not restart."""
    deep = tmp_path / ("x" * 120) / "worker.sock"
    with pytest.raises(SystemExit) as stopped:
        worker.serve(str(deep))
    assert stopped.value.code == worker.EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert str(deep) in err and f"{len(str(deep))} bytes" in err and "107" in err
    assert not deep.parent.exists()  # nothing made
