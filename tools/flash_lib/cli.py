"""The command line of tools/flash.

  tools/flash dir ROOTDIR   --device-id ID --endpoint URL --credential F [--model-key F]
                            [--release-key F] [--chroot]
  tools/flash image FILE.img --device-id ID --endpoint URL --credential F [--model-key F]
                            [--release-key F]
  tools/flash ssh USER@HOST[:PORT] --device-id ID --endpoint URL --credential F [-i KEY]
  tools/flash bundle OUTDIR [--arch aarch64] [--python-version 3.11]
  tools/flash lock          write tools/lock/device-ARCH-pyX.Y.txt again (./tools/dev lock)

--role gateway (dir, image, ssh) installs a gateway (`edge-agent gateway`, docs/gateway.md)
instead of the device agent: --device-id is the gateway's name, --credential its file from
`edge-agent-cloud gateways add`, --devices DIR the credential files of its devices.

URL is coap://HOST:PORT (or coap+tcp://), coaps://HOST:PORT with --security dtls. The credential
is the device's file from `edge-agent-cloud devices add`; --security none (plain CoAP) needs none.

Every target: --dry-run prints the plan and changes nothing; a second run says "nothing to do".
--bench runs `edge-agent bench --quick` on the device once after the install (SSH, dir --chroot,
dir /; an image cannot run commands: it says so and skips).
Exit status 0 on success, 1 on an error (one line on stderr), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flash_lib import bundle as bundlemod
from flash_lib import lock as lockmod
from flash_lib.errors import FlashError
from flash_lib.provision import PROJECT_ROOT, SECURITY, Settings, provision
from flash_lib.roles import ROLES
from flash_lib.sshfs import parse_destination
from flash_lib.targets import DirTarget, ImageTarget, SshTarget, Target


def _bundle_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        choices=bundlemod.ARCHES,
        help="the target's CPU (default: found from the target's python3, else this host's)",
    )
    p.add_argument(
        "--python-version",
        dest="python",
        metavar="X.Y",
        help="the target's Python (default: found from the target, else this host's)",
    )
    p.add_argument(
        "--glibc",
        metavar="X.Y",
        help="the target's glibc, for the manylinux wheels of a foreign target (default 2.36)",
    )
    p.add_argument(
        "--pip-python",
        metavar="PYTHON",
        help="the python whose pip builds the bundle (default: .venv/bin/python, else this one)",
    )


#: Options of earlier versions: the DTLS PSK is in the device's credential file now.
GONE = ("--psk", "--psk-file", "--psk-identity")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--role",
        choices=tuple(ROLES),
        default="device",
        help="device (default): the agent beside a machine, edge-agent.service; gateway: "
        "`edge-agent gateway` for the devices of a site, edge-agent-gateway.service, its own "
        "user, /etc/edge-agent/gateway.toml and /var/lib/edge-agent-gateway (beside a device "
        "install on the same machine, if there is one: docs/gateway.md)",
    )
    p.add_argument(
        "--devices",
        type=Path,
        metavar="DIR",
        help="--role gateway: the credential files (*.json) of the gateway's devices, from "
        "`edge-agent-cloud devices add --credential-out FILE`; installed in "
        "/var/lib/edge-agent-gateway/devices/ (0700, each file 0600)",
    )
    p.add_argument(
        "--device-id",
        required=True,
        help="the device's id (agent.device_id); with --role gateway the gateway's name",
    )
    p.add_argument(
        "--endpoint",
        required=True,
        help="the cloud endpoint: coap://HOST:PORT (or coap+tcp://), coaps://HOST:PORT with "
        "--security dtls",
    )
    p.add_argument(
        "--security",
        choices=SECURITY,
        default="oscore",
        help="how the agent protects its requests ([uplink] security): oscore (default), dtls "
        "(coaps:// endpoints) or none (plain CoAP, unauthenticated; only when asked for)",
    )
    p.add_argument(
        "--credential",
        type=Path,
        metavar="FILE",
        help="the device's credential file from `edge-agent-cloud devices add --data DIR ID "
        "--credential-out FILE`; installed as /var/lib/edge-agent/credential.json (0600, "
        "edge-agent). With --role gateway the gateway's, from `edge-agent-cloud gateways add`, "
        "in /var/lib/edge-agent-gateway. Required unless --security none",
    )
    p.add_argument(
        "--model-key",
        type=Path,
        metavar="FILE",
        help="the model registry's public key, the KEYFILE.pub of `edge-agent-cloud models "
        "keygen`; installed as /etc/edge-agent/models.pub ([models] public_key). Without it, "
        "the device refuses model downloads",
    )
    p.add_argument(
        "--release-key",
        type=Path,
        metavar="PUBFILE",
        help="the agent release key's public half, the KEYFILE.pub of `edge-agent-cloud "
        "releases keygen` (DATA/releases/release.key.pub); installed as "
        "/etc/edge-agent/release.pub ([update] public_key). Without it, the device refuses "
        "every over-the-air agent release",
    )
    for gone in GONE:
        p.add_argument(gone, dest=f"gone_{gone[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    p.add_argument(
        "--bundle",
        type=Path,
        help="a wheel bundle made by `tools/flash bundle` (default: build one, cached)",
    )
    p.add_argument(
        "--template",
        type=Path,
        help="the config template (default: systemd/agent.toml.in; with --role gateway "
        "systemd/gateway.toml.in)",
    )
    p.add_argument(
        "--sensors",
        type=Path,
        help="copy the [[sensor]] tables from this config (default: the reference pump rig, "
        "agent/examples/pump-rig.toml)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--bench",
        action="store_true",
        help="after the install, run `edge-agent bench --quick` once on the device (seconds; "
        "its figures go to /var/lib/edge-agent/bench/quick.json, which `edge-agent plan` reads "
        "first). Over SSH, with dir --chroot and into dir /; an image cannot run it: it says so "
        "and skips",
    )
    _bundle_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/flash",
        description="Install edge-agent onto a device: a root filesystem directory, a Raspberry "
        "Pi OS image, or a live device over SSH. Idempotent; --dry-run prints the plan.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dir", help="into a mounted root filesystem (an SD card's rootfs)")
    p.add_argument("root", type=Path, help="the root filesystem's directory")
    p.add_argument(
        "--boot", type=Path, help="the mounted boot partition (with config.txt), if not in ROOT"
    )
    p.add_argument(
        "--chroot",
        action="store_true",
        help="build the venv now with chroot ROOT (same CPU as this host only)",
    )
    _common(p)

    p = sub.add_parser("image", help="into a Raspberry Pi OS disk image file (no mounting)")
    p.add_argument("image", type=Path, help="the .img file (MBR: 1 FAT bootfs, 2 ext4 rootfs)")
    _common(p)

    p = sub.add_parser("ssh", help="onto a live device over SSH")
    p.add_argument("destination", help="USER@HOST or USER@HOST:PORT")
    p.add_argument("-i", "--identity", type=Path, help="the SSH private key to log in with")
    p.add_argument("--known-hosts", type=Path, help="the known_hosts file to check the host key")
    p.add_argument(
        "--host-key-check",
        choices=("yes", "accept-new", "no"),
        default="accept-new",
        help="ssh StrictHostKeyChecking (default accept-new: a new device's key is learnt, "
        "a changed key is refused)",
    )
    p.add_argument(
        "--prefix",
        default="/",
        help="install under this directory of the device instead of / (for tests)",
    )
    p.add_argument(
        "--no-start", action="store_true", help="do not (re)start the service afterwards"
    )
    _common(p)

    p = sub.add_parser("bundle", help="only build the offline wheel bundle into OUTDIR")
    p.add_argument("out", type=Path)
    _bundle_options(p)

    p = sub.add_parser(
        "lock", help="write the device locks again (tools/lock: every target's wheels and hashes)"
    )
    p.add_argument(
        "--pip-python",
        metavar="PYTHON",
        help="the python whose pip resolves (default: .venv/bin/python, else this one)",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    for gone in GONE:
        if getattr(args, f"gone_{gone[2:].replace('-', '_')}") is not None:
            raise FlashError(
                f"{gone}: the DTLS PSK is in the device's credential file now: "
                "`edge-agent-cloud devices add --data DIR ID --psk-file FILE --credential-out "
                "ID.json`, then tools/flash --credential ID.json --security dtls"
            )
    return Settings(
        device_id=args.device_id,
        endpoint=args.endpoint,
        security=args.security,
        credential=args.credential,
        model_key=args.model_key,
        release_key=args.release_key,
        template=args.template,
        sensors=args.sensors,
        bundle_dir=args.bundle,
        arch=args.arch,
        python=args.python,
        glibc=args.glibc,
        pip_python=args.pip_python,
        dry_run=args.dry_run,
        start=not getattr(args, "no_start", False),
        bench=args.bench,
        role=args.role,
        devices=args.devices,
    )


def _target(args: argparse.Namespace) -> Target:
    if args.command == "dir":
        return DirTarget(args.root, boot=args.boot, chroot=args.chroot)
    if args.command == "image":
        return ImageTarget(args.image)
    return SshTarget(
        parse_destination(args.destination),
        prefix=args.prefix,
        identity=args.identity,
        known_hosts=args.known_hosts,
        host_key_check=args.host_key_check,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bundle":
            b = bundlemod.build(
                args.out,
                PROJECT_ROOT,
                arch=args.arch or bundlemod.host_arch(),
                python=args.python or bundlemod.host_python(),
                glibc=args.glibc,
                pip_python=args.pip_python,
            )
            print(
                f"bundle: {b.dir} ({b.arch}, Python {b.python}, {len(b.files)} wheels, id {b.id})"
            )
            return 0
        if args.command == "lock":
            pip_python = args.pip_python or bundlemod.pip_python_default(PROJECT_ROOT)
            lockmod.write(PROJECT_ROOT, pip_python)
            return 0
        settings = _settings(args)
        provision(_target(args), settings, say=lambda line: print(line, flush=True))
        return 0
    except FlashError as err:
        print(f"tools/flash: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tools/flash: interrupted", file=sys.stderr)
        return 130
