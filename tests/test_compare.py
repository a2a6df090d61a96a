"""The default job's comparison: table values and plot from run folders."""

from __future__ import annotations

import json

from server_app.compare import comparison, main


def _run(folder, method, accs, val_best_round):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"method": method, "dataset": "breastmnist", "partition": "iid", "data-root": "/nowhere"})
    )
    rows = [
        {"round": i + 1, "global_acc_mean": a, "global_acc_worst": a - 0.1, "local_acc_mean": a}
        for i, a in enumerate(accs)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = rows[val_best_round - 1]
    (folder / "summary.json").write_text(json.dumps({"best_by_val": {"global_acc_mean": best["global_acc_mean"]}}))
    return folder


def test_comparison_table_and_plot(tmp_path, capsys):
    a = _run(tmp_path / "demo-fusedspacefed", "fusedspacefed", [0.7, 0.8, 0.85], 2)
    b = _run(tmp_path / "demo-fedavg", "fedavg", [0.7, 0.72, 0.71], 3)
    results = comparison([a, b], majority=0.73)
    assert [r["final"] for r in results] == [0.85, 0.71]
    assert [r["best-val"] for r in results] == [0.8, 0.71]
    assert [r["past majority"] for r in results] == [True, False]
    assert results[0]["curve"] == [(1, 0.7), (2, 0.8), (3, 0.85)]
    out = tmp_path / "comparison.png"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "85.00 %" in printed.err + printed.out
    assert main([str(tmp_path / "missing")]) == 2
