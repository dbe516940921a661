"""The gateway's configuration: ``edge-agent gateway --config FILE`` (docs/gateway.md).

A TOML file with the tables the agent's config has for identity and the way up (``[agent]``:
the gateway's name and data directory; ``[uplink]``: the cloud endpoint(s) and the gateway's own
credential, role ``gateway``) and its own ``[gateway]`` table::

    [gateway]
    listen = "0.0.0.0:5683"        # where devices reach it (coap://)
    credentials = "devices"        # the credential files of its devices (relative: data_dir)
    forward_interval = 30.0        # seconds between forwarding passes (alerts: at once)
    forward_records = 20000        # records per pass at most
    keep_forwarded = 604800.0      # seconds a record stays once the cloud stored it (>= 3600)
    desired_poll = 30.0            # seconds between (conditional) looks at desired documents

    [gateway.peers]                # optional: the site's replicated state (agent/gateway/peers.py)
    listen = "0.0.0.0:5690"
    peers = { gw-b = "coap://10.0.0.12:5690" }   # node name = URI
    secret = "/etc/edge-agent/site.key"          # OSCORE between the peers (docs/gateway.md)

Every other key is an error (the key's path in the message), as in the agent's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.errors import ConfigError
from agent.files import read_config_text, resolve_path, toml_document
from agent.gateway.peers import PeerSettings
from agent.gateway.peersecurity import peer_ids
from agent.sync.uplink import UplinkSettings
from drivers.base import OptionError, Options

DEFAULT_PORT = 5683


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    credentials: Path = Path("devices")
    forward_interval: float = 30.0
    forward_records: int = 20_000
    desired_poll: float = 30.0
    keep_forwarded: float = 7 * 86400.0
    peers: PeerSettings | None = None  # [gateway.peers]: the site's replicated state

    @classmethod
    def from_options(cls, opts: Options, data_dir: Path) -> GatewaySettings:
        listen = opts.string("listen", f"0.0.0.0:{DEFAULT_PORT}")
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
            raise opts.error("listen", f"{listen!r}: expected HOST:PORT")
        creds = resolve_path(data_dir, opts.string("credentials", "devices"))
        interval = opts.number("forward_interval", 30.0, minimum=0.05, maximum=3600.0)
        records = opts.integer("forward_records", 20_000, minimum=1, maximum=100_000)
        poll = opts.number("desired_poll", 30.0, minimum=0.1, maximum=3600.0)
        # at least an hour: a device sends a record again well within it when an ack was lost
        keep = opts.number(
            "keep_forwarded", 7 * 86400.0, minimum=3600.0, maximum=10 * 365 * 86400.0
        )
        peers = (
            PeerSettings.from_options(opts.table("peers"), data_dir) if opts.has("peers") else None
        )
        opts.finish()
        return cls(
            host.strip("[]"), int(port), creds, interval, records, poll, peers=peers,
            keep_forwarded=keep,
        )  # fmt: skip


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    name: str
    data_dir: Path
    uplink: UplinkSettings
    gateway: GatewaySettings


def load_gateway_config(path: str | Path) -> GatewayConfig:
    """Parse and check the file; ConfigError ``FILE: key.path: problem``."""
    p = Path(path)
    label = str(p)
    raw = toml_document(read_config_text(p), label)
    top = Options(raw)
    try:
        agent = top.table("agent", required=True)
        name = agent.string("device_id")
        data_dir = resolve_path(p.parent, agent.string("data_dir", "/var/lib/edge-agent-gateway"))
        agent.finish()
        uplink = UplinkSettings.from_options(top.table("uplink", required=True), data_dir, p.parent)
        gateway = GatewaySettings.from_options(top.table("gateway"), data_dir)
        top.finish()
    except OptionError as err:
        raise ConfigError(label, err.key, err.message) from None
    peers = gateway.peers
    if peers is not None and peers.secret is not None:
        try:  # each gateway's OSCORE sender ID, from its name: distinct or refused
            peer_ids(name, peers.named)
        except ValueError as err:
            raise ConfigError(label, "gateway.peers.peers", str(err)) from None
    return GatewayConfig(p, name, data_dir, uplink, gateway)
