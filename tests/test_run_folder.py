"""core/run_folder.py is the one reader of a run folder: what server_app/results.py writes
reads back through it, a broken file is an error naming the file (and line), and no other
module of the project spells the folder's file names."""

from __future__ import annotations

import ast
import json

import pytest

from core.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    PARTITION_FILE,
    SUMMARY_FILE,
    RunFolder,
    RunFolderError,
    read_rows,
    run_folders,
)
from server_app.results import RunResults, summarise
from tests.source_files import REPO, project_files


def test_what_the_writer_writes_the_reader_reads_back(tmp_path):
    results = RunResults(tmp_path, "run-a")
    results.write_config({"method": "fedavg", "num-server-rounds": 2})
    rows = [{"round": 1, "global_acc_mean": 0.5}, {"round": 2, "global_acc_mean": 0.75}]
    results.write_rounds(rows)
    run = RunFolder(tmp_path / "run-a")
    assert run.is_run and not run.finished and run.rounds_done() == 2
    results.write_summary({**summarise(rows), "note": "x"})
    assert run.finished
    assert run.config()["method"] == "fedavg"
    assert run.rows() == rows
    assert run.summary()["note"] == "x" and run.summary()["final"]["global_acc_mean"] == 0.75
    assert run.partition() == {}


def test_a_run_without_rounds_has_no_rows_and_listing_skips_other_folders(tmp_path):
    RunResults(tmp_path, "started").write_config({"method": "fedavg"})
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "loose-file.txt").write_text("x")
    assert [r.name for r in run_folders(tmp_path)] == ["started"]
    assert RunFolder(tmp_path / "started").rows() == []
    assert run_folders(tmp_path / "absent") == []


def test_a_broken_metrics_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"round": 1}\n\n{"round": 2, "glob\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl, line 3: not JSON"):
        read_rows(path)
    path.write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(RunFolderError, match="line 2: a list, not a round's row"):
        read_rows(path)


@pytest.mark.parametrize("content", ["", "{not json", "[1]"])
def test_a_missing_or_corrupt_config_or_summary_is_an_error_naming_it(tmp_path, content):
    run = RunFolder(tmp_path)
    with pytest.raises(RunFolderError, match="config.json does not exist: is .* a run folder"):
        run.config()
    run.summary_path.write_text(content)
    with pytest.raises(RunFolderError, match="summary.json"):
        run.summary()


def test_partition_reads_the_sites_counts(tmp_path):
    (tmp_path / PARTITION_FILE).write_text(json.dumps({"counts": [[1, 2], [3, 4]]}))
    assert RunFolder(tmp_path).partition()["counts"] == [[1, 2], [3, 4]]


def test_no_other_module_spells_the_run_folders_file_names():
    """Readers and writers name the files through core/run_folder.py, so there is one place
    that knows the layout (docstrings and comments may still mention them)."""
    names = {CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, PARTITION_FILE}
    found = []
    for path in project_files():
        rel = path.relative_to(REPO)
        if rel.parts[0] == "tests" or rel == REPO.joinpath("core", "run_folder.py").relative_to(REPO):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{rel}:{node.lineno} {node.value}")
    assert not found, found
