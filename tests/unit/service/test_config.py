"""Configuration: the shipped example is valid, and every kind of bad config gives one line
naming the file and the key path, with exit 78 from the CLI and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.service import config
from agent.service.config import example_config

GOOD = """
[agent]
device_id = "pump-7"
data_dir = "state"

[[sensor]]
name = "ambient"
driver = "bme280"
bus = 1
address = 0x76
interval = 5.0
channels = ["temperature_c"]

[[sensor]]
name = "loop"
driver = "ads1115"
bus = 1
address = 0x48
interval = 1.0
channels = ["pressure_bar"]
[sensor.scaling.pressure_bar]
source = "ain0_v"
in = [0.5, 4.5]
out = [-1.0, 9.0]
unit = "bar"

[[sensor]]
name = "flow"
driver = "modbus"
port = "/dev/ttyUSB0"
interval = 1.0
channels = ["flow_lpm"]
[sensor.options]
slave = 1
[[sensor.options.register]]
name = "flow_lpm"
table = "input"
address = 0
type = "float32"
"""


def test_example_config_is_valid():
    cfg = config.load(example_config())
    drivers = {s.driver for s in cfg.sensors}
    assert drivers == {"bme280", "adxl345", "ina219", "ads1115", "mcp9600", "modbus", "line"}
    loop = cfg.sensor("loop")
    assert loop.scaling["pressure_bar"].apply(0.5) == pytest.approx(-1.0)
    assert loop.scaling["pressure_bar"].invert(9.0) == pytest.approx(4.5)


def test_good_config_parses_with_relative_data_dir(tmp_path: Path):
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    cfg = config.load(path)
    assert cfg.agent.data_dir == tmp_path / "state"
    assert [s.name for s in cfg.sensors] == ["ambient", "loop", "flow"]
    assert cfg.sensor("ambient").address == 0x76
    assert cfg.sensor("flow").port == "/dev/ttyUSB0"
    assert cfg.state.path == tmp_path / "state" / "state.cbor"
    assert cfg.state.report_interval == 300.0


def _replace(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


LONG_NAME = "k" * 300 + ".pub"  # longer than a file name may be (255 bytes)
BAD = [
    ("not toml", "[agent\n", "", "not valid TOML"),
    (
        "no agent table",
        GOOD.replace('[agent]\ndevice_id = "pump-7"\ndata_dir = "state"\n', ""),
        "agent",
        "is required",
    ),
    (
        "bad device id",
        _replace('device_id = "pump-7"', 'device_id = "pump 7!"'),
        "agent.device_id",
        "must be",
    ),
    ("unknown top key", GOOD + "\n[sensorz]\nx = 1\n", "sensorz", "unknown key"),
    (
        "address too big",
        _replace("address = 0x76", "address = 0x99"),
        "sensor[0].address",
        "0x99 is not a 7-bit I2C address",
    ),
    (
        "address not for part",
        _replace("address = 0x76", "address = 0x40"),
        "sensor[0].address",
        "bme280 answers only at",
    ),
    (
        "unknown driver",
        _replace('driver = "bme280"', 'driver = "bme281"'),
        "sensor[0].driver",
        "unknown driver 'bme281'",
    ),
    (
        "negative interval",
        _replace("interval = 5.0", "interval = -1"),
        "sensor[0].interval",
        "below the minimum",
    ),
    (
        "interval as string",
        _replace("interval = 5.0", 'interval = "5s"'),
        "sensor[0].interval",
        "expected a number",
    ),
    (
        "unknown channel",
        _replace('channels = ["temperature_c"]', 'channels = ["temp"]'),
        "sensor[0].channels[0]",
        "'temp' is not a channel of bme280",
    ),
    (
        "duplicate name",
        _replace('name = "loop"', 'name = "ambient"'),
        "sensor[1].name",
        "already used by sensor[0]",
    ),
    (
        "same address twice",
        _replace("address = 0x48", "address = 0x76")
        .replace('driver = "ads1115"', 'driver = "bme280"', 1)
        .replace('channels = ["pressure_bar"]', 'channels = ["temperature_c"]')
        .replace(
            '[sensor.scaling.pressure_bar]\nsource = "ain0_v"\n'
            'in = [0.5, 4.5]\nout = [-1.0, 9.0]\nunit = "bar"\n',
            "",
        ),
        "sensor[1].address",
        "already used by sensor[0]",
    ),
    (
        "bus not a number",
        _replace("bus = 1\naddress = 0x76", 'bus = "one"\naddress = 0x76'),
        "sensor[0].bus",
        "neither an I2C bus number",
    ),
    (
        "serial part with address",
        _replace('port = "/dev/ttyUSB0"', 'port = "/dev/ttyUSB0"\naddress = 3'),
        "sensor[2].address",
        "serial instrument",
    ),
    (
        "scaling from unknown source",
        _replace('source = "ain0_v"', 'source = "ain9_v"'),
        "sensor[1].scaling.pressure_bar.source",
        "'ain9_v' is not a channel",
    ),
    (
        "scaling degenerate",
        _replace("in = [0.5, 4.5]", "in = [1.0, 1.0]"),
        "sensor[1].scaling.pressure_bar.in",
        "must differ",
    ),
    (
        "scaling wrong arity",
        _replace("out = [-1.0, 9.0]", "out = [-1.0]"),
        "sensor[1].scaling.pressure_bar.out",
        "expected 2 numbers",
    ),
    (
        "unknown sensor key",
        _replace("interval = 5.0", "interval = 5.0\nintervall = 5.0"),
        "sensor[0].intervall",
        "unknown key",
    ),
    (
        "missing channels",
        _replace('channels = ["temperature_c"]\n', ""),
        "sensor[0].channels",
        "is required",
    ),
    (
        "sim without simulation",
        _replace("bus = 1\naddress = 0x76", 'bus = "sim"\naddress = 0x76'),
        "sensor[0].bus",
        "needs a [simulation] table",
    ),
    (
        "bad baudrate",
        _replace('port = "/dev/ttyUSB0"', 'port = "/dev/ttyUSB0"\nbaudrate = 9601'),
        "sensor[2].baudrate",
        "9601 is not one of",
    ),
    (
        "driver option invalid",
        _replace("[sensor.options]\nslave = 1", "[sensor.options]\nslave = 300"),
        "sensor[2].options.slave",
        "",
    ),
    ("no sensors", GOOD[: GOOD.index("[[sensor]]")], "sensor", "at least one"),
    (
        "state interval zero",
        GOOD + "\n[state]\nreport_interval = 0\n",
        "state.report_interval",
        "below the minimum",
    ),
    (  # a name longer than the filesystem takes: the lookup's OSError was no key's error
        "model key name too long",
        GOOD + f'\n[models]\npublic_key = "{LONG_NAME}"\n',
        "models.public_key",
        "cannot be looked up",
    ),
    (
        "release key name too long",
        GOOD + f'\n[update]\npublic_key = "{LONG_NAME}"\n',
        "update.public_key",
        "cannot be looked up",
    ),
    (
        "data dir name too long",
        _replace('data_dir = "state"', f'data_dir = "{LONG_NAME}"'),
        "agent.data_dir",
        "cannot be looked up",
    ),
    (
        "credential name too long",
        GOOD + f'\n[uplink]\nendpoints = ["coap://127.0.0.1:5683"]\ncredential = "{LONG_NAME}"\n',
        "uplink.credential",
        "cannot be looked up",
    ),
    *(  # check-config said ok; at run time link, state, uplink and advice failed in a loop
        (
            f"endpoint {uri}",
            GOOD + f'\n[uplink]\nendpoints = ["{uri}"]\nsecurity = "none"\n',
            "uplink.endpoints[0]",
            "not a CoAP URI with a host and a port 1-65535",
        )
        for uri in ("coap://127.0.0.1:99999", "coap://host:abc", "coap://:5683", "coap://[::1")
    ),
    *(  # MB times 2**20 is inf, int(inf) an OverflowError: a traceback, not the key
        (f"{table}.{key} huge", GOOD + f"\n[{table}]\n{key} = 1e308\n", f"{table}.{key}", "above")
        for table, key in (
            ("store", "budget_mb"),
            ("models", "memory_budget_mb"),
            ("models", "disk_budget_mb"),
            ("update", "disk_budget_mb"),
        )
    ),
    (
        "state coalescing above the period",
        GOOD + "\n[state]\nreport_interval = 10\nmin_put_interval = 60\n",
        "state.min_put_interval",
        "above report_interval",
    ),
]


@pytest.mark.parametrize(("case", "text", "path", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_with_key_path(tmp_path: Path, case, text, path, message):
    file = tmp_path / "agent.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(file)
    err = info.value
    line = str(err)
    assert "\n" not in line
    assert line.startswith("agent.toml: ")
    assert err.path == path, line
    assert message in line


def test_missing_file_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.service.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_cli_ok_and_bad(tmp_path: Path):
    ok = _cli("check-config", str(example_config()))
    assert ok.returncode == 0, ok.stderr
    assert "ok (8 sensors" in ok.stdout

    bad = tmp_path / "agent.toml"
    bad.write_text(_replace("address = 0x76", "address = 0x99"))
    result = _cli("check-config", str(bad))
    assert result.returncode == config.EX_CONFIG
    assert result.stderr.strip() == "agent.toml: sensor[0].address: 0x99 is not a 7-bit I2C address"
    assert "Traceback" not in result.stderr


def test_run_with_bad_config_exits_78(tmp_path: Path):
    bad = tmp_path / "agent.toml"
    bad.write_text(_replace("interval = 5.0", "interval = 0"))
    result = _cli("run", "--config", str(bad))
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert "sensor[0].interval" in result.stderr


@pytest.mark.parametrize("key", ["motor/current_a", "current_a"])
def test_a_model_input_made_drop_is_refused_naming_local(tmp_path: Path, key: str):
    """`drop` takes a channel from the detector too: a model input made `drop` would leave
    detection paused for good (every row incomplete), so the config says to use `local`."""
    file = tmp_path / "agent.toml"
    text = example_config().read_text() + f'\n[data]\npolicy = {{ "{key}" = "drop" }}\n'
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(file)
    assert info.value.path == "data.policy", str(info.value)
    assert "motor/current_a" in str(info.value) and "'local'" in str(info.value)
    file.write_text(text.replace('"drop"', '"local"'))
    assert config.load(file).data.local_channels == {("motor", "current_a")}
    file.with_name("bad.toml").write_text(text)
    result = _cli("check-config", str(file.with_name("bad.toml")))
    assert result.returncode == 78 and "data.policy" in result.stderr


def test_one_serial_port_under_two_paths_is_refused(tmp_path: Path):
    """/dev/ttyUSB0 and its /dev/serial/by-id/... link are one port: two sensors on it would
    open it twice and read each other's bytes. The check follows links (here a file and a link
    to it stand for the tty and its by-id name)."""
    tty = tmp_path / "ttyUSB0"
    tty.write_text("")
    by_id = tmp_path / "usb-FTDI_FT232R_A10K-if00-port0"
    by_id.symlink_to(tty)
    second = GOOD.split("[[sensor]]")[3].replace('name = "flow"', 'name = "flow2"')
    text = (
        GOOD.replace('port = "/dev/ttyUSB0"', f'port = "{tty}"')
        + "[[sensor]]"
        + second.replace('port = "/dev/ttyUSB0"', f'port = "{by_id}"')
    )
    file = tmp_path / "agent.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(file)
    assert info.value.path == "sensor[3].port"
    assert f"{by_id} is already used by sensor[2] (both are {tty})" in str(info.value)


@pytest.mark.parametrize("table", ["models", "update"])
def test_a_key_file_larger_than_a_key_is_refused_without_reading_it_whole(
    tmp_path: Path, table: str
):
    """A public key is some hundred bytes: a path to something else (a release bundle, a log,
    /dev/zero) was read whole into memory at every start, without end for /dev/zero."""
    big = tmp_path / "bundle.tar"
    with open(big, "wb") as f:
        f.truncate(32 << 20)  # sparse: 32 MiB that take no disk
    for path in [big] + ([Path("/dev/zero")] if table == "update" else []):
        file = tmp_path / "agent.toml"
        file.write_text(GOOD + f'\n[{table}]\npublic_key = "{path}"\n')
        with pytest.raises(ConfigError) as info:
            config.load(file)
        assert info.value.path == f"{table}.public_key"
        assert "larger than a key" in str(info.value)
