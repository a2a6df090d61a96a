"""One site cannot steer the model (issue "trust", item 4): robust aggregation rules built on
Flower's helpers, a server-side update-norm bound, example counts bounded by a site's first
claim and a cap, and the DP clip enforced by the server."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from core.config import ConfigError, RunConfig
from core.methods import ARRAYS_RECORD, METRICS_RECORD, WEIGHT_KEY
from strategies import BadReply
from strategies.aggregation import average_arrays
from strategies.robust import bound_update, robust_arrays, update_norm
from tests.fl_harness import federation, small_config

RULES = ("median", "trimmed-mean", "krum")


def _records(num_honest: int = 9, scale: float = 1000.0, seed: int = 0) -> tuple[list[ArrayRecord], np.ndarray]:
    """Honest sites' arrays around `centre`, plus one attacker whose update is `scale` times larger."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(0, 1, 500)
    honest = [centre + rng.normal(0, 0.01, 500) for _ in range(num_honest)]
    attacker = centre + scale * (honest[0] - centre)
    records = [
        ArrayRecord({"w": Array(v.astype(np.float32)), "n": Array(np.array(7, np.int64))}) for v in honest + [attacker]
    ]
    return records, np.mean(honest, axis=0)


def _distance(record: ArrayRecord, target: np.ndarray) -> float:
    return float(np.linalg.norm(record["w"].numpy().astype(np.float64) - target))


@pytest.mark.parametrize("rule", RULES)
def test_a_robust_rule_stays_with_the_honest_sites_where_the_mean_does_not(rule):
    records, honest_mean = _records()
    mean = average_arrays(records, [1.0] * len(records))
    robust = robust_arrays(records, rule, trim_fraction=0.2, byzantine=1)
    assert _distance(mean, honest_mean) > 1.0  # one site of ten drags the mean away
    assert _distance(robust, honest_mean) < 0.05 * _distance(mean, honest_mean)
    assert robust["w"].numpy().dtype == np.float32 and int(robust["n"].numpy()) == 7  # counters as received


def test_krum_picks_one_honest_site():
    records, _ = _records()
    chosen = robust_arrays(records, "krum", 0.2, 1)["w"].numpy()
    assert any(np.array_equal(chosen, r["w"].numpy()) for r in records[:-1])


def test_the_update_bound_scales_only_updates_beyond_it():
    sent = {"w": np.zeros(4, np.float32), "n": np.array(3, np.int64)}
    far = ArrayRecord({"w": Array(np.array([3.0, 0, 4.0, 0], np.float32)), "n": Array(np.array(3, np.int64))})
    bounded = bound_update(far, sent, 1.0)
    assert update_norm(far, sent) == pytest.approx(5.0) and update_norm(bounded, sent) == pytest.approx(1.0)
    np.testing.assert_allclose(bounded["w"].numpy(), [0.6, 0, 0.8, 0], rtol=1e-6)
    assert bound_update(far, sent, 10.0) is far


def _reply(node: int, count: int, arrays: ArrayRecord) -> SimpleNamespace:
    content = RecordDict({ARRAYS_RECORD: arrays, METRICS_RECORD: MetricRecord({WEIGHT_KEY: count, "site-id": node})})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node))


def test_example_counts_are_bounded_by_the_first_claim_and_the_cap(tmp_path):
    fed = federation(tmp_path, small_config(tmp_path, "fedavg"))
    strategy = fed.strategy
    arrays = fed.arrays
    assert strategy.weights([_reply(1, 100, arrays), _reply(2, 50, arrays)]) == [100.0, 50.0]
    # a site that claims a billion examples in a later round counts for its first claim
    assert strategy.weights([_reply(1, 10**12, arrays), _reply(2, 40, arrays)]) == [100.0, 40.0]
    strategy.max_examples = 60
    assert strategy.weights([_reply(1, 100, arrays), _reply(2, 50, arrays)]) == [60.0, 50.0]


def test_the_server_enforces_the_dp_clip(tmp_path):
    cfg = small_config(tmp_path, "fedavg", dp_clip_norm=0.5)
    fed = federation(tmp_path, cfg)
    replies = fed.run_round(1)  # honest sites: within the clip, all aggregated
    assert fed.metrics[0]["num_replies"] == len(replies)
    sent = {k: np.array(fed.history[0][k].numpy()) for k in fed.history[0].keys()}
    fed.strategy.sent = sent
    key = next(k for k, v in sent.items() if np.issubdtype(v.dtype, np.floating) and v.size > 10)
    pushed = dict(sent)
    pushed[key] = sent[key] + np.float32(1.0)  # far beyond a clip of 0.5
    reply = _reply(1, 10, ArrayRecord({k: Array(v) for k, v in pushed.items()}))
    with pytest.raises(BadReply, match="update of norm .* > dp-clip-norm 0.5"):
        fed.strategy.check_reply(reply)


