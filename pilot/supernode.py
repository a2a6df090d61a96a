"""`flower-supernode` that retries a TLS handshake cut short by the network
(start-supernode.sh runs this).

Flower 1.42's retry rule for the SuperNode's requests (`flwr/supercore/retry/http_retry.py`,
`_should_giveup`) gives up on every error whose text mentions "ssl" or "tls", to stop at
once on a wrong certificate. On a flaky link that also catches handshakes that merely
timed out or were reset ("_ssl.c:989: The handshake operation timed out", "EOF occurred
in violation of protocol"): the SuperNode logs "Failed to send message ..." and drops the
reply it had just trained, and the round waits for it until round-timeout
(benchmarks/network_faults.py, case flaky). This wrapper retries those like any other
connection error (with Flower's backoff) and still gives up at once on certificate
errors; otherwise it runs flower-supernode unchanged, with the same arguments.
"""

from __future__ import annotations

import sys

# a handshake the network interrupted; never a certificate that does not verify
TRANSIENT = ("timed out", "timeout", "eof occurred", "unexpected eof", "connection reset", "broken pipe")


def transient_tls_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "certificate" not in text and "verify" not in text and any(t in text for t in TRANSIENT)


def retry_interrupted_handshakes() -> bool:
    """Patch the SuperNode's retry rule; False (and nothing changed) where it moved."""
    try:
        import httpx
        from flwr.supercore import log
        from flwr.supernode import fleet_http_connection as connection
    except ImportError:
        return False
    original = getattr(connection, "make_simple_http_retry_invoker", None)
    if original is None:
        return False

    def make_invoker():
        invoker = original()
        give_up = invoker.should_giveup

        def should_giveup(exc: Exception) -> bool:
            # only where Flower would give up because the error names TLS
            named_tls = any(term in str(exc).lower() for term in ("ssl", "tls"))
            if isinstance(exc, httpx.TransportError) and named_tls and transient_tls_error(exc):
                log(30, "TLS handshake interrupted (%s); retrying", exc)  # 30: WARNING
                return False
            return give_up(exc) if give_up is not None else False

        invoker.should_giveup = should_giveup
        return invoker

    connection.make_simple_http_retry_invoker = make_invoker
    return True


def main() -> int:
    if not retry_interrupted_handshakes():
        print("warning: this Flower version keeps its own retry rule for TLS errors", file=sys.stderr)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    return flower_supernode() or 0


if __name__ == "__main__":
    sys.exit(main())
