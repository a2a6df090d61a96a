import numpy as np
import pytest

from partitions.partitioners import SCHEMES, PartitionError, local_test_indices, partition_indices
from partitions.summary import label_counts, write_summary

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 8, size=4000)


def _skew(parts, labels, num_classes=8):
    """Mean over sites of the largest class share: 1/num_classes (iid) .. 1 (one class per site)."""
    counts = label_counts(labels, parts, num_classes)
    return float((counts.max(1) / counts.sum(1)).mean())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sizes_add_up_and_no_sample_twice(scheme):
    parts = partition_indices(LABELS, scheme, 10, alpha=0.3, classes_per_site=2, seed=1)
    joined = np.concatenate(parts)
    assert len(parts) == 10 and all(len(p) > 0 for p in parts)
    assert len(np.unique(joined)) == len(joined)  # without replacement
    if scheme != "pathological":  # flwr-datasets' pathological may leave classes unused
        assert len(joined) == len(LABELS)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_given_seed(scheme):
    a = partition_indices(LABELS, scheme, 5, alpha=0.5, seed=3)
    b = partition_indices(LABELS, scheme, 5, alpha=0.5, seed=3)
    c = partition_indices(LABELS, scheme, 5, alpha=0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if scheme != "pathological" and scheme != "iid":
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet-equal"])
def test_smaller_alpha_gives_more_skew(scheme):
    skews = [_skew(partition_indices(LABELS, scheme, 10, alpha=a, seed=0), LABELS) for a in (100.0, 1.0, 0.05)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.25 and skews[2] > 0.6


def test_dirichlet_equal_gives_equal_sizes_and_assigns_everything():
    labels = np.repeat(np.arange(4), [10, 500, 200, 90])  # small pools run dry at small alpha
    parts = partition_indices(labels, "dirichlet-equal", 7, alpha=0.05, seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(labels)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_k_classes_per_site(k):
    parts = partition_indices(LABELS, "pathological", 8, classes_per_site=k, seed=0)
    assert all(len(np.unique(LABELS[p])) == k for p in parts)


def test_iid_is_balanced():
    assert _skew(partition_indices(LABELS, "iid", 10, seed=0), LABELS) < 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "dirichlet", "num_sites": 3, "alpha": 0.0}, "alpha must be > 0"),
        ({"scheme": "dirichlet-equal", "num_sites": 3, "alpha": -1.0}, "alpha must be > 0"),
        ({"scheme": "iid", "num_sites": 5000}, "5000 sites but only 4000 training samples"),
        ({"scheme": "pathological", "num_sites": 3, "classes_per_site": 9}, "classes-per-client"),
        ({"scheme": "pathological", "num_sites": 3, "classes_per_site": 0}, "classes-per-client"),
        ({"scheme": "shards", "num_sites": 3}, "unknown partition"),
        ({"scheme": "iid", "num_sites": 0}, "at least one site"),
    ],
)
def test_impossible_configs_are_refused(kwargs, message):
    scheme = kwargs.pop("scheme")
    num_sites = kwargs.pop("num_sites")
    with pytest.raises(PartitionError, match=message):
        partition_indices(LABELS, scheme, num_sites, **kwargs)


def test_local_test_shard_follows_training_distribution():
    test_labels = RNG.integers(0, 8, size=2000)
    train_labels = np.array([1] * 90 + [5] * 10)
    shard = local_test_indices(test_labels, train_labels, num_sites=4, seed=0)
    shares = np.bincount(test_labels[shard], minlength=8) / len(shard)
    assert 0 < len(shard) <= 500  # at most test/num_sites; smaller when class 1's pool runs out
    assert set(np.unique(test_labels[shard])) == {1, 5}
    assert shares[1] == pytest.approx(0.9, abs=0.01)
    balanced = local_test_indices(test_labels, RNG.integers(0, 8, size=800), num_sites=10, seed=0)
    assert 190 <= len(balanced) <= 200


def test_summary_writes_table_json_and_plot(tmp_path):
    parts = partition_indices(LABELS, "dirichlet-equal", 4, alpha=0.1, seed=0)
    summary = write_summary(LABELS, parts, tmp_path, "dirichlet-equal", [f"c{i}" for i in range(8)], show=False)
    assert summary["assigned_samples"] == len(LABELS) and summary["unassigned_samples"] == 0
    assert (tmp_path / "partition.json").exists()
    assert (tmp_path / "partition.png").read_bytes()[:4] == b"\x89PNG"
