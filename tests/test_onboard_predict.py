"""Onboarding a site and predicting at a site (client_app.onboard, client_app.predict),
on real BreastMNIST images, with a small run made without Flower."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from PIL import Image

from client_app import onboard as onboard_cli
from client_app import predict as predict_cli
from client_app.onboard import onboard
from client_app.predict import write_predictions
from client_app.site_model import SiteImages, build_site_model, load_run_model, site_number
from client_app.state import PrivateState, read_state_file
from core.config import RunConfig
from core.methods import contract_for
from core.seeds import site_init_seed
from models import build_run_model
from models.autoencoders import output_layer
from partitions.medmnist_data import dataset_spec

RUN = "onboard-test"
SITE = "hospital-d"
FAST = ["--batch-size", "16", "--num-threads", "1", "--device", "cpu"]


def make_run(folder: Path, method: str = "fusedspacefed", rounds: int = 3) -> Path:
    """A finished run's folder as the ServerApp leaves it (config.json, metrics.jsonl,
    global_model.pt), plus the checkpoint of round 2."""
    cfg = RunConfig(method=method, dataset="breastmnist", run_name=RUN, num_server_rounds=5, batch_size=16, seed=3)
    model = build_run_model(cfg, dataset_spec("breastmnist", 28), seed=11, contract=contract_for(cfg.method))
    if model.fused:  # a trained decoder: a fresh one's output weights are zero (quiet start), a wall for E_i's gradient
        torch.nn.init.normal_(output_layer(model.decoder).weight, std=0.05)
    state = model.state_dict()
    shared = {k: state[k].clone() for k in contract_for(method).shared_keys(model)}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_mapping()))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(1, rounds + 1)))
    torch.save(shared, folder / "global_model.pt")
    (folder / "checkpoints").mkdir()
    checkpoint = {"format": 1, "round": 2, "run_name": RUN, "config": cfg.to_mapping(), "arrays": shared, "rows": []}
    torch.save(checkpoint, folder / "checkpoints" / "round-0002.pt")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return make_run(tmp_path_factory.mktemp("runs") / RUN)


@pytest.fixture(scope="module")
def test_images(real_data_root) -> np.ndarray:
    with np.load(real_data_root / "breastmnist.npz") as npz:
        return npz["test_images"][:64]


@pytest.fixture(scope="module")
def site_npz(tmp_path_factory, test_images) -> Path:
    path = tmp_path_factory.mktemp("site") / "unlabeled.npz"
    np.savez_compressed(path, images=test_images)  # no labels
    return path


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory, test_images) -> Path:
    """Six RGB PNGs at 40x30, nested, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("pngs")
    for i, rel in enumerate(["a/x.png", "a/b/y.png", "z.png", "c/1.PNG", "c/2.png", "c/d/e/3.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test_images[i]).convert("RGB").resize((40, 30)).save(root / rel)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def state_path(state_dir: Path) -> Path:
    return state_dir / RUN / SITE / "private_state.pt"


def test_onboard_warms_the_encoder_and_writes_the_site_state(run_dir, site_npz, tmp_path):
    model_bytes = digest(run_dir / "global_model.pt")
    done = onboard(run_dir, site_npz, tmp_path, SITE, epochs=2, device="cpu", batch_size=16, num_threads=1)
    assert done.path == state_path(tmp_path) and done.path.is_file()
    assert (done.server_round, done.num_images, done.epochs) == (3, 64, 2)  # round: the last row of metrics.jsonl
    assert done.loss_after < done.loss_before

    saved, server_round = read_state_file(done.path)
    assert server_round == 3 and not saved.extras
    assert saved.model and all(k.startswith("encoder.") for k in saved.model)  # only private parts are kept
    fresh = build_site_model(load_run_model(run_dir), SITE).state_dict()
    assert set(saved.model) == {k for k in fresh if k.startswith("encoder.")}
    assert any(not torch.equal(saved.model[k], fresh[k]) for k in saved.model)  # the encoder was trained
    assert digest(run_dir / "global_model.pt") == model_bytes  # global decoder and classifier untouched

    # what the site's SuperNode does when it trains round 4 of the run
    state = PrivateState(RecordDict(), tmp_path, RUN, SITE)
    loaded = state.load(before_round=4)
    assert loaded is not None and state.loaded_round == 3
    assert all(torch.equal(loaded.model[k], saved.model[k]) for k in saved.model)
    # the fresh encoder: the run's initial one (seed 3) with shared-encoder-init, else seeded by the site's name
    cfg = load_run_model(run_dir).cfg
    seed = 3 if cfg.shared_encoder_init else site_init_seed(3, site_number(SITE))
    expected = build_run_model(cfg, dataset_spec("breastmnist"), seed, contract=contract_for(cfg.method))
    assert all(torch.equal(expected.state_dict()[k], fresh[k]) for k in saved.model)


def test_onboard_refuses_to_overwrite_unless_forced(run_dir, site_npz, tmp_path, capsys):
    checkpoint = run_dir / "checkpoints" / "round-0002.pt"
    args = ["--images", str(site_npz), "--state-dir", str(tmp_path), "--site-name", SITE, "--epochs", "1", *FAST]
    assert onboard_cli.main(["--model", str(checkpoint), *args]) == 0
    path = state_path(tmp_path)
    assert read_state_file(path)[1] == 2  # the checkpoint's round
    before = digest(path)
    capsys.readouterr()

    assert onboard_cli.main(["--model", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert "already has a private state" in err and str(path) in err and "--force" in err
    assert digest(path) == before

    assert onboard_cli.main(["--model", str(run_dir), *args, "--force"]) == 0
    assert read_state_file(path)[1] == 3
    assert (path.parent / "history" / "round-0002.pt").is_file()  # the old state, kept
    assert digest(path.parent / "history" / "round-0002.pt") == before


def test_predict_writes_probabilities_with_the_site_encoder(run_dir, site_npz, tmp_path, capsys):
    onboard(run_dir, site_npz, tmp_path, SITE, epochs=1, device="cpu", batch_size=16, num_threads=1)
    out = tmp_path / "out" / "predictions.csv"
    argv = ["--model", str(run_dir), "--state-dir", str(tmp_path), "--site-name", SITE, "--images", str(site_npz)]
    assert predict_cli.main([*argv, "--out", str(out), *FAST]) == 0
    assert "64 images" in capsys.readouterr().out

    rows = read_csv(out)
    names = dataset_spec("breastmnist").class_names
    assert list(rows[0]) == ["index", "prediction", "label", *(f"p_{n}" for n in names)]
    assert [int(r["index"]) for r in rows] == list(range(64))
    probs = np.array([[float(r[f"p_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert [int(r["prediction"]) for r in rows] == list(probs.argmax(axis=1))
    assert [r["label"] for r in rows] == [names[int(r["prediction"])] for r in rows]

    # the probabilities are those of C(x + D(E_i(x))) with the site's saved encoder
    net = build_site_model(load_run_model(run_dir), "someone-else")
    saved, _ = read_state_file(state_path(tmp_path))
    net.load_state_dict({**net.state_dict(), **saved.model})
    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.load(site_npz)["images"][:, None]).float() / 255
        expected = torch.softmax(net(x), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_an_image_folder_works_for_onboarding_and_prediction(run_dir, png_folder, tmp_path):
    done = onboard(run_dir, png_folder, tmp_path, SITE, epochs=1, device="cpu", batch_size=4, num_threads=1)
    assert done.num_images == 6
    out = tmp_path / "folder.csv"
    argv = ["--model", str(run_dir / "global_model.pt"), "--state-dir", str(tmp_path), "--site-name", SITE]
    assert predict_cli.main([*argv, "--images", str(png_folder), "--out", str(out), *FAST]) == 0
    rows = read_csv(out)
    assert [r["file"] for r in rows] == ["a/b/y.png", "a/x.png", "c/1.PNG", "c/2.png", "c/d/e/3.png", "z.png"]
    assert all(abs(float(r["p_malignant"]) + float(r["p_normal, benign"]) - 1) < 1e-4 for r in rows)


def test_a_baseline_needs_no_onboarding_and_no_state(tmp_path, site_npz, capsys):
    fedavg = make_run(tmp_path / "fedavg", method="fedavg")
    args = ["--images", str(site_npz), "--state-dir", str(tmp_path / "state"), "--site-name", SITE, *FAST]
    assert onboard_cli.main(["--model", str(fedavg), *args]) == 2
    assert "needs no onboarding" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
    out = tmp_path / "fedavg.csv"
    assert predict_cli.main(["--model", str(fedavg), "--images", str(site_npz), "--out", str(out), *FAST]) == 0
    assert len(read_csv(out)) == 64


@pytest.mark.parametrize("method", ["fusedspacefed", "fedbn"])
def test_predict_without_the_site_state_names_the_expected_file(tmp_path, site_npz, capsys, method):
    run = make_run(tmp_path / method, method=method)
    out = tmp_path / "p.csv"
    argv = ["--model", str(run), "--state-dir", str(tmp_path / "state"), "--site-name", SITE]
    assert predict_cli.main([*argv, "--images", str(site_npz), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "no private state" in err and str(state_path(tmp_path / "state")) in err
    assert not out.exists()


def bad_npz(folder: Path, name: str, **arrays) -> Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


def test_clear_errors_for_images_that_do_not_fit(run_dir, test_images, tmp_path, capsys):
    rgb = bad_npz(tmp_path, "rgb.npz", images=np.repeat(test_images[..., None], 3, axis=3))
    big = bad_npz(tmp_path, "big.npz", images=np.zeros((4, 32, 32), np.uint8))
    meta = json.dumps({"dataset": "bloodmnist"})
    other = bad_npz(tmp_path, "blood.npz", train_images=test_images[:4], site_meta=np.array(meta))
    floats = bad_npz(tmp_path, "floats.npz", images=test_images[:4] / 255.0)
    cases = [
        (rgb, "has 3 channels, the run's dataset breastmnist has 1"),
        (big, "32x32 images, the run's model expects 28x28"),
        (other, "holds bloodmnist images"),
        (floats, "dtype float64"),
        (tmp_path / "missing.npz", "do not exist"),
    ]
    for path, message in cases:
        args = ["--model", str(run_dir), "--images", str(path), "--state-dir", str(tmp_path), "--site-name", SITE]
        assert onboard_cli.main([*args, *FAST]) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err
    assert not state_path(tmp_path).exists()


def test_clear_errors_for_models_that_do_not_fit(run_dir, site_npz, tmp_path, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "global_model.pt").write_bytes((run_dir / "global_model.pt").read_bytes())  # no config.json
    other = tmp_path / "other"
    other.mkdir()
    (other / "global_model.pt").write_bytes((run_dir / "global_model.pt").read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "dataset": "bloodmnist"}))  # 3 channels, 8 classes
    cases = [
        (empty, "has no global_model.pt"),
        (lone, "config.json"),
        (other, "the model file and its configuration are from different runs"),
        (tmp_path / "nowhere", "does not exist"),
    ]
    for model, message in cases:
        args = ["--model", str(model), "--images", str(site_npz), "--state-dir", str(tmp_path), "--site-name", SITE]
        assert onboard_cli.main([*args, *FAST]) == 2
        assert message in capsys.readouterr().err


def test_multi_label_predictions_have_one_score_per_label(tmp_path):
    spec = dataset_spec("chestmnist")
    scores = np.full((2, spec.num_classes), 0.1)
    scores[0, [0, 2]] = 0.9
    images = SiteImages(np.zeros((2, 1, 28, 28), np.uint8), ["x/a.png", "b.png"], tmp_path)
    write_predictions(tmp_path / "multi.csv", scores, spec, images)
    rows = read_csv(tmp_path / "multi.csv")
    assert list(rows[0]) == ["file", "predicted_labels", *(f"p_{n}" for n in spec.class_names)]
    assert [r["predicted_labels"] for r in rows] == ["atelectasis;effusion", ""]
    assert float(rows[0]["p_atelectasis"]) == pytest.approx(0.9)


def test_a_run_folder_without_global_model_uses_its_newest_checkpoint(run_dir, tmp_path):
    running = tmp_path / "running" / "checkpoints"
    running.mkdir(parents=True)
    (running / "round-0002.pt").write_bytes((run_dir / "checkpoints" / "round-0002.pt").read_bytes())
    loaded = load_run_model(running.parent)
    assert (loaded.server_round, loaded.cfg.run_name, loaded.cfg.method) == (2, RUN, "fusedspacefed")
    assert loaded.source == running / "round-0002.pt"
