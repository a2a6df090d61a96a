"""An in-process federation for tests: the real ServerApp pieces (initial model,
strategy) and the real ClientApp `train` handler, without Ray or a SuperLink.

`FakeGrid` delivers each train message to `client_app.app.train` with the site's own
`Context` (node_config with partition-id, num-partitions and a state-dir under the
test's tmp_path), and records every message in both directions for inspection. Each
site receives its own deep copy of the message content, as it would after
serialisation. Replies come back in node order, so runs repeat exactly. Data: a tiny
synthetic dataset in MedMNIST's npz layout (breastmnist: 1 channel, 28 x 28, 2
classes), so nothing here needs the network or shared files.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import client_app.app as client
from core.config import RunConfig
from core.settings import SETTINGS_RECORD, SettingsHandOver
from server_app.rounds import initial_model_arrays
from strategies import SharedModelStrategy, build_strategy


def write_fake_medmnist(root: Path, n_train: int = 96, n_eval: int = 24, seed: int = 0) -> Path:
    """`root/breastmnist.npz` with a learnable, class-dependent brightness pattern."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        labels = rng.integers(0, 2, size=(n, 1))
        images = rng.integers(0, 120, size=(n, 28, 28))
        images[:, :14] += 100 * labels[:, :, None]  # class 1: brighter upper half
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "breastmnist.npz", **arrays)
    return root


def small_config(tmp_path: Path, method: str, **changes) -> RunConfig:
    """3 iid sites on the synthetic data, 1 local epoch, small batches, CPU, 1 thread, and a
    warm-up of 1 epoch: the recipe's `warmup-min-steps` (100 batches) would make each site's
    2-batch warm-up 50 epochs, which none of these tests is about (tests/test_health.py checks
    the minimum itself)."""
    base = dict(
        method=method,
        dataset="breastmnist",
        data_root=str(tmp_path / "data"),
        download=False,
        partition="iid",
        num_server_rounds=2,
        local_epochs=1,
        warmup_epochs=1,
        batch_size=16,
        measure_gamma=False,
        warmup_min_steps=0,
        device="cpu",
        num_threads=1,
        results_dir=str(tmp_path / "results"),
        run_name=f"test-{method}",
    )
    base.update(changes)
    return RunConfig(**base)


def first_message(cfg: RunConfig, arrays: ArrayRecord, server_round: int = 1) -> RecordDict:
    """A site's first train message of a run: the arrays, the round, and the run's settings
    with their digest (core/settings.py)."""
    handover = SettingsHandOver(cfg.to_mapping())
    config = ConfigRecord({**handover.config(), "server-round": server_round})
    return RecordDict({"arrays": arrays, "config": config, SETTINGS_RECORD: handover.record})


@contextmanager
def server_identity() -> Iterator[None]:
    """Messages built outside a ServerApp process need a task identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def site_context(site_id: int, num_sites: int, state_dir: Path, **node_extra) -> Context:
    node_config = {"partition-id": site_id, "num-partitions": num_sites, "state-dir": str(state_dir), **node_extra}
    return Context(run_id=1, node_id=site_id + 1, node_config=node_config, state=RecordDict(), run_config={})


@dataclass
class FakeGrid:
    contexts: dict[int, Context]  # node id -> the site's context
    sent: list[Message] = field(default_factory=list)  # server -> sites
    replies: list[Message] = field(default_factory=list)  # sites -> server
    #: the run's settings, handed to each site with its first message as the round loop does
    handover: SettingsHandOver | None = None

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        out = []
        messages = list(messages)
        if self.handover is not None:
            messages = self.handover.attach(messages)
        # in node order (not the strategy's random sampling order): the server then sums
        # the replies in a fixed order, so repeated runs agree bit for bit
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self.sent.append(msg)
            delivered = copy.copy(msg)
            delivered.content = copy.deepcopy(msg.content)
            reply = client.train(delivered, self.contexts[msg.metadata.dst_node_id])
            self.replies.append(reply)
            out.append(reply)
        if self.handover is not None:
            self.handover.settle([m.metadata.dst_node_id for m in messages], [m.metadata.src_node_id for m in out])
        return out


@dataclass
class Federation:
    cfg: RunConfig
    grid: FakeGrid
    strategy: SharedModelStrategy
    shared_keys: list[str]
    arrays: ArrayRecord  # the current global arrays
    history: list[ArrayRecord] = field(default_factory=list)  # global arrays after each round
    round_replies: list[list[Message]] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)  # aggregate_train's metrics per round

    def config(self) -> ConfigRecord:
        """A train message's config record, as the round loop builds it (the settings' digest)."""
        return self.grid.handover.config()

    def grid_message(self, server_round: int) -> RecordDict:
        """The content of a first train message of the run (current global arrays, the round
        and the run's settings)."""
        return first_message(self.cfg, copy.deepcopy(self.arrays), server_round)

    def run_round(self, server_round: int) -> list[Message]:
        with server_identity():
            messages = self.strategy.configure_train(server_round, self.arrays, self.config(), self.grid)
            replies = self.grid.send_and_receive(messages)
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        assert arrays is not None
        self.metrics.append(dict(metrics))
        self.arrays = arrays
        self.history.append(arrays)
        self.round_replies.append(replies)
        return replies


def federation(
    tmp_path: Path, cfg: RunConfig, num_sites: int = 3, state_dir: Path | None = None, **node_extra
) -> Federation:
    """A federation of `num_sites` sites (`node_extra`: more node config for every site,
    e.g. a `data-path`); writes the synthetic data first."""
    if not (Path(cfg.data_root) / "breastmnist.npz").exists():
        write_fake_medmnist(Path(cfg.data_root))
    state_dir = state_dir or tmp_path / "site-state"
    grid = FakeGrid({i + 1: site_context(i, num_sites, state_dir, **node_extra) for i in range(num_sites)})
    grid.handover = SettingsHandOver(cfg.to_mapping())
    arrays, keys = initial_model_arrays(cfg)
    strategy = build_strategy(cfg, arrays)
    return Federation(cfg, grid, strategy, keys, arrays)


def run(tmp_path: Path, cfg: RunConfig, rounds: int = 1, **kwargs) -> Federation:
    fed = federation(tmp_path, cfg, **kwargs)
    for r in range(1, rounds + 1):
        fed.run_round(r)
    return fed


def state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def all_outgoing_arrays(replies: Iterable[Message]) -> Iterator[tuple[str, str, np.ndarray]]:
    """(record name, key, values) of every array in every reply."""
    for reply in replies:
        for name, record in reply.content.array_records.items():
            for key in record.keys():
                yield name, key, np.array(record[key].numpy())
