import numpy as np
import pytest

import partitions.medmnist_data as md
from partitions.medmnist_data import DataError, load_medmnist
from partitions.partitioners import partition_labels
from tests.conftest import write_fake_medmnist


def test_real_breastmnist_loads_with_metadata(real_data_root):
    data = load_medmnist("breastmnist", real_data_root, download=False)
    assert data.spec.channels == 1 and data.spec.num_classes == 2 and data.spec.task == "binary-class"
    assert [len(data[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    assert data["train"].images.shape == (546, 1, 28, 28) and data["train"].images.dtype == np.uint8


def test_real_rgb_dataset_is_channels_first(real_data_root):
    data = load_medmnist("retinamnist", real_data_root, download=False)
    assert data["test"].images.shape == (400, 3, 28, 28)
    assert data["train"].labels.max() == 4


def test_missing_file_names_file_and_place(tmp_path):
    with pytest.raises(DataError, match=r"bloodmnist\.npz is missing.*download disabled"):
        load_medmnist("bloodmnist", tmp_path, download=False)


def test_missing_file_without_network_says_download_failed(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(md, "_download", no_network)
    with pytest.raises(DataError, match=r"download failed: ConnectionError.*Put the official MedMNIST file"):
        load_medmnist("pneumoniamnist", tmp_path, download=True)


def test_larger_sizes_use_medmnist_file_names(tmp_path):
    write_fake_medmnist(tmp_path, "bloodmnist", image_size=64, sizes=(20, 10, 10))
    assert load_medmnist("bloodmnist", tmp_path, size=64, download=False)["train"].images.shape[-1] == 64
    with pytest.raises(DataError, match="image size 30 is not offered"):
        load_medmnist("bloodmnist", tmp_path, size=30, download=False)


def test_corrupt_file_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "bloodmnist.npz"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="corrupt or not an npz"):
        load_medmnist("bloodmnist", tmp_path, download=False)
    assert path.read_bytes() == b"this is not a zip archive"


def test_truncated_file_is_reported(tmp_path):
    good = write_fake_medmnist(tmp_path, "bloodmnist")
    good.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(DataError, match="corrupt"):
        load_medmnist("bloodmnist", tmp_path, download=False)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a: a.pop("val_labels"), "no array 'val_labels'"),
        (lambda a: a.update(train_images=a["train_images"][:, :20]), "expected \\(N, 28, 28, 3\\)"),
        (lambda a: a.update(train_labels=a["train_labels"] + 10), "outside 0..7"),
        (lambda a: a.update(test_images=a["test_images"].astype(np.float32)), "dtype float32"),
        (lambda a: a.update(test_labels=a["test_labels"][:5]), "80 test images but 5 labels"),
        (lambda a: a.update(val_labels=a["val_labels"] + 0.7), "val_labels has dtype float64, expected integers"),
    ],
)
def test_wrong_contents_are_named(tmp_path, mutate, message):
    path = write_fake_medmnist(tmp_path, "bloodmnist")
    with np.load(path) as npz:
        arrays = dict(npz)
    mutate(arrays)
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_medmnist("bloodmnist", tmp_path, download=False)


def test_unknown_and_3d_datasets_are_refused(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_medmnist("mnist", tmp_path)
    with pytest.raises(DataError, match="2D datasets"):
        load_medmnist("organmnist3d", tmp_path)


def test_the_metadata_is_medmnists_own_table_read_without_its_datasets():
    """medmnist's package imports PyTorch and pandas; its INFO table is read alone (a site's
    pre-flight check and the split command need only names), and is the package's INFO."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from partitions.medmnist_data import medmnist_info, _medmnist_table\n"
        "table = _medmnist_table(); assert medmnist_info('bloodmnist')['n_channels'] == 3\n"
        "assert 'torch' not in sys.modules and 'medmnist' not in sys.modules, 'medmnist imported'\n"
        "import medmnist\n"
        "assert table == medmnist.INFO and table is not medmnist.INFO\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_chestmnist_is_multilabel(tmp_path):
    write_fake_medmnist(tmp_path, "chestmnist", channels=1, num_classes=14, multi_label=True)
    data = load_medmnist("chestmnist", tmp_path, download=False)
    assert data.spec.multi_label and data["train"].labels.shape[1] == 14
    part = partition_labels(data["train"].labels)
    assert part.min() >= 0 and part.max() <= 14  # 14 = "no finding"


def test_a_node_gets_one_data_source_from_its_node_config(tmp_path):
    """partitions/sources.py: `data-path` means a deployed site's own folder (its cache under
    its state folder), `partition-id` a simulated partition; neither is a clear error."""
    from partitions.deployed import SiteFolder
    from partitions.simulated import SimulatedPartition
    from partitions.sources import data_source

    assert data_source({"partition-id": 3, "num-partitions": 5}) == SimulatedPartition(3, 5)
    deployed = data_source({"data-path": "/data/site.npz", "state-dir": str(tmp_path)})
    assert deployed == SiteFolder("/data/site.npz", str(tmp_path / "data-cache"))
    assert data_source({"data-path": "/data/site.npz"}).cache_dir is None
    with pytest.raises(DataError, match="no 'data-path'.*and no 'partition-id'"):
        data_source({})
