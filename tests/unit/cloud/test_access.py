"""The endpoint's access rule (cloud/security.py ``allowed``) for every route and method, with
gateways: a gateway may do for a device attached to it exactly what the device may do with its
own resources, nothing for any other device, nothing an operator does, and post only to its own
``/relay``."""

from __future__ import annotations

import pytest

from cloud.security import ACCESS, Principal, allowed

RELAYS = {"pump-01": "gw-1", "pump-02": "gw-2"}
DEVICE = Principal("pump-01", "device")
GATEWAY = Principal("gw-1", "gateway")
OPERATOR = Principal("alice", "operator")
ROUTES = [(route, method) for route, methods in ACCESS.items() for method in methods]


@pytest.mark.parametrize(("route", "method"), ROUTES)
def test_a_gateway_does_for_its_device_what_the_device_may(route: str, method: str) -> None:
    if "self" in ACCESS[route][method]:
        return  # the device's own credential (below): never its gateway
    for device in ("pump-01", None):
        assert allowed(route, method, device, GATEWAY, RELAYS) == allowed(
            route, method, device, DEVICE, RELAYS
        ), (route, method, device)


@pytest.mark.parametrize(("route", "method"), ROUTES)
def test_a_gateway_does_nothing_for_devices_not_attached_to_it(route: str, method: str) -> None:
    rules = ACCESS[route][method]
    open_to_all = "public" in rules or "any" in rules
    for device in ("pump-02", "pump-03", "gw-2"):
        expected = 0 if open_to_all else 403
        assert allowed(route, method, device, GATEWAY, RELAYS) == expected, (route, device)
    assert allowed(route, method, "pump-01", GATEWAY, None) == (0 if open_to_all else 403)


def test_relay_is_the_named_gateways_only() -> None:
    assert allowed("relay", "POST", "gw-1", GATEWAY, RELAYS) == 0
    assert allowed("relay", "POST", "gw-2", GATEWAY, RELAYS) == 403
    assert allowed("relay", "POST", "pump-01", DEVICE, RELAYS) == 403
    assert allowed("relay", "POST", "pump-01", GATEWAY, RELAYS) == 403
    assert allowed("relay", "POST", "alice", OPERATOR, RELAYS) == 403
    assert allowed("relay", "POST", "gw-1", None, RELAYS) == 401
    # a device named like a gateway, or attached "to" a device: no gateway rights
    assert allowed("relay", "POST", "gw-1", Principal("gw-1", "device"), RELAYS) == 403
    assert allowed("ingest", "POST", "pump-01", Principal("gw-1", "device"), RELAYS) == 403


def test_operators_rights_are_not_a_gateways() -> None:
    assert allowed("desired", "PUT", "pump-01", OPERATOR, RELAYS) == 0
    assert allowed("desired", "PUT", "pump-01", GATEWAY, RELAYS) == 403
    assert allowed("reported", "GET", "pump-02", OPERATOR, RELAYS) == 0
    assert allowed("reported", "GET", "pump-02", GATEWAY, RELAYS) == 403


def test_a_credential_rotation_is_the_device_itself_only() -> None:
    """``POST /credential/ID`` (cloud/credroutes.py): not its gateway, not another device, not
    an operator, not an unauthenticated peer."""
    assert ACCESS["credential"] == {"POST": ("self",)}
    assert allowed("credential", "POST", "pump-01", DEVICE, RELAYS) == 0
    assert allowed("credential", "POST", "pump-01", GATEWAY, RELAYS) == 403
    assert allowed("credential", "POST", "pump-01", OPERATOR, RELAYS) == 403
    assert allowed("credential", "POST", "pump-02", DEVICE, RELAYS) == 403
    assert allowed("credential", "POST", "pump-01", Principal("pump-01", "gateway"), {}) == 403
    assert allowed("credential", "POST", "pump-01", Principal("pump-01", "operator"), {}) == 403
    assert allowed("credential", "POST", "pump-01", None, RELAYS) == 401
