"""Operators on the web dashboard: HTTP Basic with a token derived from the operator's credential.

The dashboard is served without authentication on loopback only. On any other address it asks
for an operator (``edge-agent-cloud operators add``) with HTTP Basic (RFC 7617): the user name
is the operator's name and the password its *dashboard token*, HMAC-SHA-256 of a fixed label,
the name and the credential's generation under the operator's OSCORE master secret (32
characters of base64url, 192 bits). ``edge-agent-cloud operators token NAME`` prints it.

Why Basic with a derived token:

- A browser asks for Basic credentials by itself and sends them on every request to the same
  origin (the page's polls included): no login form, no session cookie, nothing for a
  cross-site request to ride on (a cross-site page cannot read the answers: same-origin policy).
- The token is checked against the endpoint's live registry of principals, so ``operators
  rekey`` (a new master secret, so a new token) and ``operators revoke`` take effect on the next
  request, as they do for CoAP. No second password store to keep in step.
- Knowing the token gives read access to the dashboard and nothing else: it is not the OSCORE
  key (an HMAC output does not reveal its key), so it cannot set desired state.

Basic sends the token on every request, so the dashboard on a network address is served over
TLS only (``--http-cert``/``--http-key``); cloud/dashboard.py enforces that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable

from agent.wire.credentials import Credential

TOKEN_LABEL = b"edge-agent dashboard token v1"
TOKEN_CHARS = 32  # base64url characters: 192 bits
REALM = "edge-agent dashboard"


def dashboard_token(credential: Credential) -> str:
    """The operator's dashboard password (changes when the credential is re-keyed)."""
    msg = b"\0".join(
        (TOKEN_LABEL, credential.principal.encode(), str(credential.generation).encode())
    )
    mac = hmac.new(credential.master_secret, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode("ascii")[:TOKEN_CHARS]


def basic_user(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an ``Authorization: Basic ...`` value; None when absent or malformed."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value or len(value) > 512:
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, colon, password = text.partition(":")
    if not colon or not user:
        return None
    return user, password


def check_operator(
    header: str | None, credential_of: Callable[[str], Credential | None]
) -> str | None:
    """The operator named by a Basic ``header`` if its password is that operator's current
    dashboard token, else None. ``credential_of(name)``: the principal's current credential, or
    None when it has none or is revoked (:meth:`cloud.security.Principals.credential`)."""
    pair = basic_user(header)
    if pair is None:
        return None
    user, password = pair
    cred = credential_of(user)
    if cred is None or cred.role != "operator":
        # compare anyway, so that a wrong name costs as long as a wrong token
        hmac.compare_digest(password.encode(), b"x" * TOKEN_CHARS)
        return None
    if not hmac.compare_digest(password.encode(), dashboard_token(cred).encode()):
        return None
    return user


def challenge() -> dict[str, str]:
    """The ``WWW-Authenticate`` field of a 401."""
    return {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}
