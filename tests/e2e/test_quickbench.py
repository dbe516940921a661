"""``edge-agent bench --quick`` from an installed wheel, and ``edge-agent plan`` citing its run.

The wheel and its dependencies come from ``tools/flash bundle`` (pip wheel of this checkout + pip
download of the dependencies, as tests/e2e/test_flash.py builds it; pip's cache makes it quick),
installed into a new venv the way a device's installer does it (``tools/flash_lib/provision.py``
``installer_script``: ``python3 -m venv --without-pip``, then the bundle's own pip, offline). The
installed agent runs from outside the checkout: its models and bundled bench results are the
wheel's (``<venv>/share/edge-agent``). No timing assertions: the plan must cite the figures of
that run, equal to the saved JSON's, as measured on this device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLASH = ROOT / "tools" / "flash"

sys.path.insert(0, str(ROOT / "tools"))
from flash_lib import bundle as bundlemod  # noqa: E402
from flash_lib.provision import installer_script  # noqa: E402

pytestmark = pytest.mark.timeout(600)

PROFILE = """
[workload]
daily_inferences = 86400
latency_requirement_ms = 250
channels_per_record = 8
low_confidence_share = 0.05

[prices]
currency = "EUR"
cloud_per_inference = 0.000002
per_mb = 0.35

[link]
rtt_ms = 120
encoding = "medium"
"""


def run(*argv: str | Path, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<opt>/venv/bin/edge-agent, built from the bundle by the device's installer script."""
    opt = tmp_path_factory.mktemp("opt")
    proc = run(FLASH, "bundle", opt / "bundle", cwd=opt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    script = opt / "install-venv"
    script.write_text(installer_script(bundlemod.load(opt / "bundle")))
    script.chmod(0o755)
    proc = run(script, cwd=opt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    agent = opt / "venv" / "bin" / "edge-agent"
    assert agent.is_file()
    return agent


def test_installed_quick_bench_and_plan_citing_it(installed: Path, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    proc = run(installed, "example-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config.write_text(proc.stdout)
    data = tmp_path / "data"

    proc = run(
        installed,
        "bench",
        "--quick",
        "--json",
        "--config",
        config,
        "--data-dir",
        data,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    saved = Path(doc.pop("saved"))
    assert saved == data / "bench" / "quick.json"
    assert json.loads(saved.read_text()) == doc
    assert Path(doc["dir"]).parent == data and not Path(doc["dir"]).exists()
    assert doc["fs_type"] not in ("", "unknown")
    s = doc["summary"]
    assert "skipped" not in s["inference"] and "skipped" not in s["detect"], s
    # the installed package's own model, not the checkout's
    assert s["inference"]["model"] == "skab-ae"

    profile = tmp_path / "profile.toml"
    profile.write_text(PROFILE)
    proc = run(installed, "plan", "--profile", profile, "--data-dir", data, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(proc.stdout)
    here = f"measured on this device {doc['finished']}: bench --quick"
    inputs = plan["inputs"]
    assert inputs["edge_latency_p99_ms"] == {
        "value": s["detect"]["latency_p99_ms"],
        "source": f"{here} detect.latency_p99_ms",
    }
    assert inputs["edge_invoke_p99_us"] == {
        "value": s["inference"]["latency_p99_us"],
        "source": f"{here} inference.latency_p99_us",
    }
    assert inputs["bytes_per_record"] == {
        "value": s["codec"]["bytes_per_reading"]["medium"] * 8,
        "source": f"{here} codec.bytes_per_reading.medium x 8",
    }
    assert inputs["store_puts_per_s_batch1"] == {
        "value": s["store"]["puts_per_s_batch1"],
        "source": f"{here} store.puts_per_s_batch1",
    }
    assert inputs["fsync_per_s"]["value"] == s["fsync"]["per_s"]
    # what the device does not measure (the cloud's model) comes from the wheel's bundled runs
    bundled = installed.parent.parent / "share" / "edge-agent" / "bench-results"
    assert plan["measured_dir"] == str(bundled)
    assert inputs["cloud_inference_ms"]["source"].startswith("bundled: build machine ")
    edge = {sp["name"]: sp for sp in plan["splits"]}["edge-only"]
    assert edge["latency_ms"] == s["detect"]["latency_p99_ms"]

    proc = run(installed, "plan", "--profile", profile, "--data-dir", data, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"measured on this device: {saved}" in proc.stdout
    assert f"({here} detect.latency_p99_ms)" in proc.stdout
