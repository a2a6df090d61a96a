"""Differential privacy (docs/privacy.md): every site's sent update respects the clip
norm, the server's noise has the calibrated std and is the only difference from the
plain mean, the config refuses what DP would leave unprotected, and DP off changes
nothing."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from client_app.privacy import CLIPPED_KEY, NORM_KEY, clip_shared_update
from core.config import ConfigError, RunConfig
from core.methods import ARRAYS_RECORD, METRICS_RECORD
from strategies.aggregation import average_arrays
from strategies.privacy import NOISE_STD_KEY, add_noise
from tests.fl_harness import federation, server_identity, small_config

CLIP = 0.5
NOISE = 1.0
NUM_SITES = 3


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.array(record[k].numpy()) for k in record.keys()}


def _floating(values: np.ndarray) -> bool:
    return np.issubdtype(values.dtype, np.floating)


def _update_norm(sent: ArrayRecord, received: dict[str, np.ndarray]) -> float:
    arrays = _numpy(sent)
    squares = [
        float(((arrays[k].astype(np.float64) - received[k].astype(np.float64)) ** 2).sum())
        for k in arrays
        if _floating(arrays[k])
    ]
    return float(np.sqrt(sum(squares)))


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    """FusedSpaceFed (shared decoder and classifier), 3 sites, 2 rounds, clip 0.5, noise 1:
    (federation, the global arrays sent in each round)."""
    tmp_path = tmp_path_factory.mktemp("dp")
    cfg = small_config(tmp_path, "fusedspacefed", dp_clip_norm=CLIP, dp_noise_multiplier=NOISE)
    fed = federation(tmp_path, cfg, num_sites=NUM_SITES)
    sent = []
    for server_round in (1, 2):
        sent.append(_numpy(fed.arrays))
        fed.run_round(server_round)
    return fed, sent


def test_every_sent_update_respects_the_clip_norm(private_run):
    fed, sent = private_run
    assert fed.cfg.fused and {k.split(".")[0] for k in fed.shared_keys} == {"decoder", "classifier"}
    for received, replies in zip(sent, fed.round_replies, strict=True):
        assert len(replies) == NUM_SITES
        for reply in replies:
            arrays = reply.content[ARRAYS_RECORD]
            metrics = reply.content[METRICS_RECORD]
            assert _update_norm(arrays, received) <= CLIP + 1e-5
            # the update was really clipped: the site reports its norm before clipping
            assert metrics[NORM_KEY] > CLIP and metrics[CLIPPED_KEY] == 1.0
            for key, values in _numpy(arrays).items():
                if not _floating(values):  # integer counters go back as they came
                    np.testing.assert_array_equal(values, received[key])


def test_server_noise_has_the_calibrated_std(private_run):
    fed, _ = private_run
    expected_std = NOISE * CLIP / NUM_SITES
    assert fed.strategy.weighted is False  # the noise calibration assumes the plain mean
    for server_round, (replies, aggregate) in enumerate(zip(fed.round_replies, fed.history, strict=True), 1):
        assert fed.metrics[server_round - 1][NOISE_STD_KEY] == pytest.approx(expected_std)
        mean = _numpy(average_arrays([m.content[ARRAYS_RECORD] for m in replies], [1.0] * len(replies)))
        noised = _numpy(aggregate)
        diffs = [
            noised[k].astype(np.float64).ravel() - mean[k].astype(np.float64).ravel()
            for k in mean
            if _floating(mean[k]) and not k.endswith("running_var")  # (variances are clamped at 0)
        ]
        noise = np.concatenate(diffs)
        assert noise.size > 10_000
        assert abs(noise.mean()) < 0.05 * expected_std
        assert noise.std() == pytest.approx(expected_std, rel=0.2)
        assert all(np.array_equal(noised[k], mean[k]) for k in mean if not _floating(mean[k]))


def test_without_noise_the_aggregate_is_the_plain_mean(tmp_path):
    cfg = small_config(tmp_path, "fedavg", dp_clip_norm=CLIP)
    fed = federation(tmp_path, cfg, num_sites=NUM_SITES)
    received = _numpy(fed.arrays)
    replies = fed.run_round(1)
    assert fed.metrics[0][NOISE_STD_KEY] == 0.0
    assert all(_update_norm(m.content[ARRAYS_RECORD], received) <= CLIP + 1e-5 for m in replies)
    plain = average_arrays([m.content[ARRAYS_RECORD] for m in replies], [1.0] * len(replies))
    got, want = _numpy(fed.arrays), _numpy(plain)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert 0 < fed.metrics[0][CLIPPED_KEY] <= 1 and fed.metrics[0][NORM_KEY] > 0


def test_dp_off_changes_nothing(tmp_path):
    """A round with the dp keys at their defaults gives, bit for bit, the same replies and
    aggregate as the same round whose messages lack the keys (as before they existed),
    and the example-weighted mean, with no DP metrics."""
    cfg = small_config(tmp_path, "fedavg")
    assert RunConfig.from_mapping({"dp-clip-norm": 0.0, "dp-noise-multiplier": 0.0}) == RunConfig()
    outcomes = []
    for variant in ("with-keys", "without-keys"):
        run_cfg = cfg.replace(data_root=str(tmp_path / "data"), results_dir=str(tmp_path / variant))
        fed = federation(tmp_path / variant, run_cfg, num_sites=NUM_SITES)
        mapping = run_cfg.to_mapping()
        if variant == "without-keys":
            del mapping["dp-clip-norm"], mapping["dp-noise-multiplier"]
        with server_identity():
            messages = list(fed.strategy.configure_train(1, fed.arrays, ConfigRecord(mapping), fed.grid))
            assert all(("dp-clip-norm" in m.content["config"]) == (variant == "with-keys") for m in messages)
            replies = fed.grid.send_and_receive(messages)
            arrays, metrics = fed.strategy.aggregate_train(1, replies)
        outcomes.append((replies, arrays, dict(metrics)))
    (replies_a, arrays_a, metrics_a), (replies_b, arrays_b, metrics_b) = outcomes
    for a, b in zip(replies_a, replies_b, strict=True):
        ra, rb = _numpy(a.content[ARRAYS_RECORD]), _numpy(b.content[ARRAYS_RECORD])
        assert all(np.array_equal(ra[k], rb[k]) for k in ra)
        assert not {NORM_KEY, CLIPPED_KEY} & set(a.content[METRICS_RECORD].keys())
    assert all(np.array_equal(x, y) for x, y in zip(_numpy(arrays_a).values(), _numpy(arrays_b).values()))
    weights = [float(m.content[METRICS_RECORD]["num-examples"]) for m in replies_a]
    weighted = _numpy(average_arrays([m.content[ARRAYS_RECORD] for m in replies_a], weights))
    assert all(np.array_equal(_numpy(arrays_a)[k], weighted[k]) for k in weighted)
    assert NOISE_STD_KEY not in metrics_a and NOISE_STD_KEY not in metrics_b
    assert {k: v for k, v in metrics_a.items()} == metrics_b


def test_clip_shared_update_units():
    received = ArrayRecord(
        {"w": Array(np.zeros(4, np.float32)), "n": Array(np.array(3, np.int64)), "bn.running_var": Array(np.ones(2))}
    )
    trained = ArrayRecord(
        {
            "w": Array(np.array([3.0, 0.0, 4.0, 0.0], np.float32)),
            "n": Array(np.array(9, np.int64)),
            "bn.running_var": Array(np.ones(2)),
        }
    )
    sent, norm = clip_shared_update(trained, received, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(sent["w"].numpy(), [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
    assert sent["w"].numpy().dtype == np.float32 and int(sent["n"].numpy()) == 3  # counters as received
    small, norm = clip_shared_update(trained, received, 10.0)  # within the norm: sent as trained
    assert norm == pytest.approx(5.0) and np.array_equal(small["w"].numpy(), trained["w"].numpy())
    same, norm = clip_shared_update(received, received, 1.0)  # a zero update
    assert norm == 0.0 and np.array_equal(same["w"].numpy(), received["w"].numpy())
    with pytest.raises(ValueError, match="different keys"):
        clip_shared_update(ArrayRecord({"w": Array(np.zeros(4, np.float32))}), received, 1.0)


def test_the_sent_update_respects_the_clip_norm_after_float32_rounding():
    """`received + clipped update` is rounded to float32; with large global values (a noised
    model) that rounding overshoots the clip norm now and then, and the site must aim lower
    until the update the server sees is within it (an earlier version gave up on about 1 %
    of these cases)."""
    for seed in range(500):
        rng = np.random.default_rng(seed)
        received = {"w": rng.normal(0, 20, 200).astype(np.float32)}
        trained = {"w": (received["w"] + rng.normal(0, 0.5, 200)).astype(np.float32)}
        sent, norm = clip_shared_update(
            ArrayRecord({"w": Array(trained["w"])}), ArrayRecord({"w": Array(received["w"])}), 1.0
        )
        assert norm > 1.0 and _update_norm(sent, received) <= 1.0


def test_noise_is_seeded_by_run_and_round_and_keeps_variances_valid():
    arrays = ArrayRecord(
        {"w": Array(np.zeros(1000, np.float32)), "bn.running_var": Array(np.full(1000, 0.01, np.float32))}
    )
    first = _numpy(add_noise(arrays, 0.5, seed=0, server_round=1))
    again = _numpy(add_noise(copy.deepcopy(arrays), 0.5, seed=0, server_round=1))
    other = _numpy(add_noise(arrays, 0.5, seed=0, server_round=2))
    assert np.array_equal(first["w"], again["w"]) and not np.array_equal(first["w"], other["w"])
    assert first["w"].dtype == np.float32 and (first["bn.running_var"] >= 0).all()
    assert add_noise(arrays, 0.0, seed=0, server_round=1) is arrays


def test_config_checks():
    cfg = RunConfig.from_mapping({"method": "fedavg", "dp-clip-norm": 1, "dp-noise-multiplier": 0.5})
    assert cfg.dp and cfg.weighted_mean is False and not RunConfig().dp
    with pytest.raises(ConfigError, match="dp-clip-norm must be >= 0"):
        RunConfig.from_mapping({"dp-clip-norm": -1.0})
    with pytest.raises(ConfigError, match="dp-noise-multiplier must be >= 0"):
        RunConfig.from_mapping({"dp-clip-norm": 1.0, "dp-noise-multiplier": -0.1})
    with pytest.raises(ConfigError, match="needs dp-clip-norm > 0"):
        RunConfig.from_mapping({"dp-noise-multiplier": 1.0})
    with pytest.raises(ConfigError, match="scaffold also sends \\['scaffold-dc'\\]"):
        RunConfig.from_mapping({"method": "scaffold", "dp-clip-norm": 1.0})
    with pytest.raises(ConfigError, match="measure-gamma"):
        RunConfig.from_mapping({"method": "fedavg", "dp-clip-norm": 1.0, "measure-gamma": True})
    with pytest.raises(ConfigError, match="method must be one of"):  # an unknown method is reported as such
        RunConfig.from_mapping({"method": "fedsgd", "dp-clip-norm": 1.0})
