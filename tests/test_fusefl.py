"""FuseFL: the stage schedule as key sets, what each site sends and keeps per stage, the
server's stacking (not averaging), the calibration round, the fused model's forward, and
the configuration it needs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client_app.site import evaluate_round
from client_app.state import node_private_state
from core.config import ConfigError, RunConfig
from core.stages import fused_keys, level_keys, level_units, progressive_round_keys
from models.fused_columns import FusedColumns, StageModel
from tests.fl_harness import run, small_config


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 8, 10])
def test_levels_cover_every_unit_of_a_column_once_in_order(levels):
    units = level_units(levels)
    assert len(units) == levels and all(units)
    assert [u for level in units for u in level] == list(range(10))
    with pytest.raises(ValueError):
        level_units(11)


def _keys(columns=3, levels=2):
    return list(FusedColumns(1, 2, columns, levels).state_dict())


def test_the_schedule_sends_each_block_once_by_its_owner_and_the_fused_levels_back():
    keys, config = ["classifier." + k for k in _keys()], {"fusefl-blocks": 2, "fusefl-columns": 3}
    sent_by = {}
    for server_round in (1, 2, 3):
        to_site, _ = progressive_round_keys(keys, server_round, None, config)
        assert set(to_site) == set(fused_keys(keys, min(server_round - 1, 2), 3, 2))
        for site in range(3):
            _, back = progressive_round_keys(keys, server_round, site, config)
            assert back and all(f"classifier.columns.{site}." in k or f"adapters.0.{site}." in k for k in back)
            for key in back:
                assert key not in sent_by, f"{key} sent twice"
                sent_by[key] = site
    assert set(progressive_round_keys(keys, 1, None, config)[0]) == set()  # stage 0: nothing fused yet
    # every block, adapter, norm and column head is sent exactly once, by its own site; the fused head never
    assert set(sent_by) == {k for k in keys if not k.startswith("classifier.head.")}
    with pytest.raises(ValueError, match="2 stages and one calibration round"):
        progressive_round_keys(keys, 4, 0, config)
    with pytest.raises(ValueError, match="no column"):
        progressive_round_keys(keys, 1, 3, config)


def test_the_fused_model_sums_the_columns_features_and_a_stage_model_reads_all_columns():
    torch.manual_seed(0)
    net = FusedColumns(1, 2, columns=2, levels=2).eval()
    x = torch.rand(4, 1, 28, 28)
    outs = net.fused(x, 2)
    expected = net.pooled(0, outs[0]) + net.pooled(1, outs[1])
    torch.testing.assert_close(net.features(x), expected)
    # stage 1 of column 1 runs its level 1 on every column's level-0 output through its adapter
    joined = torch.cat([net.run_level(j, 0, x) for j in range(2)], dim=1)
    own = net.pooled(1, net.run_level(1, 1, net.adapters[0][1](joined)))
    torch.testing.assert_close(net.stage_features(x, 1, 1), own)
    torch.testing.assert_close(StageModel(net, 1, 1)(x), net.columns[1].head(own))


def test_a_run_needs_one_round_per_stage_and_one_to_calibrate(tmp_path):
    with pytest.raises(ConfigError, match="min-replies = fusefl-columns"):
        small_config(
            tmp_path, "fusefl", num_server_rounds=3, fusefl_blocks=2, fusefl_columns=3, min_replies=2
        ).validate()
    with pytest.raises(ConfigError, match="num-server-rounds = 3"):
        small_config(
            tmp_path, "fusefl", num_server_rounds=2, fusefl_blocks=2, fusefl_columns=3, min_replies=3
        ).validate()
    with pytest.raises(ConfigError, match="fraction-train"):
        small_config(
            tmp_path,
            "fusefl",
            num_server_rounds=3,
            fusefl_blocks=2,
            fusefl_columns=3,
            min_replies=3,
            fraction_train=0.5,
        ).validate()


def test_stages_columns_and_replies_follow_from_the_run_and_its_sites():
    """On its defaults (0 = automatic) FuseFL takes K = rounds - 1 stages, one column per
    site connected at the start, and needs every column's reply: `method = 'fusefl'` runs
    on the default federation instead of stopping at a config error."""
    cfg = RunConfig.from_mapping({"method": "fusefl", "num-server-rounds": 4})
    assert (cfg.fusefl_blocks, cfg.fusefl_columns, cfg.min_replies) == (3, 0, 1)
    sited = cfg.for_federation(5)
    assert (sited.fusefl_blocks, sited.fusefl_columns, sited.min_replies) == (3, 5, 5)
    given = RunConfig.from_mapping(
        {"method": "fusefl", "num-server-rounds": 3, "fusefl-blocks": 2, "fusefl-columns": 4}
    )
    assert given.min_replies == 4 and given.for_federation(6).fusefl_columns == 4  # what is given stays
    with pytest.raises(ConfigError, match="num-server-rounds >= 2"):
        RunConfig.from_mapping({"method": "fusefl", "num-server-rounds": 1})
    plain = RunConfig.from_mapping({"method": "fedavg"})
    assert plain.for_federation(7) == plain  # other methods derive nothing


def test_a_fusefl_run_stacks_the_sites_blocks_keeps_the_rest_and_calibrates_the_head(tmp_path):
    cfg = small_config(tmp_path, "fusefl", num_server_rounds=3, fusefl_columns=3, fusefl_blocks=2, min_replies=3)
    fed = run(tmp_path, cfg, rounds=3)
    keys = fed.shared_keys
    for server_round, replies in enumerate(fed.round_replies, 1):
        for reply in replies:
            site = int(reply.content["metrics"]["site-id"])
            _, expected = progressive_round_keys(keys, server_round, site, cfg.to_mapping())
            assert set(reply.content["arrays"].keys()) == set(expected)
            stats = reply.content["fusefl-statistics"]
            assert (len(stats.keys()) == 3) == (server_round == 3)
    # stacked, not averaged: level 0 of column j is what site j sent in stage 0
    after_stage0 = fed.history[0].to_torch_state_dict()
    for reply in fed.round_replies[0]:
        for key in reply.content["arrays"].keys():
            assert torch.equal(after_stage0[key], torch.from_numpy(np.array(reply.content["arrays"][key].numpy())))
    # after stage 0 a site keeps its level 1 (trained) to itself; it leaves in stage 1 only
    site1_level1 = level_keys(keys, 1, 1, 2)
    kept = node_private_state(fed.grid.contexts[2].state)  # (state after the last round: level 1 already sent)
    assert set(site1_level1) <= set(fed.round_replies[1][1].content["arrays"].keys())
    assert not set(site1_level1) & set(fed.round_replies[0][1].content["arrays"].keys())
    assert int(kept.extras["fusefl/stage"]) == 2 and int(kept.extras["fusefl/column"]) == 1
    # calibration: the fused head is the mean of the column heads, retrained
    final = fed.arrays.to_torch_state_dict()
    mean_head = torch.stack([final[f"classifier.columns.{j}.head.weight"] for j in range(3)]).mean(0)
    assert not torch.allclose(final["classifier.head.weight"], mean_head)
    counts = sum(r.content["fusefl-statistics"]["count"].numpy().sum() for r in fed.round_replies[2])
    assert counts == 96  # every training image of the three sites
    # the final model evaluates at a site (every level fused)
    evaluation = evaluate_round(fed.grid_message(3), fed.grid.contexts[1])["evaluation"]
    assert 0 <= evaluation["local_acc"] <= 1


def test_the_server_holds_each_site_to_one_column_and_checks_its_statistics(tmp_path):
    """A reply claiming another site's column, or calibration counts that do not add up to
    the site's examples, is a failed site, not a silent overwrite."""
    from strategies import BadReply

    cfg = small_config(tmp_path, "fusefl", num_server_rounds=3, fusefl_columns=3, fusefl_blocks=2, min_replies=3)
    fed = run(tmp_path, cfg, rounds=3)
    strategy = fed.strategy
    first, second = fed.round_replies[2][0], fed.round_replies[2][1]
    strategy.check_reply(first)  # a good calibration reply passes
    second.content["metrics"]["site-id"] = int(first.content["metrics"]["site-id"])
    with pytest.raises(BadReply, match="holds"):
        strategy.check_reply(second)
    stats = first.content["fusefl-statistics"]
    from flwr.app import Array, ArrayRecord

    inflated = {k: np.array(stats[k].numpy()) for k in stats.keys()}
    inflated["count"] = inflated["count"] * 1000
    first.content["fusefl-statistics"] = ArrayRecord({k: Array(v) for k, v in inflated.items()})
    with pytest.raises(BadReply, match="whole numbers adding up"):
        strategy.check_reply(first)
    # security review, finding 12: statistics near 1e200 overflowed mean**2 to inf, so the moment
    # check passed and the fused head turned NaN; now they are refused
    huge = {k: np.array(stats[k].numpy()) for k in stats.keys()}
    huge["mean"] = np.full(huge["mean"].shape, 1e200)  # float64: finite, so the finite check passes them
    huge["moment"] = np.full(huge["moment"].shape, 1e200)
    first.content["fusefl-statistics"] = ArrayRecord({k: Array(v) for k, v in huge.items()})
    with pytest.raises(BadReply, match="beyond"):
        strategy.check_reply(first)
