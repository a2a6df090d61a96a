"""Durable site state: atomic files keyed by run and site, exact restore, history for
re-run rounds, and a clear error (file kept) for a corrupt file."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict

from client_app.state import (
    FILE_NAME,
    HISTORY_DIR,
    PrivateArrays,
    PrivateState,
    StateError,
    read_state_file,
)


def arrays(seed: int) -> PrivateArrays:
    g = torch.Generator().manual_seed(seed)
    return PrivateArrays(
        model={"encoder.w": torch.randn(4, 3, generator=g), "encoder.n": torch.tensor(seed)},
        extras={"c": torch.randn(2, generator=g, dtype=torch.float64)},
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def same(a: PrivateArrays, b: PrivateArrays) -> bool:
    return _same(a.model, b.model) and _same(a.extras, b.extras)


def test_state_is_keyed_by_run_and_site_and_survives_a_restart(tmp_path):
    state = PrivateState(RecordDict(), tmp_path, "run/1", "hospital a")
    assert state.path == tmp_path / "run_1" / "hospital_a" / FILE_NAME
    assert state.load(before_round=1) is None  # first participation
    state.save(arrays(1), 1)
    assert not list(state.dir.glob(".tmp-*"))  # written by rename, no leftovers

    restarted = PrivateState(RecordDict(), tmp_path, "run/1", "hospital a")  # empty context.state
    loaded = restarted.load(before_round=2)
    assert same(loaded, arrays(1)) and loaded.digest() == arrays(1).digest()
    assert restarted.source == str(state.path) and restarted.loaded_round == 1
    assert restarted.load(before_round=2) is not None and restarted.source == "memory"
    assert PrivateState(RecordDict(), tmp_path, "run/2", "hospital a").load() is None  # another run


def test_a_round_run_again_starts_from_the_state_before_it(tmp_path):
    state = PrivateState(RecordDict(), tmp_path, "run", "site", keep=2)
    for r in (1, 2, 3):
        state.save(arrays(r), r)
    assert sorted(p.name for p in (state.dir / HISTORY_DIR).iterdir()) == ["round-0001.pt", "round-0002.pt"]
    fresh = PrivateState(RecordDict(), tmp_path, "run", "site")
    assert same(fresh.load(before_round=4), arrays(3))
    fresh = PrivateState(RecordDict(), tmp_path, "run", "site")
    assert same(fresh.load(before_round=3), arrays(2)) and fresh.loaded_round == 2
    # memory from a later round is not used for an earlier one
    assert same(fresh.load(before_round=2), arrays(1))
    with pytest.raises(StateError, match="not older than round 1"):
        PrivateState(RecordDict(), tmp_path, "run", "site").load(before_round=1)

    # re-running round 2 abandons the old rounds 2 and 3
    state.save(arrays(20), 2)
    assert [r for r, _ in state.history()] == [1]
    assert read_state_file(state.path)[1] == 2


def test_keep_limits_history(tmp_path):
    state = PrivateState(RecordDict(), tmp_path, "run", "site", keep=1)
    for r in range(1, 6):
        state.save(arrays(r), r)
    assert [r for r, _ in state.history()] == [4]
    unlimited = PrivateState(RecordDict(), tmp_path, "other", "site", keep=0)
    for r in range(1, 6):
        unlimited.save(arrays(r), r)
    assert [r for r, _ in unlimited.history()] == [1, 2, 3, 4]


def test_corrupt_state_file_gives_a_clear_error_and_is_kept(tmp_path):
    state = PrivateState(RecordDict(), tmp_path, "run", "site")
    state.save(arrays(1), 1)
    state.path.write_bytes(b"\x00not a torch file")
    with pytest.raises(StateError, match=r"private_state\.pt is unreadable.*left in place for inspection"):
        PrivateState(RecordDict(), tmp_path, "run", "site").load(before_round=2)
    assert state.path.read_bytes() == b"\x00not a torch file"

    # a node that still holds the state in memory saves over it, but keeps the bad file aside
    state.save(arrays(2), 2)
    kept = list(state.dir.glob(f"{FILE_NAME}.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == b"\x00not a torch file"
    assert same(read_state_file(state.path)[0], arrays(2))


def test_sections_stay_apart_and_format_1_files_are_read(tmp_path):
    state = PrivateState(RecordDict(), tmp_path, "run", "site")
    state.save(arrays(1), 1)
    saved = torch.load(state.path, weights_only=True)
    assert set(saved) >= {"model", "extras", "round"} and set(saved["extras"]) == {"c"}
    assert not any(k.startswith("extra") for k in saved["model"])
    assert arrays(1).digest() != arrays(2).digest()

    # a file written before the typed sections (one mapping, extras behind a prefix)
    old = arrays(3)
    flat = {**old.model, **{f"extra:{k}": v for k, v in old.extras.items()}}
    torch.save({"arrays": flat, "round": 3}, state.path)
    loaded, server_round = read_state_file(state.path)
    assert server_round == 3 and same(loaded, old)


def test_the_newest_state_wins_whichever_process_served_the_last_rounds(tmp_path):
    """In-process round, then rounds served by the warm worker (its own memory, the same
    disk), then the worker down and the in-process path again: the in-process memory is
    from round 1, the disk from round 3, and round 4 must start from round 3 (it started
    from round 1: a silent roll-back of the site's encoder)."""
    in_process = PrivateState(RecordDict(), tmp_path, "run", "site")  # Flower's context.state
    in_process.save(arrays(1), 1)
    worker = PrivateState(RecordDict(), tmp_path, "run", "site")  # the worker's own memory
    assert same(worker.load(before_round=2), arrays(1))
    worker.save(arrays(2), 2)
    assert same(worker.load(before_round=3), arrays(2)) and worker.source == "memory"
    worker.save(arrays(3), 3)
    # the worker is down; the in-process path serves round 4
    loaded = in_process.load(before_round=4)
    assert same(loaded, arrays(3)) and in_process.loaded_round == 3 and in_process.source == str(in_process.path)
    in_process.save(arrays(4), 4)
    # and back to the worker, whose memory (round 3) is older than the disk (round 4)
    assert same(worker.load(before_round=5), arrays(4)) and worker.loaded_round == 4
    # nothing changed on disk since: memory serves, without reading the file
    assert same(worker.load(before_round=5), arrays(4)) and worker.source == "memory"


def test_state_folders_are_the_site_users_only(tmp_path):
    state = PrivateState(RecordDict(), tmp_path, "run", "site")
    state.save(arrays(1), 1)
    state.save(arrays(2), 2)
    assert state.dir.stat().st_mode & 0o777 == 0o700
    assert (state.dir / HISTORY_DIR).stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("run_name", ["..", ".", "../..", "..hidden"])
def test_a_run_name_cannot_lead_outside_the_state_folder(tmp_path, run_name):
    """Security review, finding 7: a run named ".." made the worker (as root) write the state,
    and chmod 0700, one level above the state folder."""
    root = tmp_path / "state"
    root.mkdir()
    state = PrivateState(RecordDict(), root, run_name, "..")
    state.save(arrays(1), 1)
    assert state.dir.resolve().parent.parent == root.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
    assert all(not p.name.startswith(".") for p in root.rglob("*") if p.is_dir())


def test_the_run_folder_is_the_site_users_only_whatever_the_umask(tmp_path):
    """Security review, finding 9: without isolation the folders kept the default umask (the
    run folder 0755 lists the site names)."""
    import os

    old = os.umask(0o022)
    try:
        state = PrivateState(RecordDict(), tmp_path, "run", "site")
        state.save(arrays(1), 1)
    finally:
        os.umask(old)
    assert state.dir.parent.stat().st_mode & 0o777 == 0o700
    assert state.dir.stat().st_mode & 0o777 == 0o700
