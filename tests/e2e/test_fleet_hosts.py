"""Two endpoint hosts behind a UDP load balancer, one PostgreSQL, devices on a third host
(docs/fleet.md), emulated with network namespaces (tools/fleetnet.py): the fleet simulator in
the devices' namespace posts through nginx's stream module (a consistent hash of each device's
address and port), both hosts serve devices, and every acknowledged record is stored once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import fleetnet  # noqa: E402

DEVICES = 120
PORT = 5683


def _wait_listening(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert "listening on" in line, f"{what}: {line!r}"


@pytest.mark.timeout(300)
def test_two_hosts_behind_nginx_store_every_record_once(tmp_path: Path) -> None:
    why = fleetnet.available()
    assert why is None, f"{why} (the suite runs as root, as CI does)"
    import pgcluster

    from cloud.storage import open_storage

    with fleetnet.Topology() as net:
        hosts = ("h1", "h2")
        cluster = pgcluster.Cluster(
            listen=tuple(net.root_addr(h) for h in hosts), clients=(net.subnet,)
        )
        with cluster:
            creds = tmp_path / "creds.json"
            provision = ["provision", "--storage", cluster.dsn(), "--devices", str(DEVICES)]
            done = subprocess.run(
                [sys.executable, "tools/fleet.py", *provision, "--creds", str(creds)],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
            endpoints = {}
            try:
                for host in hosts:
                    argv = [sys.executable, "-m", "cloud.cli", "serve"]
                    argv += ["--listen", f"{net.addr(host)}:{PORT}", "--data", str(tmp_path / host)]
                    argv += ["--storage", cluster.dsn(host=net.root_addr(host))]
                    endpoints[host] = net.popen(
                        host, argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
                    )
                for host, proc in endpoints.items():
                    _wait_listening(proc, host)
                config = fleetnet.lb_config(
                    tmp_path / "nginx",
                    (net.root_addr("dev"), PORT),
                    [(net.addr(h), PORT) for h in hosts],
                    key="$remote_addr$remote_port",  # the emulated devices share one address
                    timeout_s=3,
                )
                with fleetnet.Nginx(config, tmp_path / "nginx") as lb:
                    argv = [sys.executable, "tools/fleet.py", "run"]
                    argv += ["--target", f"coap://{net.root_addr('dev')}:{PORT}"]
                    argv += ["--devices", str(DEVICES), "--processes", "1", "--interval", "2"]
                    argv += ["--batch", "5", "--duration", "8", "--warmup", "2"]
                    argv += ["--devices-per-socket", "1", "--creds", str(creds), "--json"]
                    run = net.run(
                        "dev",
                        argv,
                        cwd=ROOT,
                        capture_output=True,
                        text=True,
                        timeout=240,
                    )
                    assert run.returncode == 0, run.stderr[-3000:]
                    report = json.loads(run.stdout.strip().splitlines()[-1])
                    time.sleep(4)  # idle sessions end (proxy_timeout 3 s) and are logged
                    sessions = lb.sessions()
            finally:
                for proc in endpoints.values():
                    proc.terminate()
                    proc.wait(30)
            assert report["records_acked"] == report["records_generated"] > 0
            upstreams = {up for _, up in sessions}
            assert {f"{net.addr(h)}:{PORT}" for h in hosts} <= upstreams, sessions[:5]
            storage = open_storage(cluster.dsn())
            try:
                stored = sum(len(storage.seqs(f"fleet-{i:05d}")) for i in range(1, DEVICES + 1))
                assert stored == report["records_acked"]  # once each, none lost
                for proc in endpoints.values():
                    assert proc.returncode == 0
            finally:
                storage.close()
