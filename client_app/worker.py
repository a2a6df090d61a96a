"""A warm site worker: one long-running process beside a SuperNode that keeps PyTorch,
the site's data and the model code loaded, so a round no longer pays them per message.

In a deployment Flower starts a fresh `flwr-clientapp` process for every message; with
`site-worker = "/path/worker.sock"` in the SuperNode's node config, that process (the
thin `client_app.app`, which imports no torch) hands the message to this worker over a
Unix socket and returns its reply. Private state stays where it always is: in the
worker's memory and on the site's disk (`state-dir`), written atomically every round,
so a restarted worker (or the in-process fallback when the worker is down) continues
from the disk. The socket is created with mode 0600 inside the state folder: only the
site's own user can talk to it.

    python -m client_app.worker --socket STATE_DIR/worker.sock

Where the ClientApp runs as its own user (`start-supernode.sh --isolate-app-user`), that
user cannot read the data or the state: the worker, run as the site's own user
(`--site-user`: neither root nor the app user), is their only reader. The socket then
lives in a folder the app user can reach, mode 0660 with the app user's group
(`--group`), and the worker takes its node config (data path, state folder, the
gradient opt-in) from its own command line (`--node-config`), never from the untrusted
app's messages.

    python -m client_app.worker --socket APP_DIR/worker.sock --group fsf-app \
        --node-config 'data-path="/srv/site.npz" state-dir="/srv/state" ...'

The run's settings reach the worker once per run: in the frame of the run's first message
(the server sends them only then), kept in the worker's state for that run and on the
site's disk (core/settings.py). A worker that does not hold the settings a message names
(restarted, with no copy on its disk) answers `settings-unknown`, and the thin app sends
the message again with the copy its node keeps.

The wire format is a JSON header plus the array bytes packed by core.transport, the format
in which Flower delivers and takes the message (no pickle, one layout, checked once). A worker runs the
code of the checkout it was started from; a message from an app bundle whose site code
differs is refused (the thin app then runs it in-process and says so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from core.settings import SettingsUnknown
from core.transport import LAYOUT_RECORD, PACKED_RECORD, pack, unpack

WORKER_KEY = "site-worker"  # node config: the worker's socket path
#: node config: the ClientApp runs as a user that cannot read the data, so never in-process
WORKER_REQUIRED_KEY = "site-worker-required"
PROTOCOL = 2  # 2: the arrays travel packed by core.transport (1: one entry per array)
SETTINGS_UNKNOWN = "settings-unknown"  # reply header: the worker lacks the run settings the message names
_LENGTH = struct.Struct("!Q")
CODE_PACKAGES = ("client_app", "core", "models", "partitions")
#: the largest frame either side accepts (a message of this project is a few MB): a bigger
#: length prefix is refused before anything is allocated
MAX_FRAME = int(os.environ.get("FSF_WORKER_MAX_FRAME", str(1 << 30)))
#: the largest JSON header (configs, metrics, the packing layout: tens of KB in this project).
#: Parsed JSON takes up to ~25 times its text in Python objects, so this bounds that too.
MAX_HEADER = int(os.environ.get("FSF_WORKER_MAX_HEADER", str(4 << 20)))
#: seconds a client may take to send its whole frame (one deadline, not one per recv: a
#: client trickling a byte at a time cannot hold the single-threaded worker)
RECEIVE_TIMEOUT = float(os.environ.get("FSF_WORKER_RECEIVE_TIMEOUT", "120"))


class FrameError(ConnectionError):
    """A frame that is too large or malformed."""


class WorkerUnavailable(RuntimeError):
    """No worker answers at the socket, or it refused the message."""


class SettingsNeeded(SettingsUnknown):
    """The worker does not hold the run settings the message names (it restarted without
    them on its disk): send the message again with them (core/settings.py)."""


# -- code identity ----------------------------------------------------------------------


def code_digest(root: Path | None = None) -> str:
    """sha256 over the site-side packages' sources (the FAB's or the checkout's)."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


# -- wire format ------------------------------------------------------------------------


def encode(header: dict[str, Any], records: RecordDict | None) -> bytes:
    """A frame: header JSON (with the message's config and metric records, the packing
    layout among them) + the packed array bytes. The arrays travel in core.transport's one
    format, packed once: a message that arrives packed from Flower is forwarded as it is."""
    packed = pack(records or RecordDict())
    # "arrays" stays (empty) so that a worker or app of protocol 1 can still read a refusal
    layout: dict[str, Any] = {"arrays": {}, "configs": {}, "metrics": {}}
    body = b""
    for name, record in packed.items():
        if isinstance(record, ConfigRecord):
            layout["configs"][name] = dict(record)
        elif isinstance(record, MetricRecord):
            layout["metrics"][name] = dict(record)
        elif name == PACKED_RECORD:
            body = np.require(record["bytes"].numpy(), requirements="C").tobytes()
    head = json.dumps({**header, "records": layout}).encode()
    return _LENGTH.pack(len(head)) + head + body


