"""A pilot whose SuperNodes reach the SuperLink through faulty links (pilot/faulty_link.py):
the pilot's own start scripts, TLS and SuperNode authentication, one userspace proxy per
site. Used by benchmarks/network_faults.py."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from client_app.state import FILE_NAME, read_state_file
from core.run_folder import read_rows
from pilot.faulty_link import Faults, FaultyLink
from server_app.checkpoint import list_checkpoints
from tests.pilot_harness import Pilot, wait_for


def faulty_pilot(root: Path, data_root: Path, sites: list[str], retry: int = 30) -> tuple[Pilot, dict[str, FaultyLink]]:
    """A SuperLink, and per site a FaultyLink (no faults yet) and a SuperNode behind it,
    all online. `retry`: start-supernode.sh restarts a SuperNode that exits (2 s apart)."""
    from partitions.split import split_dataset

    pilot = Pilot(root)
    pilot.site_files = split_dataset(
        "breastmnist", data_root, root / "site-files", num_sites=len(sites), partition="iid", show=False
    )
    links: dict[str, FaultyLink] = {}
    try:
        pilot.make_material(sites)
        pilot.start_superlink()
        for site in sites:
            pilot.register(site)
        for i, site in enumerate(sites):
            links[site] = FaultyLink(("127.0.0.1", pilot.port), Faults(seed=i)).start()
            pilot.supernodes[site] = pilot.start_supernode(
                site, pilot.site_files[i], retry=retry, superlink=links[site].address
            )
        pilot.wait_online(set(pilot.node_ids.values()), 240, "every SuperNode online")
    except BaseException:
        close(pilot, links)
        raise
    return pilot, links


def close(pilot: Pilot, links: dict[str, FaultyLink]) -> None:
    pilot.stop_all()
    for link in links.values():
        link.close()


def wait_all_online(pilot: Pilot, timeout: float = 240) -> float:
    """Seconds until every registered SuperNode is online again."""
    started = time.time()
    pilot.wait_online(set(pilot.node_ids.values()), timeout, "every SuperNode online")
    return time.time() - started


def checkpoint_rounds(pilot: Pilot, run_name: str) -> list[int]:
    return [r for r, _ in list_checkpoints(pilot.results, run_name)]


def wait_checkpoint(pilot: Pilot, run_name: str, server_round: int, timeout: float) -> None:
    wait_for(
        lambda: max(checkpoint_rounds(pilot, run_name), default=-1) >= server_round,
        timeout,
        f"{run_name}: checkpoint of round {server_round}",
        every=0.5,
    )


def kill_superlink(pilot: Pilot) -> None:
    """SIGKILL the SuperLink's whole process group (SuperLink, SuperExec, ServerApp): the
    coordinator crashes; its database stays as the crash left it."""
    assert pilot.superlink is not None
    pilot.superlink.stop(signal.SIGKILL)


def restart_superlink(pilot: Pilot) -> float:
    """Start the SuperLink again on its port with its database; seconds until it serves."""
    started = time.time()
    pilot.start_superlink()
    return time.time() - started


def metrics(pilot: Pilot, run_name: str) -> list[dict]:
    path = pilot.results / run_name / "metrics.jsonl"
    return read_rows(path) if path.exists() else []


def global_model(pilot: Pilot, run_name: str) -> dict[str, torch.Tensor] | None:
    path = pilot.results / run_name / "global_model.pt"
    return torch.load(path, weights_only=True) if path.exists() else None


def private_state(pilot: Pilot, run_name: str, site: str) -> tuple[str, int] | None:
    """(sha256 of the site's saved private arrays, the round they are from)."""
    path = pilot.state_dir(site) / run_name / site / FILE_NAME
    if not path.exists():
        return None
    arrays, saved_round = read_state_file(path)
    return arrays.digest(), saved_round


def same_model(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
