"""pilot/supernode.py: the SuperNode retries a TLS handshake the network cut short, and
still gives up at once on a certificate that does not verify."""

from __future__ import annotations

import httpx
import pytest

from pilot.supernode import retry_interrupted_handshakes, transient_tls_error


@pytest.mark.parametrize(
    "text, transient",
    [
        ("_ssl.c:989: The handshake operation timed out", True),
        ("[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol (_ssl.c:1006)", True),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer", False),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number", False),
    ],
)
def test_which_tls_errors_are_transient(text, transient):
    assert transient_tls_error(httpx.ConnectError(text)) is transient


def test_the_supernode_retry_rule(monkeypatch):
    from flwr.supernode import fleet_http_connection as connection

    monkeypatch.setattr(connection, "make_simple_http_retry_invoker", connection.make_simple_http_retry_invoker)
    assert retry_interrupted_handshakes()
    invoker = connection.make_simple_http_retry_invoker()
    assert not invoker.should_giveup(httpx.ConnectError("_ssl.c:989: The handshake operation timed out"))
    assert invoker.should_giveup(httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"))
    assert not invoker.should_giveup(httpx.ReadTimeout("timed out"))  # Flower's own rule: retried


def test_the_servers_object_pulls_end_at_the_exchange_deadline(monkeypatch):
    """A reply whose upload broke off blocks Flower's object pull for up to 180 s; the
    exchange bounds it by the time left to its deadline."""
    from flwr.superlink.grid import http_grid

    from server_app import faults

    seen = {}

    def fake_pull_objects(*args, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", fake_pull_objects)
    assert faults.bound_object_pulls() and faults.bound_object_pulls()  # once only
    monkeypatch.setattr(faults, "_object_pull_deadline", faults.time.monotonic() + 42.0)
    http_grid.pull_objects(object_ids=[])
    assert 30.0 < seen["max_time"] <= 42.0
    monkeypatch.setattr(faults, "_object_pull_deadline", faults.time.monotonic() - 100.0)
    http_grid.pull_objects(object_ids=[])
    assert seen["max_time"] == faults.MIN_OBJECT_PULL
