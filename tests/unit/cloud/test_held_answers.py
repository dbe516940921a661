"""Answers larger than one block held for their later blocks (cloud/protocol.py
``_Block2Responses``): every later block is authorized as the first was."""

from __future__ import annotations

import types
from collections import Counter

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from cloud.protocol import Limits, _Block2Responses, _Failure, _RenderedFailure


def request(number: int) -> aiocoap.Message:
    m = aiocoap.Message(code=Code.GET, uri_path=("state", "pump-01", "reported"))
    m.opt.block2 = BlockOption.BlockwiseTuple(number, False, 2)  # 64-byte blocks
    m.remote = types.SimpleNamespace(
        blockwise_key="peer-1", maximum_payload_size=1024, maximum_block_size_exp=6
    )
    return m


async def test_a_peer_refused_since_the_first_block_gets_no_later_block() -> None:
    """Defect: a later block was cut from the held answer without asking whether the peer may
    still read it, so a peer whose credential was revoked or re-keyed after the first block
    read the rest of the answer for as long as it kept asking (each block refreshes the hold).
    Now the later block gets the refusal render gives (4.01) and the held answer goes."""
    refused: list[bool] = [False]

    def authorize(req: aiocoap.Message) -> None:
        if refused[0]:
            raise _Failure(Code.UNAUTHORIZED, "credential no longer valid")

    held = _Block2Responses(Limits(), Counter(), authorize)

    async def build() -> aiocoap.Message:
        return aiocoap.Message(code=Code.CONTENT, payload=b"x" * 300)

    first = await held.extract_or_insert(request(0), build)
    assert first.opt.block2.more and len(held) == 1
    second = await held.extract_or_insert(request(1), build)
    assert bytes(second.payload) == b"x" * 64 and len(held) == 1
    refused[0] = True
    with pytest.raises(_RenderedFailure) as err:
        await held.extract_or_insert(request(2), build)
    assert err.value.to_message().code == Code.UNAUTHORIZED
    assert len(held) == 0
    refused[0] = False  # the same peer again: the answer is not held any more (4.08)
    with pytest.raises(aiocoap.error.RequestEntityIncomplete):
        await held.extract_or_insert(request(3), build)