def decode(frame: bytes, keep_packed: bool = False) -> tuple[dict[str, Any], RecordDict]:
    """(header, content); the arrays unpacked (their layout checked by core.transport), or
    still packed with `keep_packed` (for content that only passes through). A frame that
    is not one raises FrameError, and nothing else."""
    try:
        return _decoded(frame, keep_packed)
    except FrameError:
        raise
    except Exception as exc:  # bad JSON, too deep (RecursionError), records Flower refuses, a bad layout
        raise FrameError(f"malformed frame ({type(exc).__name__}: {str(exc)[:200]})") from None


def _decoded(frame: bytes, keep_packed: bool) -> tuple[dict[str, Any], RecordDict]:
    (size,) = _LENGTH.unpack_from(frame)
    if size > MAX_HEADER or _LENGTH.size + size > len(frame):
        raise FrameError(f"a frame header of {size} bytes (at most {MAX_HEADER}, inside a frame of {len(frame)})")
    header = json.loads(frame[_LENGTH.size : _LENGTH.size + size])
    body = memoryview(frame)[_LENGTH.size + size :]
    layout = header.pop("records", None) if isinstance(header, dict) else None
    sections = (layout or {}).get("configs"), (layout or {}).get("metrics")
    if not all(
        isinstance(section, dict) and all(isinstance(v, dict) for v in section.values()) for section in sections
    ):
        raise FrameError("a frame header that is not {..., records: {configs: {name: {...}}, metrics: {...}}}")
    records = RecordDict()
    for name, values in layout["configs"].items():
        records[name] = ConfigRecord(values)
    for name, values in layout["metrics"].items():
        records[name] = MetricRecord(values)
    if LAYOUT_RECORD in records.config_records:
        records[PACKED_RECORD] = ArrayRecord({"bytes": Array(np.frombuffer(body, dtype=np.uint8).copy())})
    return header, records if keep_packed else unpack(records)


def _send(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(frame)) + frame)


def _receive(sock: socket.socket, limit: int | None = None, within: float | None = None) -> bytes:
    """One frame; `within` seconds for all of it (else the socket's timeout per recv)."""
    limit = MAX_FRAME if limit is None else limit
    deadline = None if within is None else time.monotonic() + within
    head = _exactly(sock, _LENGTH.size, deadline)
    (size,) = _LENGTH.unpack(head)
    if size > limit:
        raise FrameError(f"a frame of {size} bytes is over the limit of {limit} (FSF_WORKER_MAX_FRAME)")
    return _exactly(sock, size, deadline)


def _exactly(sock: socket.socket, count: int, deadline: float | None = None) -> bytes:
    buffer = bytearray()
    while len(buffer) < count:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the frame did not arrive within its time ({len(buffer)} of {count} bytes)")
            sock.settimeout(left)
        chunk = sock.recv(min(1 << 20, count - len(buffer)))
        if not chunk:
            raise ConnectionError("the site worker closed the connection")
        buffer += chunk
    return bytes(buffer)


# -- client side (the thin ClientApp; no torch) -----------------------------------------


def call(
    path: str, kind: str, content: RecordDict, node_config: dict[str, Any], run_id: int, timeout: float
) -> RecordDict:
    """Hand one message to the worker at `path`; its reply content (arrays packed, as
    core.transport sends them), or WorkerUnavailable."""
    header = {"protocol": PROTOCOL, "kind": kind, "node_config": node_config, "run_id": run_id}
    header["code"] = code_digest()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            _send(sock, encode(header, content))
            reply_header, reply = decode(_receive(sock), keep_packed=True)
    except (OSError, ConnectionError, ValueError) as exc:  # (socket.timeout is an OSError)
        raise WorkerUnavailable(f"no site worker at {path} ({type(exc).__name__}: {exc})") from exc
    if reply_header.get("error"):
        if reply_header.get(SETTINGS_UNKNOWN):
            raise SettingsNeeded(reply_header["error"])
        if reply_header.get("refused"):
            raise WorkerUnavailable(reply_header["error"])
        raise RuntimeError(f"site worker: {reply_header['error']}")
    return reply


# -- the worker -------------------------------------------------------------------------


