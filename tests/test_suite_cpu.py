"""benchmarks/suite_cpu.py counts the CPU of processes a test starts and never waits for (a
detached process, as Ray's daemons and the pilot's are), or says clearly why it cannot."""

from __future__ import annotations

import textwrap

import pytest

from benchmarks import suite_cpu

pytestmark = pytest.mark.slow

BURNER = "import time; end = time.process_time() + 1.5\nwhile time.process_time() < end: pass\nopen(sys.argv[1], 'w')"


def test_a_detached_process_s_cpu_is_the_test_s(tmp_path):
    if not suite_cpu.cgroups_writable():  # not here: the benchmark refuses with the reason
        with pytest.raises(RuntimeError, match="writable cgroup file system .* run as root"):
            suite_cpu.main(["--out", str(tmp_path / "r.md"), "--", str(tmp_path)])
        return
    test_file = tmp_path / "test_burn.py"
    test_file.write_text(
        textwrap.dedent(
            f"""
            import subprocess, sys, time
            from pathlib import Path

            def test_burn(tmp_path):
                done = tmp_path / "done"
                subprocess.Popen([sys.executable, "-c", "import sys\\n" + {BURNER!r}, str(done)], start_new_session=True)
                while not done.exists():
                    time.sleep(0.05)
                time.sleep(0.2)

            def test_idle():
                time.sleep(0.5)
            """
        )
    )
    out = tmp_path / "report.md"
    rc = suite_cpu.main(["--out", str(out), "--", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(test_file)])
    assert rc == 0
    rows = {
        line.split("\t")[0].split("::")[1]: float(line.split("\t")[2])
        for line in out.with_suffix(".tsv").read_text().splitlines()
    }
    assert rows["test_burn"] >= 1.3 and rows["test_idle"] < 0.5, rows
    assert "CPU of every test's process tree" in out.read_text() and "test_burn" in out.read_text()


def test_the_report_says_when_each_worker_ran_out_of_tests():
    rows = [
        ("tests/a.py::one", 5.0, 4.0, "gw0", 5.0),
        ("tests/a.py::two", 9.0, 8.0, "gw0", 20.0),
        ("tests/b.py::three", 2.0, 1.0, "gw1", 12.0),
    ]
    ends = suite_cpu.worker_ends(rows)
    assert ends == {"gw0": (20.0, "tests/a.py::two"), "gw1": (12.0, "tests/b.py::three")}
    text = suite_cpu.report(rows, ["pytest"], 21.0, 0, "0 0 0")
    assert "| gw1 | 12 s | `tests/b.py::three` |" in text and text.index("gw1 |") < text.index("gw0 |")
    assert "| `tests/a.py` | 2 | 12.0 |" in text
