"""pilot/faulty_link.py on a plain echo server: bytes pass unchanged, and each fault does
what it says (delay, rate, resets, stalls, cut-off and restore). Bounds only from below
where timing matters (a loaded machine is slower, never faster)."""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
import time

import pytest

from pilot.faulty_link import Faults, FaultyLink


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


@pytest.fixture
def echo():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address
    server.shutdown()
    server.server_close()


def roundtrip(link: FaultyLink, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", link.port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
        return out


def test_bytes_pass_unchanged_with_delay(echo):
    link = FaultyLink(echo, Faults(delay=0.1, jitter=0.02)).start()
    try:
        payload = bytes(range(256)) * 4000  # 1 MB, many chunks
        started = time.monotonic()
        assert roundtrip(link, payload) == payload
        assert time.monotonic() - started >= 0.16  # at least 80 ms each way
        assert link.stats.bytes_up == link.stats.bytes_down == len(payload)
    finally:
        link.close()


def test_rate_limit(echo):
    link = FaultyLink(echo, Faults(rate=400_000)).start()
    try:
        payload = b"x" * 200_000
        started = time.monotonic()
        assert roundtrip(link, payload) == payload
        assert time.monotonic() - started >= 0.4  # 200 kB at 400 kB/s, each way (pipelined)
    finally:
        link.close()


def test_resets_and_stalls(echo):
    link = FaultyLink(echo, Faults(reset_p=1.0)).start()
    try:
        try:
            reply = roundtrip(link, b"hello")
        except (ConnectionResetError, BrokenPipeError):
            reply = None
        except OSError as exc:  # the reset came before our own shutdown: not connected any more
            assert exc.errno == errno.ENOTCONN, exc
            reply = None
        assert not reply  # reset (or closed) before anything came back
        assert link.stats.resets == 1
    finally:
        link.close()
    link = FaultyLink(echo, Faults(stall_p=1.0, stall_seconds=30)).start()
    try:
        with pytest.raises(socket.timeout):
            roundtrip(link, b"hello", timeout=0.5)
        assert link.stats.stalls == 1
    finally:
        link.close()


def test_cut_and_restore(echo):
    link = FaultyLink(echo).start()
    try:
        assert roundtrip(link, b"before") == b"before"
        link.cut()
        with pytest.raises(socket.timeout):
            roundtrip(link, b"during", timeout=0.5)
        assert link.stats.refused_while_cut == 1
        link.restore()
        assert roundtrip(link, b"after") == b"after"
    finally:
        link.close()
