"""A site whose SuperNode is stopping does not train in the ClientApp process (issue 30.5):
pilot/start-supernode.sh marks the worker's socket `.stopping` before it stops the worker,
and a message that then finds no worker fails instead of falling back to in-process work."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

import client_app.app as client
from client_app import site


@pytest.fixture
def ran_here(monkeypatch) -> list[str]:
    """The messages the ClientApp process ran itself (site.HANDLERS stand-ins)."""
    calls: list[str] = []
    monkeypatch.setattr(
        site, "HANDLERS", {"train": lambda content, context, timeline: calls.append("train") or content}
    )
    return calls


def context(socket: str) -> Context:
    return Context(run_id=1, node_id=1, node_config={"site-worker": socket}, state=RecordDict(), run_config={})


def test_a_stopping_site_does_not_train_in_the_clientapp(tmp_path, ran_here):
    socket = tmp_path / "worker.sock"  # the worker is gone (no socket)
    (tmp_path / f"worker.sock{client.STOPPING_SUFFIX}").touch()
    with pytest.raises(client.SiteStopping, match="this site is stopping"):
        client.handle("train", RecordDict(), context(str(socket)))
    assert ran_here == []


def test_a_worker_that_is_down_otherwise_still_falls_back(tmp_path, ran_here):
    client.handle("train", RecordDict(), context(str(tmp_path / "worker.sock")))
    assert ran_here == ["train"]
