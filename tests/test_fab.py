"""What `flwr run .` sends: the Flower app bundle (FAB) that the SuperLink stores and every
ServerApp and ClientApp unpacks (in the pilot and the docker federation the app's code
arrives only this way). pyproject.toml's `fab-exclude` keeps the evidence runs, benchmarks,
docs, tests and deployment scripts out; the app must still import from the bundle alone."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile

from tests.conftest import REPO
from tests.pilot_harness import app_copy

#: top-level folders of the repository that are not the app (pyproject.toml, fab-exclude)
NOT_THE_APP = ("evidence", "benchmarks", "docs", "tests", "pilot", "docker", "scripts")

IMPORT_FROM_THE_BUNDLE_ALONE = """
import importlib, pkgutil, sys
from pathlib import Path

class NotInTheBundle:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {not_the_app!r}:
            raise ImportError(f"{{name}} is not in the app bundle")
        return None

sys.meta_path.insert(0, NotInTheBundle())
root = Path.cwd()
names = []
for package in ("server_app", "client_app", "core", "strategies", "models", "partitions"):
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
def where(module):  # a namespace package has no __file__, only its folders
    return Path(module.__file__ or next(iter(module.__path__)))

outside = [n for n in names if not where(sys.modules[n]).resolve().is_relative_to(root)]
assert not outside, f"imported from outside the bundle: {{outside}}"
print(len(names), "modules")
"""


def test_the_bundle_holds_the_app_and_nothing_else_and_the_app_imports_from_it(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert not [n for n in names if n.split("/")[0] in NOT_THE_APP]
    assert {"server_app/app.py", "client_app/app.py", "pyproject.toml"} <= set(names)
    assert len(fab) < 2_000_000, f"{len(fab)} bytes"  # 5.0 MB with the evidence runs in it
    # the pilot tests' `flwr run`s submit from a copy of the repository's own files (to spare
    # Flower's walk of `.venv`): the same bundle, byte for byte
    assert build_fab_from_disk(app_copy()) == fab
    zipfile.ZipFile(io.BytesIO(fab)).extractall(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_FROM_THE_BUNDLE_ALONE.format(not_the_app=set(NOT_THE_APP))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert " modules" in done.stdout
