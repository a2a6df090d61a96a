"""Add the pilot's SuperLink to the flwr CLI's connections ($FLWR_HOME/config.toml,
default ~/.flwr/config.toml), so `flwr run . pilot` and friends reach it over TLS.

    python -m pilot.connection pilot superlink.example.org:8000 --root-certificates pilot/certs/ca.crt --default
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import tomli
import tomli_w


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def add_connection(name: str, address: str, root_certificates: str | Path, make_default: bool = False) -> Path:
    """Write (or replace) `[superlink.<name>]`; other connections are kept."""
    ca = Path(root_certificates).expanduser().resolve()
    if not ca.is_file():
        raise FileNotFoundError(f"CA certificate {ca} does not exist")
    path = flwr_home() / "config.toml"
    config = tomli.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(ca)}
    if make_default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomli_w.dumps(config))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.connection", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="connection name, e.g. pilot")
    parser.add_argument("address", help="SuperLink HOST:PORT (a name its certificate holds)")
    parser.add_argument("--root-certificates", required=True, help="the pilot's ca.crt")
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    args = parser.parse_args(argv)
    try:
        path = add_connection(args.name, args.address, args.root_certificates, args.default)
    except (OSError, tomli.TOMLDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"connection {args.name!r} -> {args.address} written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
