"""A userspace TCP proxy that injects network faults into one site's link to the SuperLink.

`tc netem` is not available on these machines (no sch_netem, no root in CI), so the
pilot's fault harness puts one of these between each SuperNode and the SuperLink
(benchmarks/network_faults.py, tests/fault_harness.py). Bytes pass unchanged, so TLS
and SuperNode authentication stay end to end; the proxy only decides *when* (and whether)
they arrive:

- delay: every chunk waits `delay` +- `jitter` seconds (uniform), each way, in order;
- rate: at most `rate` bytes per second each way over all of the link's connections;
- stalls and resets: at the start of each request (the first client chunk on a connection,
  or the first after the server last answered), with probability `stall_p` the
  connection goes silent for `stall_seconds` (longer than the client's 30 s timeout: the
  request times out), with probability `reset_p` it is reset (TCP RST to both ends);
- cut-off: `cut()` partitions the link: open connections go silent (data in either
  direction is dropped) and new ones are accepted but never reach the SuperLink, as when
  packets are lost; `restore()` resets the silenced connections and lets new ones through.

Run in a background thread of the harness (`FaultyLink(...).start()`), or from a shell:

    python -m pilot.faulty_link --listen 127.0.0.1:9000 --target 127.0.0.1:8000 --delay 0.1 --jitter 0.02

and point the SuperNode's `--superlink` at the listening address. Counters (`stats`)
say what the link did.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK = 1 << 16


@dataclass
class Faults:
    """What a link does to its traffic; may be changed while it runs."""

    delay: float = 0.0  # seconds each way, per chunk
    jitter: float = 0.0  # +- uniform
    rate: float = 0.0  # bytes per second each way over the link (0: unlimited)
    stall_p: float = 0.0  # per request
    stall_seconds: float = 40.0
    reset_p: float = 0.0  # per request
    seed: int = 0


@dataclass
class LinkStats:
    connections: int = 0
    requests: int = 0
    stalls: int = 0
    resets: int = 0
    refused_while_cut: int = 0
    bytes_up: int = 0  # site -> SuperLink
    bytes_down: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    silenced: bool = False  # a cut-off: data is dropped, nothing is closed
    answered: bool = True  # the server sent something since the client's last chunk
    tasks: list[asyncio.Task] = field(default_factory=list)


class FaultyLink:
    """One proxied link: listen on `listen_host:port` (0: a free port), forward to `target`."""

    def __init__(
        self, target: tuple[str, int], faults: Faults | None = None, listen: tuple[str, int] = ("127.0.0.1", 0)
    ):
        self.target = target
        self.faults = faults or Faults()
        self.listen = listen
        self.stats = LinkStats()
        self.is_cut = False
        self._rng = random.Random(self.faults.seed)
        self._conns: set[_Conn] = set()
        self._free_at = {"up": 0.0, "down": 0.0}  # rate limit: when each direction is free again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    # -- control (any thread) -------------------------------------------------------
    def start(self) -> FaultyLink:
        threading.Thread(target=self._run, name=f"faulty-link-{self.target[1]}", daemon=True).start()
        if not self._ready.wait(10):
            raise RuntimeError("the faulty link did not start")
        return self

    def cut(self) -> None:
        """Partition the link (see the module's doc)."""
        self._call(self._cut)

    def restore(self) -> None:
        self._call(self._restore)

    def close(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._call(self._close)

    def _call(self, fn) -> None:
        assert self._loop is not None, "start() the link first"
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    # -- the event loop ---------------------------------------------------------------
    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, *self.listen))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _cut(self) -> None:
        self.is_cut = True
        for conn in self._conns:
            conn.silenced = True

    def _restore(self) -> None:
        self.is_cut = False
        for conn in list(self._conns):
            if conn.silenced:
                self._reset(conn)

    def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._reset(conn)
        self._loop.call_later(0.1, self._loop.stop)

    def _reset(self, conn: _Conn) -> None:
        """Abort both ends with an RST (SO_LINGER 0), as a middlebox's reset does."""
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            writer.transport.abort()
        for task in conn.tasks:
            task.cancel()
        self._conns.discard(conn)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(client=writer)
        self.stats.connections += 1
        self._conns.add(conn)
        if self.is_cut:  # accepted, never forwarded: the client's handshake times out
            self.stats.refused_while_cut += 1
            conn.silenced = True
            try:
                while await reader.read(CHUNK):
                    pass
            except (ConnectionError, OSError):
                pass
            return  # held until restore() resets it
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._reset(conn)
            return
        conn.upstream = up_writer
        pumps = [
            asyncio.ensure_future(self._pump(conn, reader, up_writer, "up")),
            asyncio.ensure_future(self._pump(conn, up_reader, writer, "down")),
        ]
        conn.tasks += pumps
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        self._conns.discard(conn)

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
        """Read one direction; a sender task delivers each chunk at its time, in order."""
        f = self.faults
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(conn, queue, dst))
        conn.tasks.append(sender)
        last_due = 0.0
        try:
            while data := await src.read(CHUNK):
                if conn.silenced:
                    continue
                if way == "up":
                    if conn.answered:  # a new request
                        conn.answered = False
                        self.stats.requests += 1
                        draw = self._rng.random()
                        if draw < f.reset_p:
                            self.stats.resets += 1
                            self._reset(conn)
                            return
                        if draw < f.reset_p + f.stall_p:
                            self.stats.stalls += 1
                            conn.silenced = True
                            asyncio.get_running_loop().call_later(f.stall_seconds, self._reset, conn)
                            continue
                    self.stats.bytes_up += len(data)
                else:
                    conn.answered = True
                    self.stats.bytes_down += len(data)
                now = time.monotonic()
                due = now + max(0.0, f.delay + self._rng.uniform(-f.jitter, f.jitter))
                if f.rate > 0:  # the link's bandwidth, shared by its connections
                    self._free_at[way] = max(now, self._free_at[way]) + len(data) / f.rate
                    due = max(due, self._free_at[way])
                due = last_due = max(due, last_due)
                queue.put_nowait((due, data))
                if f.rate > 0 and due > now:  # throughput: do not read far ahead of the link
                    await asyncio.sleep(due - now)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            queue.put_nowait(None)  # end of stream: passed on after the data

    async def _send(self, conn: _Conn, queue: asyncio.Queue, dst: asyncio.StreamWriter) -> None:
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if conn.silenced:
                    continue
                dst.write(data)
                await dst.drain()
            if not conn.silenced:
                self._half_close(dst)
        except (ConnectionError, OSError):
            pass

    @staticmethod
    def _half_close(dst: asyncio.StreamWriter) -> None:
        try:
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
        except OSError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", required=True)
    for name, default in (("delay", 0.0), ("jitter", 0.0), ("rate", 0.0), ("stall-p", 0.0), ("reset-p", 0.0)):
        parser.add_argument(f"--{name}", type=float, default=default)
    parser.add_argument("--stall-seconds", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    faults = Faults(args.delay, args.jitter, args.rate, args.stall_p, args.stall_seconds, args.reset_p, args.seed)
    link = FaultyLink((thost, int(tport)), faults, listen=(host, int(port))).start()
    print(f"faulty link {link.address} -> {args.target}: {faults}", flush=True)
    try:
        while True:
            time.sleep(60)
            print(f"stats {link.stats.as_dict()}", flush=True)
    except KeyboardInterrupt:
        link.close()


if __name__ == "__main__":
    main()
