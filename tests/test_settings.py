"""The run's settings reach a site once per run (core/settings.py): messages after a node's
first carry only the round, what to evaluate and the settings' digest; a site parses them
once; the warm worker receives them once; a site restarted mid-run goes on from its disk,
and one without them fails the message with the reason and gets them with the next."""

from __future__ import annotations

import copy
import json
import shutil
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict

import client_app.app as client
from client_app import worker
from core import settings
from core.config import RunConfig
from core.methods import CONFIG_RECORD
from core.settings import DIGEST_KEY, SETTINGS_DIR, SETTINGS_RECORD, SettingsHandOver, SettingsUnknown
from server_app.app import run_federation
from tests.fl_harness import federation, first_message, server_identity, site_context, small_config, write_fake_medmnist


@dataclass
class RecordingGrid:
    """The real handlers behind the Grid's push/pull, with every pushed message kept. Before
    `forget_round`, node `forget_node` loses its memory and the settings on its disk (a
    SuperNode restarted without them); a handler's exception becomes an error reply, as a
    SuperNode sends it."""

    state_dir: Path
    num_sites: int = 3
    forget_node: int = 0
    forget_round: int = 0
    contexts: dict[int, Context] = field(default_factory=dict)
    pushed: list[Message] = field(default_factory=list)
    outbox: dict[str, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.contexts = {i + 1: site_context(i, self.num_sites, self.state_dir) for i in range(self.num_sites)}

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            self.pushed.append(msg)
            ids.append(f"message-{len(self.pushed)}")
            node = msg.metadata.dst_node_id
            if node == self.forget_node and int(msg.content[CONFIG_RECORD]["server-round"]) == self.forget_round:
                self.contexts[node] = site_context(node - 1, self.num_sites, self.state_dir)
                shutil.rmtree(self.state_dir / SETTINGS_DIR, ignore_errors=True)
            delivered = copy.copy(msg)
            delivered.content = copy.deepcopy(msg.content)
            handler = client.HANDLERS[msg.metadata.message_type]
            try:
                self.outbox[ids[-1]] = handler(delivered, self.contexts[node])
            except Exception as exc:
                self.outbox[ids[-1]] = Message(Error(0, f"{type(exc).__name__}: {exc}"), reply_to=msg)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.outbox.pop(i) for i in list(message_ids) if i in self.outbox]


def _round(msg: Message) -> int:
    return int(msg.content[CONFIG_RECORD]["server-round"])


def test_only_a_nodes_first_message_carries_the_settings_and_a_site_without_them_gets_them_again(tmp_path):
    """The real round loop: round 1's messages carry the resolved settings (run name and
    norm included); later messages carry only round, evaluate flag, splits and digest. A
    site that lost its memory and its disk copy fails round 2 with the reason, and round 3's
    message to it carries the settings again; it then trains on."""
    write_fake_medmnist(tmp_path / "data")
    cfg = small_config(tmp_path, "fedavg", run_name="", num_server_rounds=3, min_replies=2)
    grid = RecordingGrid(tmp_path / "site-state", forget_node=2, forget_round=2)
    with server_identity():
        summary = run_federation(grid, cfg)
    assert summary["run_name"]
    by_round: dict[tuple[int, str], dict[int, Message]] = {}
    for msg in grid.pushed:
        by_round.setdefault((_round(msg), msg.metadata.message_type), {})[msg.metadata.dst_node_id] = msg
    first = by_round[(1, "train")]
    assert set(first) == {1, 2, 3} and all(SETTINGS_RECORD in m.content.config_records for m in first.values())
    sent = dict(first[1].content[SETTINGS_RECORD])
    assert sent["run-name"] == summary["run_name"] and sent["norm"] != "auto"  # resolved by the server
    assert sent["local-epochs"] == 1 and RunConfig.from_mapping(sent).run_name == summary["run_name"]
    digest = first[1].content[CONFIG_RECORD][DIGEST_KEY]
    resend = by_round[(3, "train")][2]
    later = [m for m in grid.pushed if _round(m) > 1 and m is not resend]
    assert len(later) == 3 + 3 + 2  # rounds 2, 3 (but the resend) and the final evaluation
    for msg in later:
        assert set(msg.content[CONFIG_RECORD].keys()) == {
            "server-round",
            "evaluate-received",
            "evaluate-splits",
            DIGEST_KEY,
        }
        assert msg.content[CONFIG_RECORD][DIGEST_KEY] == digest
        assert SETTINGS_RECORD not in msg.content.config_records
    rows = [
        json.loads(r) for r in (Path(cfg.results_dir) / summary["run_name"] / "metrics.jsonl").read_text().splitlines()
    ]
    (failure,) = rows[1]["failed_sites"]
    assert "SettingsUnknown" in failure and "does not hold the run settings" in failure
    assert "sends them with its next message" in failure
    assert dict(resend.content[SETTINGS_RECORD]) == sent  # again, after the failure
    assert rows[2]["failed_sites"] == [] and rows[2]["num_replies"] == 3


