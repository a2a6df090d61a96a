"""The pilot's pieces without a federation: site files, a site's own data, preflight
checks (TLS against a local server, keys, data) and the CLI connection."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from core.config import RunConfig
from partitions.deployed import deployment_site_data, load_site_file
from partitions.medmnist_data import DataError
from partitions.simulated import simulation_site_data
from partitions.sources import site_data_for
from partitions.split import main as split_main
from partitions.split import split_dataset
from pilot.connection import add_connection
from pilot.preflight import PreflightError, check_key, check_site, check_tls
from tests.conftest import REPO


@pytest.fixture(scope="module")
def site_files(tmp_path_factory, real_data_root) -> list[Path]:
    out = tmp_path_factory.mktemp("sites")
    return split_dataset("breastmnist", real_data_root, out, num_sites=3, alpha=0.05, seed=0, show=False)


def test_site_files_hold_exactly_the_simulation_sites(site_files, real_data_root):
    cfg = RunConfig(dataset="breastmnist", data_root=str(real_data_root), download=False, alpha=0.05)
    for i, path in enumerate(site_files):
        deployed, meta = deployment_site_data(cfg, path)
        simulated = simulation_site_data(cfg, i, 3)
        assert meta["site"] == i and meta["num_sites"] == 3 and meta["dataset"] == "breastmnist"
        for split in ("train", "test", "val", "local_test"):
            a, b = getattr(deployed, split), getattr(simulated, split)
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), (i, split)
    assert (site_files[0].parent / "partition.json").exists()


def test_local_holdout_gives_each_site_its_own_shards(tmp_path, real_data_root):
    paths = split_dataset("breastmnist", real_data_root, tmp_path, num_sites=3, holdout="local", show=False)
    site = load_site_file(str(paths[1]), "breastmnist", 28)
    assert site.local_test is None and 0 < len(site.data["test"]) < 156 and 0 < len(site.data["val"]) < 78


def test_split_command_line(tmp_path, real_data_root, capsys):
    assert (
        split_main(
            ["--dataset", "breastmnist", "--data-root", str(real_data_root), "--num-sites", "2"]
            + ["--out", str(tmp_path)]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["site-0.npz", "site-1.npz"]
    assert (
        split_main(
            [
                "--dataset",
                "breastmnist",
                "--data-root",
                str(tmp_path / "none"),
                "--num-sites",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "is missing" in capsys.readouterr().err


def test_node_config_chooses_the_data(site_files, real_data_root):
    cfg = RunConfig(dataset="breastmnist", data_root=str(real_data_root), download=False)
    data, meta = site_data_for(cfg, {"data-path": str(site_files[2])})
    assert meta["site"] == 2 and len(data.train) == 182
    with pytest.raises(DataError, match=r"site data-path /nowhere/site\.npz does not exist"):
        site_data_for(cfg, {"data-path": "/nowhere/site.npz"})
    with pytest.raises(DataError, match="no 'data-path'.*and no 'partition-id'"):
        site_data_for(cfg, {})
    with pytest.raises(DataError, match="holds 'breastmnist' data but the run's dataset is 'pneumoniamnist'"):
        site_data_for(cfg.replace(dataset="pneumoniamnist"), {"data-path": str(site_files[0])})


def test_image_folder_site(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("malignant", "1"):  # a class name and a class index
        (tmp_path / "f" / name).mkdir(parents=True)
        for k in range(10):  # any size and mode: converted to 1 channel, resized to 28 x 28
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "f" / name / f"{k}.png")
    cfg = RunConfig(dataset="breastmnist", seed=3)
    data, _ = deployment_site_data(cfg, tmp_path / "f")
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.images.dtype == torch.uint8
    assert (len(data.train), len(data.val), len(data.test)) == (14, 2, 4)
    assert sorted(data.test.labels.tolist()) == [0, 0, 1, 1]

    (tmp_path / "f" / "tumour").mkdir()
    with pytest.raises(DataError, match="sub-folder 'tumour' is not a class of this dataset"):
        load_site_file(str(tmp_path / "f"), "breastmnist", 28, 1)


def _issue(tmp_path: Path, name: str, *names: str) -> Path:
    out = tmp_path / name
    subprocess.run(
        ["bash", str(REPO / "pilot" / "make-certs.sh"), "-o", str(out), *names], check=True, capture_output=True
    )
    return out


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """A TLS server with a SuperLink certificate (valid for superlink.test, localhost,
    127.0.0.1) on 127.0.0.1; yields (certs dir, port)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required for the pilot's certificates (apt-get install openssl)")
    certs = _issue(tmp_path_factory.mktemp("tls"), "certs", "superlink.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "superlink.crt", certs / "superlink.key")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield certs, server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_tls_preflight(tls_server, tmp_path):
    certs, port = tls_server
    assert "verified" in check_tls(f"127.0.0.1:{port}", certs / "ca.crt")
    assert "verified" in check_tls(f"localhost:{port}", certs / "ca.crt")
    other = _issue(tmp_path, "other")
    with pytest.raises(PreflightError, match="did not sign: this is the wrong CA certificate"):
        check_tls(f"127.0.0.1:{port}", other / "ca.crt")
    with pytest.raises(PreflightError, match="does not exist"):
        check_tls(f"127.0.0.1:{port}", tmp_path / "missing.crt")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(PreflightError, match="nothing accepts connections"):
        check_tls(f"127.0.0.1:{free}", certs / "ca.crt")


def test_key_and_site_preflight(tmp_path, site_files):
    subprocess.run(
        ["bash", str(REPO / "pilot" / "make-site-keys.sh"), "-o", str(tmp_path), "site-a"],
        check=True,
        capture_output=True,
    )
    assert "secp384r1" in check_key(tmp_path / "site-a.key")
    assert (tmp_path / "site-a.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    (tmp_path / "site-a.key").chmod(0o644)
    with pytest.raises(PreflightError, match="readable by others"):
        check_key(tmp_path / "site-a.key")
    with pytest.raises(PreflightError, match="does not exist"):
        check_key(tmp_path / "nope.key")
    assert "train 182" in check_site(site_files[0], state_dir=tmp_path / "state")  # dataset from the file
    with pytest.raises(PreflightError, match="site data-path .* does not exist"):
        check_site(tmp_path / "nope.npz", "breastmnist")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(PreflightError, match="corrupt or not an npz"):
        check_site(tmp_path / "bad.npz", "breastmnist")


def test_the_site_preflight_reads_the_data_without_loading_pytorch(tmp_path, site_files):
    """start-supernode.sh runs it at every start: with PyTorch it took about 4 CPU-s, without it
    0.6, and the check reads arrays only."""
    done = subprocess.run(
        [sys.executable, "-m", "pilot.preflight", "site", "--data-path", str(site_files[0])]
        + ["--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONVERBOSE": "1"},
        timeout=300,
    )
    assert done.returncode == 0 and "train 182" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "import 'torch'" not in done.stderr  # python -v names every module it imports


def test_cli_connection(tmp_path, monkeypatch):
    import tomllib

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    (tmp_path / "ca.crt").write_text("x")
    add_connection("pilot", "127.0.0.1:8000", tmp_path / "ca.crt")
    add_connection("other", "10.0.0.5:8000", tmp_path / "ca.crt")
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())
    assert config["superlink"]["default"] == "pilot"
    assert config["superlink"]["pilot"] == {"address": "127.0.0.1:8000", "root-certificates": str(tmp_path / "ca.crt")}
    add_connection("other", "10.0.0.5:8000", tmp_path / "ca.crt", make_default=True)
    assert tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"]["default"] == "other"


def test_a_deployed_site_prepares_its_data_once_and_memory_maps_it(site_files, tmp_path):
    import shutil

    from partitions.deployed import cached_site_file

    cfg = RunConfig(dataset="breastmnist")
    site = tmp_path / "site.npz"
    shutil.copy(site_files[1], site)
    node = {"data-path": str(site), "state-dir": str(tmp_path / "state")}
    first, meta = site_data_for(cfg, node)
    cache = tmp_path / "state" / "data-cache"
    entries = [p for p in cache.iterdir() if not p.name.startswith(".tmp")]
    assert len(entries) == 1 and (entries[0] / "train_images.npy").exists()
    again, meta_again = site_data_for(cfg, node)
    assert meta_again == meta
    for split in ("train", "val", "test", "local_test"):
        a, b = getattr(first, split), getattr(again, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    reloaded = cached_site_file(str(site), "breastmnist", 28, cfg.seed, str(cache))
    assert isinstance(reloaded.data["train"].images, np.memmap)  # read from the cache, not the npz
    # new content, new key: the cache never serves stale data
    shutil.copy(site_files[2], site)
    changed, meta_changed = site_data_for(cfg, node)
    assert meta_changed["site"] == 2 and len([p for p in cache.iterdir() if not p.name.startswith(".tmp")]) == 2
    assert not torch.equal(changed.train.images, first.train.images)
