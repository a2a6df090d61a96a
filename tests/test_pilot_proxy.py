"""The coordinator's guard on loopback: nginx (pilot/start-proxy.sh) terminates TLS in front
of a SuperLink bound to its own loopback port, passes the Fleet API from anyone and the
Control API only from the operator's address.

Two addresses stand for two machines: the operator's CLI connects from 127.0.0.1 (the
proxy's default operator), a "site" from 127.0.0.2. The flwr CLI and the SuperNode cannot
choose their source address, so the site's connections go through a relay that connects
onward from 127.0.0.2 (tests/pilot_harness.py:SourceRelay): nginx sees exactly what a
machine at that address would send, TLS end to end. On one machine the site could of
course also reach the SuperLink's loopback port directly; across machines it cannot,
which is why start-proxy.sh refuses a SuperLink address that is not loopback.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import ssl
import sys

import pytest

from partitions.split import split_dataset
from tests.pilot_harness import BIN, SMALL_RUN, Pilot, SourceRelay, app_copy, base_env, free_port, wait_for

pytestmark = pytest.mark.integration

if not (shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")):
    if os.environ.get("FSF_REQUIRE_NGINX"):  # .ci/run installs nginx and sets this
        pytest.fail("nginx is not installed but FSF_REQUIRE_NGINX is set", pytrace=False)
    pytest.skip(
        "nginx is not installed (apt-get install nginx-light); .ci/run installs it, so CI runs these tests",
        allow_module_level=True,
    )

SITE = "hospital-a"
SITE_ADDRESS = "127.0.0.2"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, real_data_root):
    root = tmp_path_factory.mktemp("proxy")
    pilot = Pilot(root, superlink_port=free_port())
    pilot.site_files = split_dataset(
        "breastmnist", real_data_root, root / "site-files", num_sites=2, partition="iid", show=False
    )
    relay = SourceRelay(pilot.port, SITE_ADDRESS)
    pilot.site_cli_home = root / "site-cli"
    try:
        pilot.make_material([SITE])  # the operator's CLI: connection "pilot" -> the proxy
        pilot.start_superlink()
        pilot.proxy = pilot.start_proxy()
        pilot.register(SITE)  # through the proxy, from the operator's address
        pilot.run(
            [sys.executable, "-m", "pilot.connection", "pilot", relay.address]
            + ["--root-certificates", str(pilot.certs / "ca.crt"), "--default"],
            env=base_env(pilot.site_cli_home),
        )
        pilot.supernodes[SITE] = pilot.start_supernode(SITE, pilot.site_files[0], superlink=relay.address)
        pilot.wait_online({pilot.node_ids[SITE]}, 180, "the SuperNode online")
        yield pilot
    finally:
        pilot.stop_all()
        relay.close()


def access_log(pilot: Pilot) -> list[tuple[str, str, int]]:
    """(source address, path, status) of every request the proxy saw."""
    rows = re.findall(
        r'^\S+ (\S+) "POST (\S+) HTTP/1.1" (\d+)', (pilot.root / "proxy" / "access.log").read_text(), re.M
    )
    return [(addr, path, int(status)) for addr, path, status in rows]


def site_flwr(pilot: Pilot, *args: str) -> dict:
    """The flwr CLI at the site (through the relay: from 127.0.0.2); its JSON reply."""
    result = pilot.run(
        [str(BIN / "flwr"), *args, "--format", "json"], env=base_env(pilot.site_cli_home), check=False, timeout=180
    )
    out = result.stdout
    return json.loads(out[out.index("{") :]) if "{" in out else {"success": False, "error-message": result.stderr}


def refused(reply: dict) -> bool:
    return reply.get("success") is False and "403 Forbidden" in reply.get("error-message", "")


def test_an_authenticated_supernode_at_a_site_address_trains_through_the_proxy(guarded):
    config = {"run-name": "proxy-main", "num-server-rounds": 1, "results-dir": str(guarded.results)}
    run_id = guarded.submit({**SMALL_RUN, **config})
    assert guarded.wait_for_run(run_id, 900) == "finished:completed", guarded.logs(run_id)[-4000:]
    rows = [json.loads(line) for line in (guarded.results / "proxy-main" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["num_replies"], r["failed_sites"]) for r in rows] == [(1, 1, [])]
    seen = access_log(guarded)
    site_fleet = {path for addr, path, status in seen if addr == SITE_ADDRESS and status == 200}
    assert {"/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-messages"} <= site_fleet
    assert ("127.0.0.1", "/v1/control/start-run", 200) in seen
    print(f"\nthrough the proxy: round 1 took {rows[0]['round_seconds']:.1f} s, {len(seen)} requests")


def test_a_site_address_can_neither_submit_nor_stop_runs(guarded):
    before = guarded.flwr("list", "pilot").get("runs", [])
    assert refused(site_flwr(guarded, "run", str(app_copy()), "pilot", "--run-config", 'dataset="breastmnist"'))
    assert refused(site_flwr(guarded, "list", "pilot"))
    assert refused(site_flwr(guarded, "supernode", "register", str(guarded.keys / f"{SITE}.key.pub"), "pilot"))
    assert guarded.flwr("list", "pilot").get("runs", []) == before  # nothing was submitted

    # a run of the operator's: the site cannot stop it, the operator can
    config = {"run-name": "proxy-long", "num-server-rounds": 50, "results-dir": str(guarded.results)}
    run_id = guarded.submit({**SMALL_RUN, **config})

    def status() -> str:
        return guarded.status(run_id)

    wait_for(lambda: status().startswith("running"), 300, "the long run to start", every=2)
    assert refused(site_flwr(guarded, "stop", str(run_id), "pilot"))
    assert status().startswith("running"), guarded.logs(run_id)[-3000:]
    assert guarded.flwr("stop", str(run_id), "pilot").get("success") is True
    wait_for(lambda: status() == "finished:stopped", 120, "the run stopped", every=2)

    seen = access_log(guarded)
    for path in ("/v1/control/start-run", "/v1/control/stop-run", "/v1/control/register-node"):
        assert (SITE_ADDRESS, path, 403) in seen
        assert not any(addr == SITE_ADDRESS and p == path and status != 403 for addr, p, status in seen)
    assert ("127.0.0.1", "/v1/control/stop-run", 200) in seen


@pytest.mark.parametrize("source", ["127.0.0.1", SITE_ADDRESS])
def test_the_runtime_api_and_other_paths_are_refused_to_everyone(guarded, source):
    context = ssl.create_default_context(cafile=str(guarded.certs / "ca.crt"))
    for path in ("/v1/runtime/get-nodes", "/v1/runtime/acquire-task", "/docs", "/"):
        conn = http.client.HTTPSConnection("127.0.0.1", guarded.port, context=context, source_address=(source, 0))
        conn.request("POST", path, body=b"")
        assert conn.getresponse().status == 403, path
        conn.close()
