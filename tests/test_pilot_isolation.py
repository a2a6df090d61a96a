"""The hospital's guard on loopback: the ClientApp (code that arrives with every run) runs as
its own unix user, which cannot read the site's data, private state or key; it can only
hand messages to the site worker, which runs the site's installed code and is the only
reader of the data (pilot/start-supernode.sh --isolate-app-user) and runs as the site's own
unix user (--site-user), neither root nor the app user.

Needs root, to create throwaway system users and switch to them (CI runs as root).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from client_app.state import FILE_NAME, read_state_file
from partitions.split import split_dataset
from tests.pilot_harness import REPO, SMALL_RUN, Pilot

pytestmark = pytest.mark.integration

if os.geteuid() != 0:
    pytest.skip("creating a throwaway app user and running as it needs root (CI runs as root)", allow_module_level=True)
if not (shutil.which("useradd") and shutil.which("setpriv")):
    pytest.skip("useradd or setpriv is missing (apt-get install passwd util-linux)", allow_module_level=True)

SITE = "hospital-a"


def _throwaway_user(kind: str):
    name = f"fsf-{kind}-{os.getpid()}"
    cmd = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture(scope="module")
def app_user():
    yield from _throwaway_user("app")


@pytest.fixture(scope="module")
def site_user():
    """The site worker's user: it reads the data and the state; the app user reads neither."""
    yield from _throwaway_user("site")


@pytest.fixture(scope="module")
def runnable_python():
    """Let other users search the folders above this checkout's Python while the tests run.

    A deployment installs the project where the app user can run it (docs/pilot.md); a
    test machine may have its interpreter below a folder only root can search (pyenv in
    /root, mode 0700). Only search (o+x) is added, to those folders, and taken back after."""
    changed = []
    for path in (Path(os.path.realpath(sys.executable)), REPO / "client_app"):
        for folder in reversed(path.parents):
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH and folder not in [f for f, _ in changed]:
                folder.chmod(mode | stat.S_IXOTH)
                changed.append((folder, mode))
    try:
        yield changed
    finally:
        for folder, mode in changed:
            folder.chmod(mode)


