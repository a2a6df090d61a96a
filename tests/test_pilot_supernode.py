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
