"""A lean runner: the project's round loop (server_app.rounds.FederatedRun) and its
ClientApp handlers (client_app.app) in one process, without Ray or a SuperLink.

Every message goes through the same code a Flower simulation runs: the ServerApp's round
loop and strategy, the exchange (packing included), the ClientApp entry point and the
site's trainer, data, private state and metrics. Only the delivery differs: sites are
served one after another in this process, each with its own `Context` (node config
`partition-id` / `num-partitions` as Flower's simulation sets them, and its own
`context.state`). `tests/test_lean.py` checks that a run gives the same metrics.jsonl as
the Flower simulation for the same seed.

It needs no Ray (the GPU machine has none) and pays no per-round Ray/SuperLink cost, so
sweeps use it (`benchmarks/sweep.py --engine lean`, the default), several runs in
parallel sharing a machine or a GPU.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message, RecordDict

RUN_ID = 1


@dataclass
class InProcessGrid:
    """Flower's Grid interface (nodes, push, pull) over in-process sites."""

    num_sites: int
    contexts: dict[int, Context] = field(default_factory=dict)
    outbox: dict[str, Message] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        for site in range(self.num_sites):
            node_config = {"partition-id": site, "num-partitions": self.num_sites}
            self.contexts[site + 1] = Context(
                run_id=RUN_ID, node_id=site + 1, node_config=node_config, state=RecordDict(), run_config={}
            )

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        import client_app.app as client

        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            message_id = f"message-{next(self._ids)}"
            delivered = copy.copy(msg)
            delivered.content = copy.deepcopy(msg.content)  # a site never shares the server's objects
            handler = client.HANDLERS[msg.metadata.message_type]
            self.outbox[message_id] = handler(delivered, self.contexts[msg.metadata.dst_node_id])
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def run_lean(run_config: dict[str, Any], num_sites: int, grid: InProcessGrid | None = None) -> dict[str, Any]:
    """One run (kebab-case run config, as `flwr run --run-config` takes it); its summary.
    `grid`: the sites to run on (to look at them afterwards), else `num_sites` fresh ones."""
    from flwr.supercore.task_identity import TaskIdentity

    from core.config import RunConfig
    from server_app.rounds import FederatedRun

    # Messages are stamped with the task that builds them; Flower's runtime sets this
    # identity for a ServerApp process, so this process sets its own once.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 0
    return FederatedRun(grid or InProcessGrid(num_sites), RunConfig.from_mapping(run_config)).start()