@pytest.mark.slow  # about 4 s or more idle (several lean rounds); `make test` runs it, the fast tier leaves it
def test_a_site_parses_the_settings_once_per_run_and_a_digest_only_message_trains_the_same(tmp_path, monkeypatch):
    """Three sites, two rounds, one process: the settings are parsed (RunConfig checks)
    once; a round-2 message with only the digest trains exactly like one carrying them."""
    calls = []
    parse = RunConfig.from_mapping.__func__

    def counted(cls, values):
        calls.append(dict(values))
        return parse(cls, values)

    monkeypatch.setattr(settings, "_PARSED", {})
    monkeypatch.setattr(RunConfig, "from_mapping", classmethod(counted))
    cfg = small_config(tmp_path, "fusedspacefed")
    fed = federation(tmp_path / "a", cfg)
    fed.run_round(1)
    replies = fed.run_round(2)
    assert len(calls) == 1 and all(SETTINGS_RECORD not in m.content.config_records for m in fed.grid.sent[3:])

    # the same two rounds where every message carries the settings in full
    again = federation(tmp_path / "b", cfg)  # (its own state-dir; the same settings)
    again.run_round(1)
    again.grid.handover.holding.clear()  # as if every site were new: round 2 carries them again
    with_settings = again.run_round(2)
    assert all(SETTINGS_RECORD in m.content.config_records for m in again.grid.sent[3:])
    for a, b in zip(replies, with_settings, strict=True):
        x, y = a.content["arrays"].to_torch_state_dict(), b.content["arrays"].to_torch_state_dict()
        assert all(x[k].equal(y[k]) for k in x)
        assert dict(a.content["metrics"]) == dict(b.content["metrics"])
    assert len(calls) == 1  # the same settings, the same digest: parsed once in this process


def test_a_restarted_site_goes_on_with_the_settings_on_its_disk_and_one_without_fails_clearly(tmp_path):
    cfg = small_config(tmp_path, "fusedspacefed")
    fed = federation(tmp_path, cfg)
    fed.run_round(1)
    digest = fed.grid.handover.digest
    saved = tmp_path / "site-state" / SETTINGS_DIR / f"{digest}.json"
    assert saved.exists()
    # restarted SuperNodes: empty memory, the same disks; round 2 carries no settings
    fed.grid.contexts = {i + 1: site_context(i, 3, tmp_path / "site-state") for i in range(3)}
    replies = fed.run_round(2)
    assert all(SETTINGS_RECORD not in m.content.config_records for m in fed.grid.sent[3:])
    assert all(m.content["metrics"]["restored"] == 1 for m in replies)
    # a site that holds them nowhere fails the message, naming what is missing
    saved.unlink()
    with server_identity():
        msg = next(iter(fed.strategy.configure_train(3, fed.arrays, fed.config(), fed.grid)))
        assert SETTINGS_RECORD not in msg.content.config_records
        with pytest.raises(SettingsUnknown, match="does not hold the run settings"):
            client.train(msg, site_context(0, 3, tmp_path / "site-state"))
        # settings that do not match the digest they come with are refused
        forged = first_message(cfg, fed.arrays, 3)
        forged[SETTINGS_RECORD]["local-epochs"] = 7
        with pytest.raises(settings.SettingsMismatch):
            client.train(Message(forged, dst_node_id=1, message_type="train"), site_context(0, 3, tmp_path / "x"))


