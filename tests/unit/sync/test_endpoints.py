"""The endpoint list's storage rule: a fallback must share the device's storage (the first one an
endpoint names, kept across restarts); an endpoint naming another is refused and left."""

from __future__ import annotations

import json
from pathlib import Path

from agent.sync.transport import Endpoints
from drivers.clock import VirtualClock

URIS = ("coap://a", "coap://b", "coap://c")


def test_the_first_storage_named_is_kept_and_another_is_refused(
    tmp_path: Path, vclock: VirtualClock
) -> None:
    path = tmp_path / "endpoint-store.json"

    async def main() -> None:
        eps = Endpoints(URIS, vclock, primary_retry=1.0, store_path=path)
        assert await eps.check_store("coap://a", "s1")
        assert json.loads(path.read_text()) == {"store": "s1"}
        eps.failed("coap://a")
        assert eps.current == "coap://b"
        assert not await eps.check_store("coap://b", "s2")  # another deployment
        assert eps.current == "coap://c"  # moved off it at once
        assert await eps.check_store("coap://c", "s1")
        eps.failed("coap://c")
        assert eps.current == "coap://a"  # b is skipped when falling back
        assert await eps.check_store("coap://x", None)  # an endpoint that names none
        assert not await eps.check_store("coap://b", None)  # stays refused

    vclock.run(main())

    async def after_restart() -> None:
        eps = Endpoints(URIS, vclock, store_path=path)
        assert eps.home == "s1"
        assert not await eps.check_store("coap://a", "s9")  # the primary moved to another one

    vclock.run(after_restart())


def test_a_refused_primary_is_not_returned_to(vclock: VirtualClock) -> None:
    async def main() -> None:
        eps = Endpoints(URIS[:2], vclock, primary_retry=1.0)
        assert await eps.check_store("coap://b", "s1")
        assert not await eps.check_store("coap://a", "s2")
        assert eps.current == "coap://b"
        await vclock.sleep(5.0)
        assert not eps.want_primary()
        eps.primary_ok()
        assert eps.current == "coap://b"

    vclock.run(main())


def test_an_unreadable_store_file_starts_afresh(tmp_path: Path, vclock: VirtualClock) -> None:
    path = tmp_path / "endpoint-store.json"
    path.write_bytes(b"\xff{not json")
    eps = Endpoints(URIS, vclock, store_path=path)
    assert eps.home is None
