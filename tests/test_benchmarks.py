"""The benchmark sweep's grid and resumability, and the report's table maths (no simulation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import report, sweep


def test_grid_names_are_deterministic_and_variants_only_split_fusedspacefed():
    plan = {
        "methods": "fusedspacefed,fedavg",
        "variants": "task-aware,decoupled",
        "datasets": "retinamnist",
        "partitions": "dirichlet-equal,pathological",
        "alphas": "0.05,0.5",
        "seeds": "0,1",
        "rounds": "retinamnist=4,default=9",
    }
    runs = sweep.expand(plan)
    names = [r.name for r in runs]
    assert names == [r.name for r in sweep.expand(plan)]
    assert len(names) == len(set(names))
    # dirichlet: 2 alphas x 2 seeds x 3 method-variants; pathological: 1 (no alpha) x 2 seeds x 3
    assert len(runs) == 2 * 2 * 3 + 2 * 3
    assert "fusedspacefed-decoupled-retinamnist-dirichlet-equal-a0.05-n10-r4-e3-s1" in names
    assert "fedavg-retinamnist-pathological-k2-n10-r4-e3-s0" in names
    assert not any(n.startswith("fedavg-decoupled") for n in names)
    decoupled = next(r for r in runs if r.variant == "decoupled")
    assert decoupled.run_config(Path("/r"))["task-aware"] is False
    # seeds outside the methods: every method of a cell gets seed 0 before any gets seed 1
    first_cell = [r for r in runs if r.partition == "dirichlet-equal" and r.alpha == 0.05]
    assert [r.seed for r in first_cell] == [0, 0, 0, 1, 1, 1]


def test_rounds_per_dataset():
    assert sweep.rounds_for(7, "x") == 7
    assert sweep.rounds_for("7", "x") == 7
    assert sweep.rounds_for({"a": 3, "default": 5}, "b") == 5
    assert sweep.rounds_for("a=3,b=4", "b") == 4
    with pytest.raises(SystemExit):
        sweep.rounds_for("a=3", "b")


class _Done:
    returncode = 0

    def poll(self):
        return 0


class _Log:
    def close(self):
        pass


@pytest.mark.slow  # about 4 s or more idle (several lean rounds); `make test` runs it, the fast tier leaves it
def test_sweep_skips_finished_runs_and_redoes_interrupted_ones(tmp_path, monkeypatch):
    runs = sweep.expand({"methods": "fedavg", "datasets": "breastmnist", "seeds": "0,1,2", "rounds": 2})
    done, partial, new = runs
    (tmp_path / done.name).mkdir(parents=True)
    (tmp_path / done.name / "summary.json").write_text("{}")
    (tmp_path / partial.name / "checkpoints").mkdir(parents=True)
    (tmp_path / partial.name / "stale.txt").write_text("from the interrupted run")
    assert [sweep.run_state(tmp_path, r) for r in runs] == ["done", "partial", "new"]

    started = []

    def fake_start(results_dir, spec, engine="lean", claim_handle=None):
        sweep.clear_partial(results_dir, spec)
        started.append(spec.name)
        run_dir = results_dir / spec.name
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
        (run_dir / "summary.json").write_text("{}")
        return _Done(), _Log()

    monkeypatch.setattr(sweep, "start_run", fake_start)
    counts = sweep.sweep(runs, tmp_path)
    assert started == [partial.name, new.name]
    assert counts == {"done": 2, "failed": 0, "skipped": 1, "stopped": 0}
    assert not (tmp_path / partial.name / "stale.txt").exists()
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 2
    started.clear()
    assert sweep.sweep(runs, tmp_path)["skipped"] == 3 and started == []


def test_a_second_sweep_never_starts_a_run_that_another_runs_or_has_finished(tmp_path, monkeypatch):
    """Two sweeps over one results folder (each built its to-do list at its start): a run that
    the other sweep holds is skipped, not cleared and redone; one it finished meanwhile too."""
    runs = sweep.expand({"methods": "fedavg", "datasets": "breastmnist", "seeds": "0,1,2", "rounds": 2})
    held, finished_meanwhile, free = runs
    other_sweep = sweep.claim(tmp_path, held)  # a live sweep is running `held`
    (tmp_path / held.name / "checkpoints").mkdir(parents=True)
    (tmp_path / held.name / "metrics.jsonl").write_text('{"round": 1}\n')
    started = []

    def fake_start(results_dir, spec, engine="lean", claim_handle=None):
        started.append(spec.name)
        for name in (spec.name, finished_meanwhile.name):  # the other sweep finishes its run meanwhile
            (results_dir / name).mkdir(parents=True, exist_ok=True)
            (results_dir / name / "summary.json").write_text("{}")
        return _Done(), _Log()

    monkeypatch.setattr(sweep, "start_run", fake_start)
    queue = [free, held, finished_meanwhile]
    counts = sweep.sweep(queue, tmp_path)
    assert started == [free.name]
    assert counts == {"done": 1, "failed": 0, "skipped": 2, "stopped": 0}
    assert (tmp_path / held.name / "metrics.jsonl").exists()  # the other sweep's run is untouched
    assert sweep.claim(tmp_path, free) is not None  # a finished run's claim is released
    other_sweep.close()
    assert sweep.claim(tmp_path, held) is not None  # and so is one whose sweep ended


def test_a_runs_claim_lives_as_long_as_its_process_even_after_its_sweep(tmp_path):
    """The run's child process inherits the claim: a sweep killed while its run goes on
    leaves the run claimed until the run itself ends."""
    import subprocess
    import sys

    [spec] = sweep.expand({"methods": "fedavg", "datasets": "breastmnist", "seeds": "0", "rounds": 2})
    lock = sweep.claim(tmp_path, spec)
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, pass_fds=(lock.fileno(),)
    )
    lock.close()  # the sweep is gone
    assert sweep.claim(tmp_path, spec) is None
    child.communicate(b"")  # the run ends
    assert sweep.claim(tmp_path, spec) is not None


def test_reference_protocol_variants_and_their_run_configs():
    runs = sweep.expand(
        {
            "methods": "fusedspacefed,fedavg",
            "protocols": "standard,reference",
            "variants": "task-aware,decoupled,no-warmup,warmup,l2sp",
            "datasets": "breastmnist",
            "seeds": "1",
            "rounds": 50,
        }
    )
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted(
        f"{m}-breastmnist-dirichlet-equal-a0.05-n10-r50-e3-s1"
        for m in (
            "fusedspacefed",
            "fusedspacefed-decoupled",
            "fedavg",
            "fusedspacefed-ref-no-warmup",
            "fusedspacefed-ref-warmup",
            "fusedspacefed-ref-l2sp",
            "fedavg-ref",
        )
    )
    l2sp = by_name["fusedspacefed-ref-l2sp-breastmnist-dirichlet-equal-a0.05-n10-r50-e3-s1"].run_config(Path("/r"))
    assert l2sp["protocol"] == "reference" and l2sp["l2sp-lambda"] == 1e-3 and l2sp["warmup-epochs"] == 0
    assert l2sp["task-aware"] is False and l2sp["ae-arch"] == "unet"
    ours = by_name["fusedspacefed-breastmnist-dirichlet-equal-a0.05-n10-r50-e3-s1"].run_config(Path("/r"))
    assert ours["protocol"] == "standard" and ours["task-aware"] is True and "l2sp-lambda" not in ours
    from core.config import RunConfig

    for spec in runs:  # every run config is a valid configuration
        RunConfig.from_mapping({k: v for k, v in spec.run_config(Path("/r")).items()})
    with pytest.raises(SystemExit, match="unknown protocols"):
        sweep.expand({"protocols": "published"})


def test_an_interrupted_run_with_a_checkpoint_resumes_and_one_without_is_redone(tmp_path, monkeypatch):
    spec = sweep.expand({"methods": "fedavg", "datasets": "breastmnist", "seeds": "0", "rounds": 2})[0]
    started = []

    class _Popen:
        def __init__(self, cmd, **kwargs):
            started.append(json.loads(cmd[-1]))

    monkeypatch.setattr(sweep.subprocess, "Popen", _Popen)
    (tmp_path / spec.name / "checkpoints").mkdir(parents=True)
    (tmp_path / spec.name / "checkpoints" / "round-0001.pt").write_bytes(b"x")
    sweep.start_run(tmp_path, spec, "lean")
    assert started[-1]["run_config"]["resume-from"] == "latest" and started[-1]["engine"] == "lean"
    assert (tmp_path / spec.name / "checkpoints" / "round-0001.pt").exists()
    (tmp_path / spec.name / "checkpoints" / "round-0001.pt").unlink()
    sweep.start_run(tmp_path, spec, "flower")
    assert "resume-from" not in started[-1]["run_config"] and started[-1]["engine"] == "flower"


def test_mean_std_and_paired_difference():
    mean, std, n = report.mean_std([80.0, 82.0, None, float("nan"), 84.0])
    assert (mean, n) == (82.0, 3) and math.isclose(std, 2.0)
    assert report.mean_std([1.5]) == (1.5, None, 1)
    assert report.mean_std([]) == (None, None, 0)
    diff = report.paired_difference({0: 60.0, 1: 50.0, 2: 70.0}, {0: 55.0, 1: 52.0})
    assert diff[0] == pytest.approx(1.5) and diff[2] == 2  # seeds 0 and 1 only: +5 and -2
    assert diff[1] == pytest.approx(math.sqrt(24.5))
    assert report.signed(-2.0, None) == "-2.00"
    assert report.fmt(81.234, 1.0) == "81.23 ± 1.00"


def _write_run(root: Path, method: str, seed: int, accs: list[float], task_aware: bool = True) -> None:
    name = f"{method}{'' if task_aware else '-dec'}-s{seed}"
    run = root / name
    run.mkdir(parents=True)
    config = {
        "method": method,
        "task-aware": task_aware,
        "dataset": "breastmnist",
        "partition": "dirichlet-equal",
        "alpha": 0.05,
        "classes-per-client": 2,
        "num-server-rounds": len(accs),
        "local-epochs": 3,
        "seed": seed,
    }
    rows = [
        {"round": i + 1, "global_acc_mean": a, "val_acc_mean": a if i == 0 else a / 2, "gamma": 1.0, "num_replies": 10}
        for i, a in enumerate(accs)
    ]
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from server_app.results import summarise

    (run / "summary.json").write_text(json.dumps(summarise(rows)))


def test_report_tables_from_runs(tmp_path):
    for seed, (f, a) in enumerate([(0.80, 0.78), (0.84, 0.78)]):
        _write_run(tmp_path, "fusedspacefed", seed, [0.7, f])
        _write_run(tmp_path, "fedavg", seed, [0.75, a])
    _write_run(tmp_path, "fusedspacefed", 0, [0.6, 0.76], task_aware=False)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    runs, unfinished = report.load_runs(tmp_path)
    assert len(runs) == 5 and unfinished == ["unfinished"]
    out = tmp_path / "RESULTS.md"
    text = report.render(runs, unfinished, [], out, "")
    headline = next(line for line in text.splitlines() if line.startswith("| breastmnist"))
    cells = [c.strip() for c in headline.strip("|").split("|")]
    assert cells[4] == "82.00 ± 2.83"  # FusedSpaceFed final over seeds 0, 1
    assert cells[5] == "78.00 ± 0.00"
    assert cells[6] == "**+4.00 ± 2.83**"  # paired by seed: +2 and +6
    assert cells[7] == "70.00 ± 0.00" and cells[9] == "**-5.00 ± 0.00**"  # best-val picks round 1
    assert cells[10] == "-2.00"  # decoupled (seed 0 only) - FedAvg
    assert cells[11:14] == ["81.61", "80.25", "+1.36"]
    assert cells[14:] == ["—", "—", "—", "—"]  # runs without the health metrics
    assert "FusedSpaceFed (decoupled)" in text
    assert "Centralised reference" not in text
    pooled = {
        "breastmnist": {
            "train_samples": 546,
            "majority_share": 0.7308,
            "seconds": 12.0,
            "points": [{"epoch": 10, "steps": 30, "acc": 0.75}, {"epoch": 20, "steps": 60, "acc": 0.8269}],
            "config": {"lr": 0.05, "lr_schedule": "cosine", "batch_size": 32, "epochs": 20},
        }
    }
    text = report.render(runs, unfinished, [], out, "", pooled)
    assert (
        "| breastmnist | lr 0.05 cosine, batch 32, batch norm, 20 epochs | 546 | 73.08 | 10 (30): 75.0, 20 (60): 82.7 "
        "| 82.69 (epoch 20) | 12 |"
    ) in text


def _write_recipe_run(root: Path, method: str, seed: int, rows: list[dict], norm: str | None = "batch-recal") -> None:
    """A run folder as a sweep of the recipe leaves it: config.json (with `norm` unless None),
    metrics.jsonl (one row per round, evaluation metrics in evaluated rounds only), summary.json."""
    run = root / f"{method}-recipe-{norm}-s{seed}"
    run.mkdir(parents=True)
    config = {
        "method": method,
        "task-aware": True,
        "dataset": "breastmnist",
        "partition": "dirichlet-equal",
        "alpha": 0.05,
        "classes-per-client": 2,
        "num-server-rounds": len(rows),
        "local-epochs": 1,
        "seed": seed,
    }
    if norm is not None:
        config["norm"] = norm
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from server_app.results import summarise

    (run / "summary.json").write_text(json.dumps(summarise(rows)))


def test_report_renders_the_health_columns_and_keeps_recipes_apart(tmp_path):
    def rows(method: str, seed: int) -> list[dict]:
        train = {"num_replies": 5}
        if method == "fusedspacefed":  # every trained round
            train = {**train, "rec_r2": 0.5, "rec_dependence": 0.1 * seed, "rec_r2_worst": -0.1 * seed}
        evaluated = {"global_acc_mean": 0.7, "val_acc_mean": 0.7}
        bn = {"bn_acc_running": 0.6, "bn_acc_recal": 0.6 + 0.01 * seed, "bn_gap": 0.01 * seed}
        return [
            {"round": 1, **train, **evaluated, **bn},  # evaluated: the last row with bn_gap
            {"round": 2, **train},  # trained, not evaluated
            {"round": 3, **train, "rec_r2_worst": None},  # the key present but empty: look further back
        ]

    for seed in (1, 2):
        for method in ("fusedspacefed", "fedavg"):
            _write_recipe_run(tmp_path, method, seed, rows(method, seed))
    for seed in (1, 2):  # the old recipe, no norm key and no health metrics: a cell of its own
        for method in ("fusedspacefed", "fedavg"):
            _write_recipe_run(tmp_path, method, seed, [{"round": i, "global_acc_mean": 0.5} for i in (1, 2, 3)], None)
    runs, _ = report.load_runs(tmp_path)
    assert len(runs) == 8
    groups = report.cells(runs)
    assert len(groups) == 2 and {g[-1] for g in groups} == {"batch", "batch-recal"}
    fsf1 = next(r for r in runs if r.name == "fusedspacefed-recipe-batch-recal-s1")
    assert fsf1.last("bn_gap") == 0.01 and fsf1.last("rec_r2_worst") == -0.1 and fsf1.last("missing") is None

    text = report.render(runs, [], [], tmp_path / "RESULTS.md", "")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| dataset |"))
    assert header.rstrip(" |").endswith(
        "R² worst site (FusedSpaceFed) | dependence (FusedSpaceFed) | BN gap (pts) FusedSpaceFed | BN gap (pts) FedAvg"
    )
    headline = [line for line in lines if line.startswith("| breastmnist |")]
    new = next(line for line in headline if "norm batch-recal" in line)
    old = next(line for line in headline if "norm" not in line)
    # rec_r2_worst of rounds 2 (-0.1, -0.2): round 3's is None; dependence of round 3 (0.1, 0.2);
    # bn_gap of round 1, the evaluated one, in points and signed (+1, +2)
    assert [c.strip() for c in new.strip("|").split("|")][14:] == [
        "-0.150 ± 0.071",
        "0.150 ± 0.071",
        "+1.50 ± 0.71",
        "+1.50 ± 0.71",
    ]
    assert [c.strip() for c in old.strip("|").split("|")][14:] == ["—", "—", "—", "—"]

    # the old recipe's title is what it always was; the new one names its norm
    assert "### breastmnist, dirichlet-equal (alpha=0.05), 3 rounds x 1 local epochs" in lines
    assert "### breastmnist, dirichlet-equal (alpha=0.05), 3 rounds x 1 local epochs, norm batch-recal" in lines
    assert "| R² worst site | dependence | BN gap (pts) |" in text
    fsf = [line for line in lines if line.startswith("| FusedSpaceFed (task-aware) | 2 (1,2)")]
    avg = [line for line in lines if line.startswith("| FedAvg | 2 (1,2)")]
    health = sorted(tuple(c.strip() for c in line.strip("|").split("|")[-3:]) for line in fsf + avg)
    assert health == [
        ("-0.150 ± 0.071", "0.150 ± 0.071", "+1.50 ± 0.71"),  # FusedSpaceFed, new recipe
        ("—", "—", "+1.50 ± 0.71"),  # FedAvg, new recipe: no autoencoder
        ("—", "—", "—"),
        ("—", "—", "—"),
    ]
    assert '- `norm`: "batch-recal", —' in text  # the protocol list: old runs lack the key


def test_the_evidence_grid_expands_in_its_priority_order(tmp_path):
    args = sweep.build_parser().parse_args(["--grid", str(Path(sweep.ROOT) / "benchmarks" / "evidence-grid.toml")])
    runs = sweep.all_runs(sweep.load_plans(args))
    # FusedSpaceFed and FedAvg on 4 datasets x 2 alphas x 3 seeds; FedBN, FedProx, SCAFFOLD on breast and
    # retina; both under the reference protocol on breast and retina; both with averaged BatchNorm and
    # GroupNorm on pneumonia and blood; pathological-2 retina and blood for FusedSpaceFed and FedAvg
    # and the demo's federation over 10 rounds, every round evaluated
    assert len(runs) == 4 * 2 * 3 * 2 + 2 + 2 * 2 * 3 * 3 + 2 * 2 * 3 * 2 + 2 * 2 * 2 * 3 * 2 + 2 * 3 * 2
    assert len({r.name for r in runs}) == len(runs)
    steady = [r for r in runs if r.rounds == 10 and r.dataset == "bloodmnist"]
    assert [(r.method, r.alpha, r.seed, r.eval_every) for r in steady] == [
        ("fusedspacefed", 0.5, 1, 1),
        ("fedavg", 0.5, 1, 1),
    ]
    assert all(
        (r.sites, r.local_epochs, r.warmup_epochs, r.batch_size, r.eval_every)
        == (5, 1, 2, 32, 1 if r in steady else r.rounds)
        for r in runs
    )
    reference = [r for r in runs if r.protocol == "reference"]
    assert {r.variant for r in reference if r.method == "fusedspacefed"} == {"no-warmup"}
    assert {r.variant for r in runs if r.protocol == "standard" and r.method == "fusedspacefed"} == {"task-aware"}
    norms = {(r.dataset, dict(r.extra).get("norm")) for r in runs}
    assert {n for d, n in norms if d in ("pneumoniamnist", "bloodmnist")} == {None, "batch", "group"}
    assert {n for d, n in norms if d in ("breastmnist", "retinamnist")} == {None}
    assert "fedavg-group-pneumoniamnist-" in next(
        r.name for r in runs if dict(r.extra).get("norm") == "group" and r.method == "fedavg"
    )
    assert {(r.dataset, r.rounds) for r in runs if r not in steady} == {
        ("breastmnist", 10),
        ("retinamnist", 8),
        ("pneumoniamnist", 4),
        ("bloodmnist", 3),
    }
    # FusedSpaceFed and FedAvg on all four datasets, 3 seeds, before any other run
    first = runs[: 4 * 2 * 3 * 2]
    assert {r.method for r in first} == {"fusedspacefed", "fedavg"} and {r.partition for r in first} == {
        "dirichlet-equal"
    }
    assert [r.dataset for r in first][::12] == ["breastmnist", "retinamnist", "pneumoniamnist", "bloodmnist"]
    assert {r.seed for r in first} == {1, 2, 3} and {r.alpha for r in first} == {0.5, 0.05}
    assert {(r.dataset, r.classes_per_client) for r in runs if r.partition == "pathological"} == {
        ("retinamnist", 2),
        ("bloodmnist", 2),
    }

    # a finished run of another recipe under the same name is named, not silently taken
    spec = runs[0]
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / "config.json").write_text(
        json.dumps({**spec.run_config(tmp_path), "batch-size": 64, "results-dir": "/elsewhere", "device": "cuda"})
    )
    assert sweep.config_differences(tmp_path, spec) == {"batch-size": (64, 32)}
    assert sweep.config_differences(tmp_path, runs[1]) == {}


def test_performance_report_keeps_one_overhead_measurement_per_dataset():
    from benchmarks import performance

    def measurement(dataset: str, flower: float, plain: float) -> dict:
        config = {**performance.overhead_config(_PerfArgs(dataset)), "alpha": 0.05}
        timings = {"round_seconds": [9.0, 8.0, 8.0], "wall_s": 30.0}
        return {
            "config": config,
            "sites": 10,
            "cores": 2,
            "flower": timings,
            "plain": timings,
            "flower_s_per_round": flower,
            "plain_s_per_round": plain,
            "ratio": flower / plain,
            "flower_cpu_s_per_round": flower,
            "plain_cpu_s_per_round": plain,
            "cpu_ratio": flower / plain,
            "train_samples": 100,
            "load_average_before": (1.0, 1.0, 1.0),
            "load_average_after": (1.0, 1.0, 1.0),
        }

    machine = {
        "cpu": "x",
        "logical_cores": 2,
        "ram_gib": 1,
        "python": "3",
        "torch": "t",
        "flwr": "f",
        "ray": "r",
        "cuda": False,
        "gpu": None,
        "load_average": (1.0, 1.0, 1.0),
    }
    new = {
        "machine": machine,
        "overheads": {
            "retinamnist": measurement("retinamnist", 15.6, 13.3),
            "pneumoniamnist": measurement("pneumoniamnist", 42.0, 40.0),
        },
    }
    text = performance.render(new)
    assert "| retinamnist | 100 | 15.60 | 13.30 | **1.17** |" in text
    assert "| pneumoniamnist | 100 | 42.00 | 40.00 | **1.05** |" in text
    assert text.count("### retinamnist") == 1 and text.count("### pneumoniamnist") == 1


class _PerfArgs:
    def __init__(self, dataset: str) -> None:
        self.dataset, self.method, self.rounds, self.data_root = dataset, "fedavg", 4, "/data"


def test_the_committed_grid_covers_the_tables_results_md_promises():
    args = sweep.build_parser().parse_args(["--grid", str(Path(sweep.ROOT) / "benchmarks" / "grid.toml")])
    runs = sweep.all_runs(sweep.load_plans(args))
    cells = {(r.dataset, r.partition, r.name.split("-" + r.dataset)[0]) for r in runs}
    methods = {"fusedspacefed", "fusedspacefed-decoupled", "fedavg", "fedprox", "scaffold", "fedbn"}
    for dataset in ("bloodmnist", "pneumoniamnist", "retinamnist", "breastmnist"):
        assert {m for d, p, m in cells if d == dataset and p == "dirichlet-equal"} == methods, dataset
    for dataset in ("bloodmnist", "retinamnist"):
        assert {m for d, p, m in cells if d == dataset and p == "pathological"} == methods, dataset
    assert all(r.alpha > 0 and r.rounds >= 1 for r in runs)


def test_the_side_by_side_table_lists_every_method_of_a_recipe_cell_with_its_upload(tmp_path):
    """Three methods of one recipe cell: one row each with global and local accuracy, and the
    upload per site: the rounds' upload_bytes where recorded, else the contract's shared
    arrays times the rounds (FedAvg: the whole ResNet-20, LG-FedAvg: its linear head only)."""
    final = {"global_acc_mean": 0.7, "local_acc_mean": 0.9, "val_acc_mean": 0.7}
    for method in ("fedavg", "lg-fedavg"):
        _write_recipe_run(tmp_path, method, 1, [{"round": 1, "num_replies": 5}, {"round": 2, **final}])
    rows = [{"round": 1, "upload_bytes": 2e6}, {"round": 2, "upload_bytes": 3e6, **final}]
    _write_recipe_run(tmp_path, "fusefl", 1, rows, norm="batch")  # FuseFL's default: its calibrated model
    _write_recipe_run(tmp_path, "fusefl", 1, rows)  # the recipe's recomputed statistics, an option for FuseFL
    runs, _ = report.load_runs(tmp_path)
    lines = report.side_by_side(report.cells(runs))
    by_method = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert set(by_method) >= {
        "FedAvg",
        "LG-FedAvg",
        "FuseFL",
        "FuseFL (batch-recal: statistics recomputed at each site)",
    }
    assert "70.00" in by_method["FuseFL"] and "90.00" in by_method["FuseFL"]
    assert by_method["FuseFL"].rstrip(" |").endswith("5.00 MB (2 r)")
    avg_mb = float(by_method["FedAvg"].split("|")[-2].split()[0])
    lg_mb = float(by_method["LG-FedAvg"].split("|")[-2].split()[0])
    assert 2.0 < avg_mb < 2.5 and lg_mb < 0.01  # 2 rounds of ~1.09 MB; 2 rounds of a 64 x 2 head


def test_a_plan_that_sets_a_fraug_distance_or_a_norm_names_its_runs():
    """Runs of another FRAug distance or normalisation never take a default run's name (the
    sweep would skip them as done)."""
    plan = {
        "methods": "fraug",
        "datasets": "pneumoniamnist",
        "alphas": "0.5",
        "seeds": "1",
        "rounds": 4,
        "sites": 5,
        "local-epochs": 1,
    }
    plain = sweep.expand(plan)[0].name
    mmd = sweep.expand({**plan, "set": {"fraug-distance-g": "mmd", "fraug-distance-ft": "mmd"}})[0].name
    recal = sweep.expand({**plan, "methods": "fusefl", "set": {"norm": "batch-recal"}})[0].name
    assert plain == "fraug-pneumoniamnist-dirichlet-equal-a0.5-n5-r4-e1-s1"
    assert mmd == "fraug-gmmd-ftmmd-pneumoniamnist-dirichlet-equal-a0.5-n5-r4-e1-s1"
    assert recal == "fusefl-batch-recal-pneumoniamnist-dirichlet-equal-a0.5-n5-r4-e1-s1"


def _pilot_row(sites: int, secure: bool, seconds: float, upload: float, **extra) -> dict:
    return {
        "sites": sites,
        "secure": secure,
        "engine": "pilot",
        "rounds": 2,
        "round_seconds": [seconds, seconds],
        "seconds_per_round": seconds,
        "upload_bytes_per_site": upload,
        "num_replies": [sites, sites],
        "failed_sites": 0,
        "final_acc": 0.3,
        "load_before": [1.0, 1.5, 2.0],
        "load_after": [2.0, 1.7, 2.0],
        "seconds_to_all_online": 20.0,
        "memory_reserve_gb": 4.0,
        "machine": "x86_64, 2 CPUs (shared)",
        "date": "2026-12-07 03:00 UTC",
        **extra,
    }


def test_the_secagg_pilot_engine_plans_both_aggregations_per_size_and_starts_nothing_on_a_dry_run(
    tmp_path, monkeypatch, capsys
):
    from benchmarks import pilot_scale, secagg_cost

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run started a pilot")

    monkeypatch.setattr(secagg_cost, "run_pilot", refuse)
    monkeypatch.setattr(pilot_scale, "bring_up", refuse)
    assert secagg_cost.plan("3,10") == [(3, False), (3, True), (10, False), (10, True)]
    out = ["--json", str(tmp_path / "c.json"), "--md", str(tmp_path / "c.md")]
    assert secagg_cost.main(["--engine", "pilot", "--dry-run", *out]) == 0
    printed = capsys.readouterr().out
    assert "pilot: 10 sites, SecAgg+, 2 rounds" in printed and "below 4.0 GB available" in printed
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(SystemExit) as refused:  # secure aggregation refuses two sites
        secagg_cost.main(["--engine", "pilot", "--sites", "3,2", "--dry-run", *out])
    assert refused.value.code == 2


def test_a_secagg_pilot_report_keeps_the_simulation_rows_and_replaces_only_its_own(tmp_path):
    from benchmarks import secagg_cost

    committed = json.loads(secagg_cost.OUT_JSON.read_text())["runs"]
    simulated = [
        {k: v for k, v in r.items() if k not in ("date", "machine")} for r in committed if r["engine"] != "pilot"
    ]
    assert simulated, "the committed report has simulation rows"
    # the first version's layout: one engine, its date and machine at the top
    first = {"engine": "ray", "machine": "x86_64, 2 CPUs (shared)", "date": "2026-12-06 20:52 UTC", "runs": simulated}
    (tmp_path / "c.json").write_text(json.dumps(first))
    pilot = [_pilot_row(3, False, 40.0, 1_000_000), _pilot_row(3, True, 60.0, 1_002_000)]
    paths = (tmp_path / "c.json", tmp_path / "c.md")
    secagg_cost.write_report(pilot, *paths)
    again = [_pilot_row(3, False, 50.0, 1_000_000), _pilot_row(10, True, 90.0, 1_009_000, error="MemoryError: low")]
    result = secagg_cost.write_report(again, *paths)
    assert result == json.loads(paths[0].read_text())
    runs = result["runs"]
    for row in simulated:  # every simulation row, its figures unchanged
        (kept,) = [
            r for r in runs if (r["engine"], r["sites"], r["secure"]) == (row["engine"], row["sites"], row["secure"])
        ]
        assert {k: kept[k] for k in row} == row
        assert (kept["date"], kept["machine"]) == (first["date"], first["machine"])
    mine = sorted((r["sites"], r["secure"], r["seconds_per_round"]) for r in runs if r["engine"] == "pilot")
    assert mine == [(3, False, 50.0), (3, True, 60.0), (10, True, 90.0)]  # the second call replaced 3-plain only
    md = paths[1].read_text()
    assert "## Flower's Ray simulation (`--engine ray`)" in md and "## the pilot on loopback (`--engine pilot`)" in md
    assert md.index("--engine ray") < md.index("--engine pilot")
    pilot_rows = [line for line in md.split("## the pilot on loopback")[1].splitlines() if line.startswith("| 3 |")]
    assert pilot_rows[1].startswith("| 3 | SecAgg+ | 60.00 | 1,002,000 | 1.20 | 1.002 | [3, 3] | 0 | 60.0, 60.0 |")
    assert "| 10 | SecAgg+ | 90.00 | 1,009,000 | - | - |" in md  # no plain row at 10 sites to compare with
    assert "- 10 sites, SecAgg+: MemoryError: low" in md and "below 4.0 GB of available memory" in md


def test_a_secagg_pilot_that_runs_out_of_memory_leaves_a_row_with_the_error_and_no_figures(tmp_path, monkeypatch):
    from benchmarks import pilot_scale, secagg_cost

    def low_memory(pilot, n, dataset, data_root, worker=True, into=None):
        assert (n, dataset, worker) == (3, "bloodmnist", True) and (data_root / "bloodmnist.npz").exists()
        into["started_before_memory_ran_low"] = 2
        raise MemoryError("2 SuperNodes started, 3.1 GB of memory left (reserve 4.0 GB): not starting more")

    monkeypatch.setattr(pilot_scale, "bring_up", low_memory)
    row = secagg_cost.run_pilot(tmp_path, 3, True)
    assert row["error"].startswith("MemoryError: 2 SuperNodes started") and row["started_before_memory_ran_low"] == 2
    assert (row["engine"], row["sites"], row["secure"], row["rounds"]) == ("pilot", 3, True, 0)
    assert row["seconds_per_round"] is None and row["upload_bytes_per_site"] is None
    assert len(row["load_before"]) == 3 and row["memory_reserve_gb"] == pilot_scale.MEMORY_RESERVE_GB
    md = secagg_cost.markdown({"runs": [{**row, "machine": "m", "date": "d"}]})
    assert "| 3 | SecAgg+ | - | - | - | - | [] | 0 | - | - |" in md