def test_the_hand_over_resends_to_nodes_that_failed_or_did_not_answer():
    handover = SettingsHandOver(RunConfig().to_mapping())
    with server_identity():
        shared = RecordDict({CONFIG_RECORD: handover.config()})
        messages = [Message(shared, dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    first = handover.attach(messages)
    assert all(SETTINGS_RECORD in m.content.config_records for m in first)
    assert len({id(m.content) for m in first}) == 1  # one content for all: packed once
    assert SETTINGS_RECORD not in shared.config_records  # the caller's records untouched
    handover.settle([1, 2, 3], answered=[1, 3])
    with server_identity():
        messages = [
            Message(RecordDict({CONFIG_RECORD: handover.config()}), dst_node_id=n, message_type="train")
            for n in (1, 2, 3)
        ]
    carried = {m.metadata.dst_node_id: SETTINGS_RECORD in m.content.config_records for m in handover.attach(messages)}
    assert carried == {1: False, 2: True, 3: False}


class CountingWorker(worker.Worker):
    """The real worker, counting the message frames that carry the run's settings."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[bool] = []

    def handle(self, frame: bytes) -> bytes:
        _, content = worker.decode(frame, keep_packed=True)
        self.frames.append(SETTINGS_RECORD in content.config_records)
        return super().handle(frame)


@pytest.fixture
def short_tmp():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsf-") as folder:
        yield Path(folder)


def serve_in_thread(path: Path, serving: worker.Worker) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def loop() -> None:
        with server:
            while True:
                connection, _ = server.accept()
                with connection:
                    worker.serve_one(serving, connection)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_the_worker_receives_the_settings_once_per_run_and_again_only_when_it_lost_them(tmp_path, short_tmp):
    """Three sites served by one warm worker, three rounds: the settings travel in each
    site's first frame only. A worker restarted with the settings on the site's disk needs
    none; one restarted without them asks, and the thin app sends its node's copy."""
    cfg = small_config(tmp_path, "fedavg", num_server_rounds=4)
    first = CountingWorker()
    serve_in_thread(short_tmp / "a.sock", first)
    fed = federation(tmp_path, cfg, **{worker.WORKER_KEY: str(short_tmp / "a.sock")})
    fed.run_round(1)
    fed.run_round(2)
    assert first.frames == [True] * 3 + [False] * 3
    assert fed.grid.replies[-1].content["timeline"]["worker"] == 1.0  # served by the worker
    # a restarted worker: empty memory; the settings on the sites' disk
    restarted = CountingWorker()
    serve_in_thread(short_tmp / "b.sock", restarted)
    for context in fed.grid.contexts.values():
        context.node_config[worker.WORKER_KEY] = str(short_tmp / "b.sock")
    fed.run_round(3)
    assert restarted.frames == [False] * 3 and fed.grid.replies[-1].content["timeline"]["worker"] == 1.0
    # restarted again, and the disk copy gone: one refusal per site, then the thin app's copy
    shutil.rmtree(tmp_path / "site-state" / SETTINGS_DIR)
    bare = CountingWorker()
    serve_in_thread(short_tmp / "c.sock", bare)
    for context in fed.grid.contexts.values():
        context.node_config[worker.WORKER_KEY] = str(short_tmp / "c.sock")
    replies = fed.run_round(4)
    # the first site's copy goes to the worker, which writes it to the disk the three sites
    # share in this harness (each has its own in a deployment): the others find it there
    assert bare.frames == [False, True, False, False]
    assert all(r.content["timeline"]["worker"] == 1.0 for r in replies)


def test_the_thin_app_waits_no_longer_than_the_rounds_timeout(short_tmp):
    """The round-timeout comes from the run's settings the node holds, not the message."""
    import time

    path = short_tmp / "w.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)  # a worker that accepts and never answers
    handover = SettingsHandOver({"round-timeout": 0.5})
    node_config = {worker.WORKER_KEY: str(path), worker.WORKER_REQUIRED_KEY: True}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    content = RecordDict({CONFIG_RECORD: handover.config(), SETTINGS_RECORD: handover.record})
    started = time.time()
    with pytest.raises(worker.WorkerUnavailable):
        client.handle("train", content, context)
    # later messages name the settings only: the node kept them from the first
    del content[SETTINGS_RECORD]
    with pytest.raises(worker.WorkerUnavailable):
        client.handle("train", content, context)
    assert time.time() - started < 10
    listener.close()


def test_a_site_reads_its_node_config_once_per_run(tmp_path, monkeypatch):
    """Three sites, two rounds, one process: each site's node config is parsed (its data
    source, opt-ins, DP minimum, name) on the run's first message and kept; another run, or
    another node config, is read afresh."""
    from client_app import node as node_module

    reads = []
    read = node_module.NodeSettings.read.__func__

    def counted(cls, config):
        reads.append(dict(config))
        return read(cls, config)

    monkeypatch.setattr(node_module, "_KEPT", {})
    monkeypatch.setattr(node_module.NodeSettings, "read", classmethod(counted))
    cfg = small_config(tmp_path, "fedavg")
    fed = federation(tmp_path / "a", cfg)
    fed.run_round(1)
    replies = fed.run_round(2)
    assert len(replies) == 3 and len(reads) == 3  # once per site, not once per message
    assert sorted(r["partition-id"] for r in reads) == [0, 1, 2]
    kept = node_module.node_settings(1, reads[0])
    assert len(reads) == 3 and kept.partition_id == reads[0]["partition-id"] and not kept.deployed
    node_module.node_settings(2, reads[0])  # a new run reads it again
    node_module.node_settings(1, {**reads[0], "allow-gradients": True})  # so does a changed node config
    assert len(reads) == 5


@pytest.mark.parametrize("damage", ["not json", "[1, 2]", '{"method": "fedavg"}'])
def test_a_damaged_settings_file_is_unknown_and_the_next_copy_replaces_it(tmp_path, damage):
    """A site's disk copy that is not JSON, not a mapping, or other settings is treated as
    absent (SettingsUnknown, so the server resends them), and the copy that then arrives is
    written over it."""
    from flwr.app import ArrayRecord

    cfg = small_config(tmp_path, "fedavg")
    first = first_message(cfg, ArrayRecord())
    digest = first["config"][DIGEST_KEY]
    path = tmp_path / "state" / SETTINGS_DIR / f"{digest}.json"
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    digest_only = RecordDict({"arrays": first["arrays"], "config": first["config"]})
    with pytest.raises(SettingsUnknown):
        settings.site_settings(digest_only, RecordDict(), tmp_path / "state")
    assert settings.site_settings(first, RecordDict(), tmp_path / "state")[0] == digest
    assert settings.site_settings(digest_only, RecordDict(), tmp_path / "state")[0] == digest  # from disk now
    assert json.loads(path.read_text()) == dict(first[SETTINGS_RECORD])


@pytest.mark.parametrize("digest", ["../../etc/passwd", "x" * 64, "", "AB" * 32])
def test_a_hostile_digest_is_refused_before_it_names_a_file(tmp_path, digest):
    from core.settings import SettingsMismatch

    content = RecordDict({"config": settings.message_config(digest)})
    with pytest.raises((SettingsUnknown, SettingsMismatch)):
        settings.site_settings(content, RecordDict(), tmp_path / "state")
    assert not (tmp_path / "state").exists()  # nothing written, no folder made


def test_settings_the_site_refuses_are_never_written_to_its_disk(tmp_path):
    from core.config import ConfigError

    handover = SettingsHandOver({"method": "fedsgd"})  # no such method: RunConfig refuses it
    content = RecordDict({"config": handover.config(), SETTINGS_RECORD: handover.record})
    with pytest.raises(ConfigError):
        settings.site_settings(content, RecordDict(), tmp_path / "state")
    assert not (tmp_path / "state" / SETTINGS_DIR).exists()