class Worker:
    """Serves messages one at a time, with one in-memory node state per run."""

    def __init__(self, node_config: dict[str, Any] | None = None) -> None:
        from flwr.app import Context

        from client_app import site  # torch, data and models: loaded once, here

        self.site, self.Context = site, Context
        self.code = code_digest()
        self.states: dict[tuple[int, str], RecordDict] = {}
        #: the site's own node config; when set, a message's node config is ignored
        self.node_config = node_config

    def handle(self, frame: bytes) -> bytes:
        """The reply frame to one message frame (a refusal, with the reason, for a bad one)."""
        try:
            header, content = decode(frame)
        except FrameError as exc:
            return encode({"error": f"malformed message: {exc}", "refused": True}, None)
        if header.get("protocol") != PROTOCOL:
            return encode({"error": f"protocol {header.get('protocol')} != {PROTOCOL}", "refused": True}, None)
        if header.get("code") != self.code:
            return encode(
                {
                    "error": "the site worker runs different site code than this run's app bundle; restart the "
                    "worker from the same version of the project",
                    "refused": True,
                },
                None,
            )
        node_config = self.node_config if self.node_config is not None else header.get("node_config")
        run_id, kind = header.get("run_id"), header.get("kind")
        known = isinstance(kind, str) and kind in self.site.HANDLERS
        if not isinstance(node_config, dict) or not isinstance(run_id, int) or not known:
            return encode({"error": "malformed message (node_config, run_id or kind)", "refused": True}, None)
        key = (run_id, json.dumps(node_config, sort_keys=True))
        state = self.states.setdefault(key, RecordDict())
        context = self.Context(run_id=key[0], node_id=0, node_config=node_config, state=state, run_config={})
        from client_app.timeline import Timeline

        try:
            reply = self.site.HANDLERS[kind](content, context, Timeline(self.site.IMPORTED, via="worker"))
        except SettingsUnknown as exc:  # the thin app sends them if its node holds them
            return encode({"error": f"{type(exc).__name__}: {exc}", SETTINGS_UNKNOWN: True}, None)
        except Exception as exc:  # the thin app turns this into the message's error
            return encode({"error": f"{type(exc).__name__}: {exc}"}, None)
        return encode({}, reply)


def serve_one(worker: Worker, connection: socket.socket) -> None:
    """One message. Whatever the client does (hangs up, stalls, sends garbage or too much),
    the worker logs it and goes on to the next connection."""
    started = time.time()
    try:
        frame = _receive(connection, within=RECEIVE_TIMEOUT)
        connection.settimeout(None)  # training takes as long as it takes
        try:
            reply = worker.handle(frame)
        except Exception as exc:  # whatever a malformed frame causes, the worker goes on serving
            reply = encode({"error": f"malformed message ({type(exc).__name__})"}, None)
        connection.settimeout(RECEIVE_TIMEOUT)
        _send(connection, reply)
        print(f"served a message in {time.time() - started:.2f} s", flush=True)
    except (OSError, ConnectionError) as exc:  # socket.timeout is an OSError
        print(f"dropped a connection after {time.time() - started:.2f} s ({type(exc).__name__}: {exc})", flush=True)


#: the longest path a Unix socket takes (sun_path is 108 bytes on Linux, one for the final NUL)
MAX_SOCKET_PATH = 107
#: the exit status of a start that no restart can mend (sysexits' EX_CONFIG); the supervisor
#: in pilot/start-supernode.sh stops restarting on it
EXIT_CONFIG = 78


def serve(path: str, group: str | None = None, node_config: dict[str, Any] | None = None) -> None:
    """Serve messages at `path`: mode 0600, or 0660 for `group` (the isolated app user's)."""
    socket_path = Path(path).expanduser()
    length = len(os.fsencode(str(socket_path)))
    if length > MAX_SOCKET_PATH:
        print(
            f"error: the socket path {socket_path} is {length} bytes, over the "
            f"{MAX_SOCKET_PATH} a Unix socket allows: give --socket a shorter path "
            "(pilot/start-supernode.sh does so itself)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(EXIT_CONFIG)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    gid = _group_id(group) if group else None
    worker = Worker(node_config)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177 if gid is None else 0o117)  # the socket file: 0600, or 0660
    try:
        server.bind(str(socket_path))
        if gid is not None:
            os.chown(socket_path, -1, gid)
    finally:
        os.umask(old_umask)
    server.listen(4)
    signal.signal(signal.SIGTERM, _exit_once)
    print(f"site worker ready on {socket_path} (pid {os.getpid()})", flush=True)
    try:
        while True:
            connection, _ = server.accept()
            with connection:
                serve_one(worker, connection)
    finally:
        server.close()
        socket_path.unlink(missing_ok=True)


def _group_id(group: str) -> int:
    import grp

    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise SystemExit(f"error: no group {group!r} on this machine (--group)") from None


def _exit_once(*_: object) -> None:
    """SIGTERM: exit cleanly. A stop signals the whole process group, so a second SIGTERM can
    arrive while the exit runs torch's clean-up; it is ignored, instead of interrupting that
    clean-up with a traceback in worker.log."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client_app.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket path (node config site-worker)")
    parser.add_argument("--group", help="make the socket 0660 for this group (the isolated ClientApp's user)")
    parser.add_argument(
        "--node-config",
        help="the site's node config, as flower-supernode --node-config takes it; messages' own are then ignored",
    )
    args = parser.parse_args(argv)
    node_config = None
    if args.node_config is not None:
        from flwr.common.config import parse_config_args

        node_config = parse_config_args([args.node_config])
    serve(args.socket, args.group, node_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
