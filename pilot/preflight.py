"""Checks a site runs before its SuperNode starts, with errors that say what to fix.

    python -m pilot.preflight tls --superlink HOST:PORT --root-certificates ca.crt
    python -m pilot.preflight key --key keys/hospital-a.key
    python -m pilot.preflight site --data-path sites/site-0.npz --dataset breastmnist --state-dir state/

Exit status 0 when everything is in order, 2 with one line per problem otherwise.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
from pathlib import Path


class PreflightError(RuntimeError):
    """Something a site must fix before its SuperNode can take part."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise PreflightError(f"SuperLink address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _certificate_names(der: bytes) -> tuple[str, str, list[str]]:
    """(subject, issuer, subjectAltNames) of a DER certificate."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), names


def _ca_subject(path: Path) -> str:
    from cryptography import x509

    certs = x509.load_pem_x509_certificates(path.read_bytes())
    return "; ".join(c.subject.rfc4514_string() for c in certs)


def check_tls(address: str, root_certificates: str | Path, timeout: float = 10.0) -> str:
    """Connect to the SuperLink and verify its certificate against the pilot CA."""
    host, port = _split_address(address)
    ca = Path(root_certificates).expanduser()
    if not ca.is_file():
        raise PreflightError(f"CA certificate {ca} does not exist; ask the SuperLink operator for the pilot's ca.crt")
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as exc:
        raise PreflightError(f"{ca} is not a PEM CA certificate ({exc.reason or exc})") from exc
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                subject, issuer, _ = _certificate_names(tls.getpeercert(binary_form=True))
                return f"TLS to {host}:{port} verified: {subject}, issued by {issuer}"
    except ssl.SSLCertVerificationError as exc:
        subject, issuer, names = _peer_certificate(host, port, timeout)
        if exc.verify_code in (2, 7, 18, 19, 20, 21):  # unknown issuer / bad signature: not our CA
            raise PreflightError(
                f"the SuperLink at {host}:{port} presents a certificate ({subject}) issued by {issuer}, which the CA "
                f"in {ca} ({_ca_subject(ca)}) did not sign: this is the wrong CA certificate for this SuperLink. "
                "Ask the operator for the pilot's ca.crt (the one make-certs.sh wrote beside superlink.crt)."
            ) from exc
        if exc.verify_code in (62, 64):  # hostname / IP address mismatch
            raise PreflightError(
                f"the SuperLink's certificate is valid for {', '.join(names) or 'no names'} but this site connects "
                f"to {host!r}: connect to one of those names, or have the operator re-issue the certificate with "
                f"make-certs.sh {host} ..."
            ) from exc
        if exc.verify_code == 10:
            raise PreflightError(f"the SuperLink's certificate has expired ({subject}); re-issue it") from exc
        raise PreflightError(f"TLS verification of {host}:{port} failed: {exc.verify_message} ({exc})") from exc
    except ssl.SSLError as exc:
        raise PreflightError(
            f"TLS handshake with {host}:{port} failed ({exc}); is it the SuperLink, with TLS on?"
        ) from exc
    except ConnectionRefusedError as exc:
        raise PreflightError(f"nothing accepts connections at {host}:{port}: is the SuperLink running there?") from exc
    except TimeoutError as exc:
        raise PreflightError(f"no answer from {host}:{port} within {timeout:g} s (firewall? wrong address?)") from exc
    except OSError as exc:
        raise PreflightError(f"cannot reach {host}:{port}: {exc}") from exc


def _peer_certificate(host: str, port: int, timeout: float) -> tuple[str, str, list[str]]:
    """The certificate the peer presents, read without verifying it (for the message only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                return _certificate_names(tls.getpeercert(binary_form=True))
    except (OSError, ValueError):
        return "an unreadable certificate", "an unknown issuer", []


def check_key(path: str | Path) -> str:
    """The SuperNode authentication key: an OpenSSH EC private key on a NIST curve."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    key_path = Path(path).expanduser()
    if not key_path.is_file():
        raise PreflightError(f"authentication key {key_path} does not exist; create it with pilot/make-site-keys.sh")
    try:
        key = load_ssh_private_key(key_path.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise PreflightError(f"{key_path} is not an unencrypted OpenSSH private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PreflightError(f"{key_path} is not an EC key; SuperNode authentication needs EC (make-site-keys.sh)")
    if os.name == "posix" and key_path.stat().st_mode & 0o077:
        raise PreflightError(f"{key_path} is readable by others; chmod 600 {key_path}")
    pub = Path(str(key_path) + ".pub")
    return f"key {key_path} ({key.curve.name}); its public half {pub} is what the operator registers"


def check_site(
    data_path: str | Path, dataset: str = "", image_size: int = 28, state_dir: str | Path | None = None
) -> str:
    """The site's own data (validated as the ClientApp will load it) and its state folder."""
    from partitions.deployed import load_site_file
    from partitions.medmnist_data import DataError
    from partitions.split import META_KEY

    path = Path(data_path).expanduser()
    if not path.exists():
        raise PreflightError(
            f"site data-path {path} does not exist: point --data-path at this site's npz file "
            "(python -m partitions.split writes them) or at an image folder with one sub-folder per class"
        )
    if not dataset and path.is_file():  # files from partitions.split name their dataset
        import json

        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as npz:
                dataset = json.loads(str(npz[META_KEY]))["dataset"] if META_KEY in npz.files else ""
        except (OSError, ValueError, KeyError):
            dataset = ""
    if not dataset:
        raise PreflightError(f"say which dataset {path} holds (--dataset, the run's `dataset` key)")
    try:
        site = load_site_file(str(Path(data_path).expanduser()), dataset, image_size)
    except DataError as exc:
        raise PreflightError(str(exc)) from exc
    counts = ", ".join(f"{split} {len(site.data[split])}" for split in ("train", "val", "test"))
    lines = [f"data {data_path}: {dataset} at {image_size} px, {counts}"]
    if state_dir:
        state = Path(state_dir).expanduser()
        try:
            state.mkdir(parents=True, exist_ok=True)
            probe = state / ".preflight-write-test"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise PreflightError(
                f"state-dir {state} is not writable ({exc}); the site's encoder is kept there"
            ) from exc
        lines.append(f"state-dir {state} writable")
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.preflight", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    tls = sub.add_parser("tls", help="verify the SuperLink's certificate with the pilot CA")
    tls.add_argument("--superlink", required=True, help="HOST:PORT")
    tls.add_argument("--root-certificates", required=True, help="the pilot's ca.crt")
    key = sub.add_parser("key", help="check the SuperNode authentication key")
    key.add_argument("--key", required=True)
    site = sub.add_parser("site", help="validate the site's data and state folder")
    site.add_argument("--data-path", required=True)
    site.add_argument("--dataset", default="", help="the run's dataset (default: from the site file)")
    site.add_argument("--image-size", type=int, default=28)
    site.add_argument("--state-dir")
    args = parser.parse_args(argv)
    try:
        if args.check == "tls":
            print(check_tls(args.superlink, args.root_certificates))
        elif args.check == "key":
            print(check_key(args.key))
        else:
            print(check_site(args.data_path, args.dataset, args.image_size, args.state_dir))
    except PreflightError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
