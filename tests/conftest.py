"""Shared fixtures: the real MedMNIST files and small synthetic files in the same format."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

# pytest-xdist runs more workers than this machine has cores (make test: 3 on 2): one
# thread for each worker's PyTorch and NumPy, and for the processes a test starts (they
# inherit the environment), instead of a thread per core each, which oversubscribes the cores
# and spends CPU on threads waiting for each other. Set before NumPy or PyTorch load.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FSF_DATA_ROOT", REPO.parent / "shared" / "data" / "medmnist"))


#: tests that run real SuperLink and SuperNode processes with timeouts of their own (the
#: pilot's): under `pytest --dist loadgroup` (make test) each group runs one test at a time on
#: one worker. Three groups of about equal length (about 10 minutes each), by module: these
#: tests mostly wait (a SuperNode asks for messages every few seconds, every ClientApp call
#: starts a process), so make test runs a third worker on 2 cores and the rest of the suite
#: fills the cores beside them (README, "Times, measured").
SERIAL_GROUPS = {
    "pilot-processes-a": ("test_pilot",),
    "pilot-processes-b": ("test_pilot_rehearsal", "test_pilot_proxy", "test_ray_cluster"),
    "pilot-processes-c": ("test_pilot_faults", "test_pilot_isolation"),
}


def serial_group(module_name: str) -> str:
    """The xdist group of an integration test's module (the c group for any new module)."""
    short = module_name.rsplit(".", 1)[-1]
    return next((group for group, modules in SERIAL_GROUPS.items() if short in modules), "pilot-processes-c")


@functools.cache
def has_module_fixture(module_file: str) -> bool:
    """Whether a test module defines a module-scoped fixture (a whole run, trained once)."""
    return 'scope="module"' in Path(module_file).read_text()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every `integration` test joins its module's xdist group (read by pytest-xdist's
    loadgroup). A module with a module-scoped fixture is one group of its own, so that its
    fixture (a Ray simulation, a trained run) is built once on one worker, not once per worker."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        if item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.xdist_group(serial_group(item.module.__name__)))
        elif has_module_fixture(item.module.__file__):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The verified MedMNIST files (../shared/data/medmnist). Missing means a broken checkout: fail."""
    if not (SHARED_DATA / "breastmnist.npz").exists():
        pytest.fail(f"real MedMNIST files not found in {SHARED_DATA} (set FSF_DATA_ROOT)")
    return SHARED_DATA


def write_fake_medmnist(
    root: Path,
    flag: str = "bloodmnist",
    sizes: tuple[int, int, int] = (240, 40, 80),
    channels: int = 3,
    num_classes: int = 8,
    multi_label: bool = False,
    seed: int = 0,
    image_size: int = 28,
) -> Path:
    """A small npz in medmnist's layout whose images depend on the label (learnable)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        if multi_label:
            labels = (rng.random((n, num_classes)) < 0.2).astype(np.uint8)
            level = labels[:, :1].astype(float)
        else:
            labels = rng.integers(0, num_classes, size=(n, 1)).astype(np.uint8)
            labels[:num_classes, 0] = np.arange(num_classes)  # every class present
            level = labels / max(num_classes - 1, 1)
        shape = (n, image_size, image_size) + ((channels,) if channels > 1 else ())
        noise = rng.normal(0, 20, size=shape)
        base = level.reshape((n,) + (1,) * (len(shape) - 1)) * 200
        arrays[f"{split}_images"] = np.clip(base + 25 + noise, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    root.mkdir(parents=True, exist_ok=True)
    path = root / (f"{flag}.npz" if image_size == 28 else f"{flag}_{image_size}.npz")
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    write_fake_medmnist(tmp_path / "data")
    return tmp_path / "data"


def tiny_blood_run(data_root: Path, method: str, **changes) -> dict:
    """A kebab-case run config for 2 quick rounds on the synthetic BloodMNIST under
    `data_root` (written by `write_fake_medmnist`): CPU, 1 thread, no TensorBoard, and a
    FusedSpaceFed warm-up of its epochs only (the recipe's 100-batch minimum would make a
    few-batch site warm up for dozens of epochs; tests/test_health.py checks the minimum)."""
    return {
        "method": method,
        "dataset": "bloodmnist",
        "data-root": str(data_root),
        "download": False,
        "partition": "dirichlet",
        "alpha": 1.0,
        "num-server-rounds": 2,
        "local-epochs": 1,
        "batch-size": 32,
        "device": "cpu",
        "num-threads": 1,
        "track-tensorboard": False,
        "warmup-min-steps": 0,
        **changes,
    }


#: Flower's Ray simulation in tests: a Ray cluster of one CPU, so one ClientAppActor that the
#: sites take turns on. Each further actor pays its own imports (torch, Flower, the ClientApp):
#: 34.9 -> 23.5 CPU-s for a 2-site run of test_engines, measured with cgroup accounting. The
#: metrics do not depend on it (the lean engine, one site after another, writes the same rows).
RAY_TEST_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"num_cpus": 1}}


def simulate_with_recorder(overrides: dict, recorder, log_path: Path, num_supernodes: int = 3) -> list[dict]:
    """Run the real ServerApp and ClientApp handlers in Flower's Ray simulation, with
    `recorder` as a Flower mod around the handlers; return the JSON rows it logged."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    import client_app.app as client
    from server_app.app import create_server_app

    app = ClientApp(mods=[recorder])
    app.train()(client.train)
    app.evaluate()(client.evaluate)
    run_simulation(
        server_app=create_server_app(overrides),
        client_app=app,
        num_supernodes=num_supernodes,
        backend_config=RAY_TEST_BACKEND,
    )
    return [json.loads(line) for line in log_path.read_text().splitlines()]
