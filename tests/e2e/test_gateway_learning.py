"""A device behind a gateway takes part in a federated round: its task comes through the desired
state the gateway mirrors, it fetches the round's weights from the gateway and uploads there, and
the cloud's coordinator stores its update and closes the round with it
(agent/gateway/learnrelay.py).

A real cloud endpoint on loopback with a real job (the coordinator on its SQLite storage, the
shipped skab-ae), a real gateway in this process (its store, its OSCORE context upstream), and the
device's own OSCORE transport to the gateway, making the requests the learning client makes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from agent.gateway import learnrelay
from agent.learn.masters import load_master_file
from agent.wire.batch import CF_CBOR
from agent.wire.learning import Masters, ModelUpdate, RoundTask, ScoreSummary, learn_key
from agent.wire.statedoc import DesiredDoc
from cloud.learning import Coordinator
from cloud.learnjob import JobSpec
from cloud.models import ModelRegistry, entry_for
from cloud.server import CloudServer
from cloud.storage import SQLiteStorage
from tests.e2e.test_gateway_time import DEVICE, gateway_and_device
from tests.unit.cloud.test_learning_check import BASE, FLOAT, KEY, MODEL, ROLE, TEMPLATE

pytestmark = pytest.mark.timeout(120)


def update(task: RoundTask, round_: int | None = None) -> bytes:
    rng = np.random.default_rng(3)
    delta = rng.normal(0.0, 0.01, 2404).astype(np.float32)
    summary = ScoreSummary.of(np.linspace(0.0, 0.4, 201))
    return ModelUpdate(task.job, round_ or task.round, 200, delta, summary, 0.1).to_cbor()


async def test_a_device_behind_a_gateway_takes_part_in_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learnrelay, "UPSTREAM_DEADLINE", 5.0)  # the cloud stopped, below
    cloud_dir = tmp_path / "cloud"
    server = await CloudServer.start(cloud_dir, "127.0.0.1", 0)
    storage = SQLiteStorage.in_dir(cloud_dir)
    try:
        async with gateway_and_device(server, tmp_path, forward_interval=1.0) as (gw, dev, uri):
            registry = ModelRegistry(cloud_dir / "models")
            registry.publish(TEMPLATE.read_bytes(), MODEL, BASE, entry_for(TEMPLATE), KEY)
            coordinator = Coordinator(storage, registry, KEY, clock=time.time)
            spec = JobSpec(
                model=MODEL, role=ROLE, base=BASE, rounds=1, fraction=1.0, min_devices=1,
                round_seconds=600.0, devices=(DEVICE,),
            )  # fmt: skip
            job = coordinator.start(spec, load_master_file(FLOAT))
            assert coordinator.tick(job.id).st.selected == [DEVICE]  # round 1 opens

            # the task, from the desired state the gateway mirrors
            tasks: list[RoundTask] = []

            async def task_seen() -> bool:
                resp = await dev.request("GET", f"{uri}/state/{DEVICE}/desired", accept=CF_CBOR)
                entry = DesiredDoc.from_cbor(resp.payload).entries.get(learn_key(MODEL))
                if entry is not None:
                    tasks.append(RoundTask.from_value(entry.value))
                return bool(tasks)

            async with asyncio.timeout(30.0):
                while not await task_seen():  # noqa: ASYNC110 - polled as the device does
                    await asyncio.sleep(0.5)
            task = tasks[0]
            assert (task.job, task.round) == (job.id, 1)

            # the round's weights, fetched from the cloud once and checked by their SHA-256
            for _ in range(2):
                resp = await dev.request("GET", f"{uri}/learn/masters/{task.masters}")
                assert resp.dotted == "2.05", resp.payload
                assert Masters.from_cbor(resp.payload, task.masters).model == MODEL
            assert gw.learn.fetches == 1
            unknown = "0" * 64
            resp = await dev.request("GET", f"{uri}/learn/masters/{unknown}")
            assert resp.dotted == "4.04"  # the cloud's answer, passed on

            # the upload: stored by the cloud once, however often it is sent
            for _ in range(2):
                resp = await dev.request(
                    "POST", f"{uri}/learn/{DEVICE}", update(task), content_format=CF_CBOR
                )
                assert resp.dotted == "2.04", resp.payload
            assert storage.learn_update_devices(job.id, 1) == [DEVICE]
            # the cloud's refusal, with its reason, reaches the device
            resp = await dev.request(
                "POST", f"{uri}/learn/{DEVICE}", update(task, 2), content_format=CF_CBOR
            )
            assert resp.dotted == "4.03" and b"not open" in resp.payload
            assert gw.status()["learn_uploads"] == 2

            closed = coordinator.tick(job.id)  # every selected device uploaded: it closes
            assert not closed.st.open and closed.st.round == 1

            # the cloud gone: the device is told to ask again later, not refused
            await server.stop()
            resp = await dev.request(
                "POST", f"{uri}/learn/{DEVICE}", update(task), content_format=CF_CBOR,
                deadline=30.0,
            )  # fmt: skip
            assert resp.dotted == "5.03" and resp.max_age is not None
    finally:
        storage.close()