def as_user(user: pwd.struct_passwd, code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Python code run as `user` (exec'd by `env`, as its processes are, with its own permissions)."""
    cmd = ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--init-groups", "--", "env", "-i"]
    cmd += [f"PATH={os.environ['PATH']}", f"PYTHONPATH={REPO}", "HOME=/nonexistent"]
    return subprocess.run(
        [*cmd, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def isolated(app_user, site_user, runnable_python, real_data_root):
    if runnable_python:
        print(f"\nsearch permission for others added to {[str(f) for f, _ in runnable_python]} during these tests")
    probe = as_user(app_user, "import flwr, client_app.app")
    if probe.returncode != 0:
        pytest.skip(f"the app user cannot run this checkout's Python ({sys.executable}): {probe.stderr[-300:]}")
    # a folder the app user may traverse (pytest's own are 0700), so only the files' modes protect them
    root = Path(tempfile.mkdtemp(prefix="fsf-iso-", dir="/tmp"))
    root.chmod(0o755)
    pilot = Pilot(root)
    pilot.site_files = split_dataset(
        "breastmnist", real_data_root, root / "site-files", num_sites=2, partition="iid", show=False
    )
    pilot.app_dir = Path(f"{pilot.state_dir(SITE)}.app")
    isolate = ("--isolate-app-user", app_user.pw_name, "--site-user", site_user.pw_name)
    os.chown(pilot.site_files[0], site_user.pw_uid, site_user.pw_gid)  # the site user's data
    try:
        pilot.make_material([SITE])
        pilot.start_superlink()
        pilot.register(SITE)
        pilot.site_files[0].chmod(0o644)  # readable by everyone: the start script must refuse
        readable = pilot.start_supernode(SITE, pilot.site_files[0], extra=isolate)
        pilot.refused_log = readable.text() if pilot.exits(readable) == 2 else f"exit {readable.popen.returncode}"
        pilot.site_files[0].chmod(0o600)
        pilot.supernodes[SITE] = pilot.start_supernode(SITE, pilot.site_files[0], extra=isolate)
        pilot.wait_online({pilot.node_ids[SITE]}, 180, "the isolated SuperNode online")
        yield pilot
    finally:
        pilot.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_a_site_whose_data_the_app_user_can_read_is_refused_before_the_start(isolated, app_user):
    assert f"{app_user.pw_name} can read the site's data, state or key" in isolated.refused_log, isolated.refused_log
    assert str(isolated.site_files[0]) in isolated.refused_log


def test_the_app_user_cannot_read_the_data_state_or_key_and_reaches_only_the_worker(isolated, app_user):
    state = isolated.state_dir(SITE)
    probe = as_user(
        app_user,
        f"""
        import json, os, socket
        out = {{}}
        for name, open_it in [
            ("data", lambda: open({str(isolated.site_files[0])!r}, "rb").read(1)),
            ("state folder", lambda: os.listdir({str(state)!r})),
            ("worker log", lambda: open({str(state / "worker.log")!r}).read(1)),
            ("site key", lambda: open({str(isolated.keys / f"{SITE}.key")!r}).read(1)),
        ]:
            try:
                open_it()
                out[name] = "read"
            except OSError as exc:
                out[name] = type(exc).__name__
        with socket.socket(socket.AF_UNIX) as s:
            s.connect({str(isolated.app_dir / "worker.sock")!r})
            out["worker socket"] = "connected"
        print(json.dumps(out))
        """,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {
        "data": "PermissionError",
        "state folder": "PermissionError",
        "worker log": "PermissionError",
        "site key": "PermissionError",
        "worker socket": "connected",
    }


def test_the_site_worker_runs_as_the_site_user_neither_root_nor_the_app_user(isolated, app_user, site_user):
    """Security review, finding 6: under --isolate-app-user the worker, which the untrusted
    app drives, ran as root."""
    socket_path = str(isolated.app_dir / "worker.sock")
    workers = [
        proc.info["uids"].real
        for proc in psutil.process_iter(["cmdline", "uids"])
        if "client_app.worker" in (proc.info["cmdline"] or []) and socket_path in (proc.info["cmdline"] or [])
    ]
    assert workers and set(workers) == {site_user.pw_uid}, workers
    assert site_user.pw_uid not in (0, app_user.pw_uid)
    assert os.stat(isolated.state_dir(SITE)).st_uid == site_user.pw_uid


def test_a_run_trains_with_every_clientapp_running_as_the_app_user(isolated, app_user):
    seen: dict[int, int] = {}  # ClientApp pid -> uid
    done = threading.Event()

    site_script = psutil.Process(isolated.supernodes[SITE].pid)

    def watch() -> None:  # this SuperNode's ClientApps only (other tests may run theirs beside)
        while not done.is_set():
            for proc in site_script.children(recursive=True):
                try:
                    if any("flwr-clientapp" in part for part in proc.cmdline()[:2]):
                        seen[proc.pid] = proc.uids().real
                except psutil.Error:  # ended meanwhile
                    continue
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        config = {"run-name": "isolated", "num-server-rounds": 1, "results-dir": str(isolated.results)}
        run_id = isolated.submit({**SMALL_RUN, **config})
        status = isolated.wait_for_run(run_id, 900)
    finally:
        done.set()
        watcher.join()
    assert status == "finished:completed", isolated.logs(run_id)[-4000:]
    rows = [json.loads(line) for line in (isolated.results / "isolated" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num_replies"], r["failed_sites"]) for r in rows] == [(1, 1, [])]
    assert read_state_file(isolated.state_dir(SITE) / "isolated" / SITE / FILE_NAME)[1] == 1
    assert seen and set(seen.values()) == {app_user.pw_uid}, seen  # train and evaluate: as the app user
    assert "served a message" in (isolated.state_dir(SITE) / "worker.log").read_text()
    print(
        f"\nisolated run: round 1 took {rows[0]['round_seconds']:.1f} s; {len(seen)} ClientApp processes seen, "
        f"all as uid {app_user.pw_uid}"
    )


@pytest.mark.parametrize("required", [True, False])
def test_without_its_worker_the_isolated_clientapp_fails_fast_and_reads_nothing(isolated, app_user, required):
    """The thin app with no worker to talk to: told that it is isolated, it says so; even
    if it tries the site code in-process (an app that ignores the flag), the OS refuses."""
    node_config = {
        "data-path": str(isolated.site_files[0]),
        "state-dir": str(isolated.state_dir(SITE)),
        "site-name": SITE,
        "site-worker": str(isolated.app_dir / "no-worker.sock"),
        **({"site-worker-required": True} if required else {}),
    }
    probe = as_user(
        app_user,
        f"""
        from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
        from client_app.app import handle
        from core.config import RunConfig
        from core.settings import SETTINGS_RECORD, SettingsHandOver
        # a run's first message: its settings and their digest (core/settings.py)
        handover = SettingsHandOver(RunConfig(dataset="breastmnist", download=False).to_mapping())
        content = RecordDict({{"config": ConfigRecord({{**handover.config(), "server-round": 1}}),
                               "arrays": ArrayRecord(), SETTINGS_RECORD: handover.record}})
        handle("train", content, Context(run_id=1, node_id=0, node_config={node_config!r}, state=RecordDict(),
                                         run_config={{}}))
        """,
    )
    assert probe.returncode != 0
    last = probe.stderr.strip().splitlines()[-1]
    if required:
        assert last.startswith("client_app.worker.WorkerUnavailable: no site worker at"), last
        assert "only the site worker can serve the message" in last
    else:
        assert last.startswith("PermissionError"), last