def test_config_checks_for_the_robust_options():
    assert RunConfig.from_mapping({"aggregation": "median"}).aggregation == "median"
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        RunConfig.from_mapping({"aggregation": "mode"})
    with pytest.raises(ConfigError, match="calibrated to the plain mean"):
        RunConfig.from_mapping({"aggregation": "krum", "dp-clip-norm": 1.0, "method": "fedavg"})
    with pytest.raises(ConfigError, match="scaffold"):
        RunConfig.from_mapping({"aggregation": "median", "method": "scaffold"})
    with pytest.raises(ConfigError, match="trim-fraction"):
        RunConfig.from_mapping({"trim-fraction": 0.5})


@pytest.mark.slow
def test_one_scaled_site_of_ten_hurts_the_mean_and_not_the_robust_rules(tmp_path, real_data_root):
    """The issue's check, in the real round loop on BreastMNIST: 10 iid sites, one of which
    sends its update scaled by -50. The mean's model lands far from the clean run's; the
    robust rules' models stay near it and their accuracy within 2 points of the clean run."""
    import copy
    import json
    from pathlib import Path

    import torch

    from core.transport import pack, unpack
    from tests.test_server_resume import LocalGrid, run

    class ScaledGrid(LocalGrid):
        attacker: int = 2
        factor: float = 0.0

        def push_messages(self, messages):
            sent = {m.metadata.dst_node_id: unpack(copy.deepcopy(m.content)) for m in messages}
            ids = super().push_messages(messages)
            for mid in ids:
                reply = self.outbox.get(mid)
                if reply is None or reply.metadata.src_node_id != self.attacker or not self.factor:
                    continue
                content = unpack(reply.content)
                if ARRAYS_RECORD not in content.array_records:
                    continue
                base = sent[self.attacker][ARRAYS_RECORD]
                arrays = content[ARRAYS_RECORD]
                scaled = {}
                for k in arrays.keys():
                    v, b = arrays[k].numpy(), base[k].numpy()
                    scaled[k] = Array((b + self.factor * (v - b)).astype(v.dtype) if v.dtype.kind == "f" else v)
                content[ARRAYS_RECORD] = ArrayRecord(scaled)
                reply.content = pack(content)
            return ids

    def one_run(name: str, aggregation: str, factor: float) -> tuple[dict, dict]:
        cfg = small_config(
            tmp_path, "fedavg", data_root=str(real_data_root), run_name=name, num_server_rounds=1,
            aggregation=aggregation, weighted=False, batch_size=32,
        )  # fmt: skip
        grid = ScaledGrid(tmp_path / name / "site-state", num_sites=10)
        grid.factor = factor
        run(cfg, grid)
        run_dir = Path(cfg.results_dir) / name
        row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        return row, torch.load(run_dir / "global_model.pt", weights_only=True)

    def distance(a: dict, b: dict) -> float:
        return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)

    clean_row, clean = one_run("clean", "mean", 0.0)
    attacked_row, attacked = one_run("attacked-mean", "mean", -50.0)
    hurt = distance(attacked, clean)
    for rule in RULES:
        row, model = one_run(f"attacked-{rule}", rule, -50.0)
        assert distance(model, clean) < hurt / 5, (rule, distance(model, clean), hurt)
        assert abs(row["global_acc_mean"] - clean_row["global_acc_mean"]) <= 0.02, (rule, row, clean_row)
    assert attacked_row["num_replies"] == 10  # the attack passes every reply check: only aggregation stops it


@pytest.mark.parametrize("num_honest", [2, 3])
def test_trimmed_mean_trims_one_site_at_the_pilots_sizes(num_honest):
    """Security review, finding 5: with trim-fraction 0.2 and 4 or fewer replying sites,
    int(0.2 * n) = 0 values were cut, so trimmed-mean was the plain mean and one site
    steered it. Now one value goes at each end from 3 sites on."""
    records, honest_mean = _records(num_honest=num_honest)
    mean = average_arrays(records, [1.0] * len(records))
    trimmed = robust_arrays(records, "trimmed-mean", trim_fraction=0.2, byzantine=1)
    assert _distance(mean, honest_mean) > 1.0
    assert _distance(trimmed, honest_mean) < 0.05 * _distance(mean, honest_mean)


def test_trim_cut_cuts_at_least_one_of_three_and_none_of_two():
    from strategies.robust import trim_cut

    assert [int(trim_cut(0.2, n) * n) for n in (1, 2, 3, 4, 5, 10, 20)] == [0, 0, 1, 1, 1, 2, 4]
    assert trim_cut(0.0, 4) == 0.0  # trim 0 asks for the plain mean
