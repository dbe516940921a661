"""The agent's side of trust: how its CoAP exchanges are protected, from ``[uplink] security``.

- ``oscore`` (the default): every request is protected end to end with OSCORE (RFC 8613), keyed
  from the device's credential file; the context's state (ID Context, reserved sequence numbers,
  replay window) lives in ``DATA/oscore.json`` (agent/wire/oscore.py explains why no nonce is
  ever used twice, across SIGKILLs, power cuts and reflashes).
- ``dtls``: ``coaps://`` endpoints with DTLS 1.2 PSK (identity = the device id), the interop
  profile for platforms that speak it; needs the DTLSSocket module (tools/dev setup builds it).
- ``none``: plain CoAP. Only when a config says so; the agent warns at every start.

:class:`ClientSecurity` is handed to every :class:`~agent.sync.transport.CoapTransport` of the
agent, which calls :meth:`ClientSecurity.configure` on each client context it makes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.wire.credentials import PSK_IDENTITY_BYTES, Credential, CredentialError

log = logging.getLogger(__name__)

MODES = ("oscore", "dtls", "none")
DEFAULT_PORTS = {"coap": 5683, "coap+tcp": 5683, "coaps": 5684, "coaps+tcp": 5684}


def uri_patterns(uri: str) -> list[str]:
    """aiocoap's credential patterns for requests below ``uri`` (with and without the default
    port: aiocoap writes request URIs without it)."""
    base = uri.rstrip("/")
    parts = urlsplit(base)
    out = [f"{base}/*"]
    if parts.port is not None and parts.port == DEFAULT_PORTS.get(parts.scheme):
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        out.append(f"{parts.scheme}://{host}{parts.path}/*")
    elif parts.port is None:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        out.append(f"{parts.scheme}://{host}:{DEFAULT_PORTS.get(parts.scheme, 5683)}{parts.path}/*")
    return out


class ClientSecurity:
    """The protection of the agent's requests to ``uris``."""

    def __init__(
        self, mode: str, uris: tuple[str, ...], credential: Credential | None, state: Path
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"security must be one of {', '.join(MODES)}")
        self.mode = mode
        self.uris = uris
        self.credential = credential
        self.state = state
        self.credential_path: Path | None = None  # the file it was read from (open)
        self._client: Any = None
        if mode == "oscore":
            from agent.wire.oscore import ClientContext

            assert credential is not None
            self._client = ClientContext(credential, state)

    @classmethod
    def open(
        cls, mode: str, uris: tuple[str, ...], credential_path: Path, state: Path
    ) -> ClientSecurity:
        """From the config's values; ConfigError (one line, with the fix) when the credential
        cannot be used."""
        if mode == "none":
            log.warning(
                "event=security_none endpoints=%s: requests are sent unauthenticated and "
                'unencrypted ([uplink] security = "none"); anyone on the path can read and '
                "forge them",
                ",".join(uris),
            )
            return cls(mode, uris, None, state)
        try:
            credential = Credential.read(credential_path)
        except CredentialError as err:
            raise ConfigError("[uplink]", "credential", str(err)) from None
        if mode == "dtls" and not credential.psk:
            raise ConfigError("[uplink]", "credential", f"{credential_path}: has no DTLS PSK")
        if mode == "dtls" and len(credential.principal.encode()) > PSK_IDENTITY_BYTES:
            raise ConfigError(
                "[uplink]",
                "security",
                f"the device id {credential.principal!r} is longer than {PSK_IDENTITY_BYTES} "
                'bytes, the longest DTLS PSK identity tinydtls takes: use security = "oscore"',
            )
        if mode == "dtls":
            from aiocoap.defaults import dtls_missing_modules

            missing = dtls_missing_modules()
            if missing:
                raise ConfigError(
                    "[uplink]",
                    "security",
                    f'"dtls" needs the Python module {", ".join(missing)}, which is not '
                    "installed (pip install DTLSSocket; it builds with autoconf and automake)",
                )
        security = cls(mode, uris, credential, state)
        security.credential_path = credential_path
        return security

    @property
    def transports(self) -> list[str]:
        """aiocoap transports this protection needs before the URIs' own."""
        return ["oscore"] if self.mode == "oscore" else []

    @property
    def context(self) -> Any:
        """The OSCORE security context (None unless ``oscore``)."""
        return None if self._client is None else self._client.context

    def configure(self, ctx: Any) -> None:
        """Install the credentials (and for OSCORE, agent/sync/oscoreclient.py's transport) on a
        new aiocoap client context."""
        if self.mode == "oscore":
            from agent.sync import oscoreclient

            oscoreclient.install(ctx)  # aiocoap's OSCORE transport, its tasks named cheaply
            for uri in self.uris:
                for pattern in uri_patterns(uri):
                    ctx.client_credentials[pattern] = self._client.context
        elif self.mode == "dtls":
            assert self.credential is not None
            entry = {
                "dtls": {
                    "psk": self.credential.psk,
                    "client-identity": self.credential.principal.encode(),
                }
            }
            ctx.client_credentials.load_from_dict(
                {p: entry for uri in self.uris for p in uri_patterns(uri)}
            )

    def retire(self) -> None:
        """The credential file was replaced (a rotation): the running context's state is not
        written again (the new credential starts a new context); requests still sent under it
        are refused by the endpoint until the agent restarts."""
        if self._client is not None:
            self._client.retire()

    def close(self) -> None:
        """Clean stop: the exact sequence number on disk."""
        if self._client is not None:
            self._client.close()
