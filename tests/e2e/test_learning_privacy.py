"""No reading and no model input window leaves a device in a training exchange (docs/learning.md,
"Privacy"), with real processes: the endpoint (``edge-agent-cloud serve --insecure``), two agents
on the simulated rig (``edge-agent run --simulate pump``, ``[uplink] security = "none"``) and one
job of one round and the round that checks its model (``edge-agent-cloud learn start``). Plain
CoAP, so that every byte on the wire can be read: both agents talk to the endpoint through the
capturing relay of tests/e2e/test_data_policy.py, which keeps every datagram.

Every datagram is classified by the Uri-Path of its exchange (a request by its own, an answer by
its request's token, an empty ACK by the message ID it acknowledges; only empty datagrams may be
left unclassified). The training exchanges are ``GET /learn/masters/<sha256>`` with its Block2
answers and ``POST /learn/<device>`` (Block1) with its answers, and nothing else is under
``/learn``. The test checks:

- each upload, reassembled, is what the endpoint stored, decodes strictly as a ``ModelUpdate`` of
  the model's parameter count, and its CBOR map has exactly the format's six keys (the check's
  upload: its six, two fractions in place of the delta); the masters of round 1, reassembled,
  are the document built from the shipped float weights alone
  (``models/cloud/skab-ae.float32.tflite``), before any device took part, and the check
  fetches the round's model, which the endpoint stored (the incumbent, round 1's masters, each
  device kept); every block is its
  body's bytes at the block's position, and a training datagram holds no CoAP option but its
  path, content format, Block1/Block2 and Size1/Size2;
- no training datagram, request or answer, any block, holds a value either device measured or
  trained on: every reading of its telemetry as the endpoint stored it, and every value of the
  windows the round trained on. Those are the exact model inputs: the job file an agent hands its
  training process (``learn-<job>-<round>.npz``, deleted after training) is hard-linked away
  while it exists. The byte patterns searched, big- and little-endian:

  - eight bytes, in every byte of every training datagram: each reading as float64; two
    consecutive values as float32, of a window (in the model input's order and along its
    steps) and of the readings (a reading's channels, a channel over time);
  - four bytes, each reading and each window value as float32, in everything but the CoAP
    headers and the two weight vectors (the masters' float32 weights, the update's float16
    delta): the CBOR around the vectors, the other fields, any other payload.

Why single float32 values are not searched in the headers and the vectors: there four given bytes
turn up by chance. The delta is 2,404 float16 values of noise (standard deviation noise x clip),
any four bytes of which are two such values; the masters are 2,404 arbitrary float32 (they are
shown to be the shipped weights instead); a header is option bytes, block numbers, a random token
and message ID. Measured on a captured run with fresh noise and with perturbed values, some single
float32 pattern of this rig's values turned up in the vectors in 0.6 % and 18 % of 4,000 rounds
(in the captured run itself, a window value's big-endian float32 straddled two master weights),
the eight-byte patterns in none of the 8,000 and the four-byte ones outside headers and vectors
in none. A copied window or run of readings holds many eight-byte pairs. Zero is left out of the
single values: its encodings are runs of zero bytes.

Not checked: other encodings (float16, text, scaled integers) and what training derives from the
windows (the update itself, clipped and noised). That is enough given the format: an upload is
exactly six fields, decoded strictly, one of which is the fixed-size float16 delta (one value per
parameter) and the others a count, the seven numbers of a score summary and a loss (the check's
upload: no delta, two fractions of synthetic faults detected): raw data has no field to travel in
but as patterns inside the delta, which the pair search covers.

The checks cannot pass vacuously: the round completed (round 1 closed with the two uploads),
upload datagrams were captured, the same search finds reading values in each device's telemetry
datagrams (SenML in every link state, whose floats are plain CBOR floats) and the window pairs in
the job files.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber as Opt

from agent.learn.masters import load_master_file
from agent.wire.learning import Masters, ModelUpdate, parameter_count
from agent.wire.records import TelemetryBody, decode_body
from cloud.learnjob import masters_of
from cloud.storage import SQLiteStorage
from tests.e2e.test_data_policy import Relay, requests
from tests.e2e.test_learning import ROOT, Agents, _job, _until, cloud, status
from tools.chaos.harness import free_udp_port

pytestmark = pytest.mark.timeout(180)

DEVICES = ("pump-a", "pump-b")
MIN_WINDOWS = 32  # the agents' [learn] min_windows (tests/e2e/test_learning.py sets it)
UPDATE_KEYS = {"job", "round", "samples", "delta", "scores", "loss"}  # the format's six
CHECK_KEYS = {"job", "round", "samples", "scores", "loss", "recall"}  # the check's, no weights
MASTERS = ROOT / "models" / "cloud" / "skab-ae.float32.tflite"
#: Plain CoAP, and SenML in every link state: its floats are plain CBOR floats (the compact
#: encodings deflate), so the search can show that it finds readings in telemetry.
LINK = '\n[link]\ninitial = "high"\n' + "".join(
    f"[link.{state}]\ncontent_format = 112\n" for state in ("medium", "low")
)

#: The options a training datagram may hold: its path, CBOR, block-wise transfer.
OPTIONS = {
    Opt.URI_PATH,
    Opt.CONTENT_FORMAT,
    Opt.ACCEPT,
    Opt.BLOCK1,
    Opt.BLOCK2,
    Opt.SIZE1,
    Opt.SIZE2,
}
Captured = Sequence[tuple[str, bytes, Any]]  # the relay's (direction, datagram, client)


class PlainAgents(Agents):
    """The agents of tests/e2e/test_learning.py, speaking plain CoAP."""

    def setup(self, device: str) -> None:
        super().setup(device)
        path = self.config(device)
        text = path.read_text().replace("\n[learn]\n", '\nsecurity = "none"\n\n[learn]\n', 1)
        assert 'security = "none"' in text  # the [uplink] table ends where [learn] begins
        path.write_text(text + LINK)


class JobFiles(threading.Thread):
    """Keeps the job file of each round (``learn-*.npz``: the windows it trains on) that an agent
    writes, by a hard link made while it exists: the agent deletes it after training."""

    def __init__(self, data_dirs: dict[str, Path], keep: Path) -> None:
        super().__init__(daemon=True)
        self.data_dirs = data_dirs
        self.keep = keep
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for device, data in self.data_dirs.items():
                for f in data.glob("learn-*.npz"):
                    with contextlib.suppress(FileNotFoundError, FileExistsError):
                        os.link(f, self.keep / f"{device}-{f.name}")
            self.done.wait(0.005)


def exchanges(captured: Captured) -> Iterator[tuple[str | None, bytes]]:
    """(Uri-Path of its exchange, datagram) for every captured datagram: a request by its own
    path, an answer by its request's token, an empty ACK or RST by the message ID it answers
    (None if it answers nothing captured: a CoAP ping and its RST, both empty)."""
    by_token: dict[tuple[Any, bytes], str] = {}
    by_mid: dict[tuple[Any, str, int], str | None] = {}
    for direction, data, client in captured:
        msg = Message.decode(data)
        if msg.code.is_request():
            path: str | None = "/".join(msg.opt.uri_path)
            by_token[(client, msg.token)] = path
        elif msg.code != Code.EMPTY:
            path = by_token.get((client, msg.token))
        else:
            path = by_mid.get((client, "down" if direction == "up" else "up", msg.mid))
        by_mid.setdefault((client, direction, msg.mid), path)
        yield path, data


def block2_bodies(captured: Captured, prefix: str) -> Iterator[bytes]:
    """The body of each successful answer to a request whose path starts with ``prefix``, Block2
    reassembled per client (a retransmitted block once)."""
    blocks: dict[Any, dict[int, bytes]] = {}
    seen: set[bytes] = set()
    paths = exchanges(captured)
    for (_, data, client), (path, _) in zip(captured, paths, strict=True):
        msg = Message.decode(data)
        if path is None or not path.startswith(prefix) or data in seen:
            continue
        seen.add(data)
        if not msg.code.is_successful():
            continue
        block = msg.opt.block2
        if block is None:
            yield msg.payload
            continue
        mine = blocks.setdefault(client, {})
        mine[block.block_number] = msg.payload
        if not block.more:
            yield b"".join(mine[i] for i in sorted(mine))
            del blocks[client]


def loose_bytes(
    training: Iterable[tuple[str, bytes]],
    vectors: dict[tuple[bool, str], list[tuple[bytes, bytes]]],
) -> Iterator[bytes]:
    """What the training datagrams carry besides CoAP headers and the weight vectors: each body
    around its vector, and any payload that is not a block of a body (an answer's diagnostic).
    ``vectors`` maps (is a request, path) to the (body, the vector in it) of each exchange on it
    (b"" for a body without a vector); every block is checked to be the bytes at the block's
    position of one of its path's bodies."""
    for body, vector in itertools.chain.from_iterable(vectors.values()):
        start = body.index(vector)
        yield body[:start]
        yield body[start + len(vector) :]
    for path, data in training:
        msg = Message.decode(data)
        if not msg.payload:
            continue
        request = msg.code.is_request()
        if (request, path) not in vectors or not (request or msg.code.is_successful()):
            yield msg.payload
            continue
        block = msg.opt.block1 if request else msg.opt.block2
        off = 0 if block is None else block.start
        bodies = [body for body, _ in vectors[(request, path)]]
        assert any(b[off : off + len(msg.payload)] == msg.payload for b in bodies), path


def singles(values: Iterable[float], formats: str) -> set[bytes]:
    """Each value but zero packed as each struct format in ``formats``, in both byte orders."""
    return {struct.pack(e + f, v) for v in values if v != 0.0 for f in formats for e in "<>"}


def pairs(runs: Iterable[Iterable[float]]) -> set[bytes]:
    """Every two consecutive values of each run as two float32, in both byte orders."""
    return {
        struct.pack(e + "ff", a, b)
        for run in runs
        for a, b in itertools.pairwise(run)
        for e in "<>"
    }


def found(needles: set[bytes], haystacks: Iterable[bytes]) -> set[bytes]:
    """The needles (4 or 8 bytes each) that occur in any of the haystacks."""
    sizes = {len(n) for n in needles}
    runs = {h[i : i + n] for h in haystacks for n in sizes for i in range(len(h) - n + 1)}
    return needles & runs


def readings(bodies: Iterable[TelemetryBody]) -> tuple[list[float], list[list[float]]]:
    """Every value of the readings, and the runs of them a copy would hold (for :func:`pairs`):
    each reading's channels, each channel over time."""
    values: list[float] = []
    runs: list[list[float]] = []
    series: dict[tuple[str, str], list[float]] = {}
    for body in bodies:
        vals = [float(v) for v in body.values.values()]
        values += vals
        runs.append(vals)
        for channel, v in body.values.items():
            series.setdefault((body.sensor, channel), []).append(float(v))
    return values, runs + list(series.values())


def _ready(config: Path) -> bool:
    """The agent holds the normal windows it needs to train."""
    return (status(config).get("learn") or {}).get("windows", 0) >= MIN_WINDOWS


def _serve(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    data = str(tmp / "cloud-data")
    argv = ["serve", "--listen", f"127.0.0.1:{port}", "--data", data, "--insecure"]
    with open(tmp / "endpoint.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", *argv], cwd=ROOT, stdout=log, stderr=log
        )


async def test_no_reading_or_window_leaves_in_a_training_exchange(tmp_path: Path) -> None:
    data = tmp_path / "cloud-data"  # the example config's [models] public_key is beside it
    cloud("models", "keygen", "--data", str(data))
    version = ("--name", "skab-ae", "--version", "1.0.0")
    cloud(
        "models", "publish", str(ROOT / "models" / "skab-ae.tflite"), "--data", str(data), *version
    )
    port = free_udp_port()
    _, relay = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: Relay(("127.0.0.1", port)), local_addr=("127.0.0.1", 0)
    )
    agents = PlainAgents(tmp_path, relay.transport.get_extra_info("sockname")[1])
    for device in DEVICES:
        agents.setup(device)
    keep = tmp_path / "job-files"
    keep.mkdir()
    job_files = JobFiles({d: tmp_path / d for d in DEVICES}, keep)
    agents.procs["endpoint"] = _serve(tmp_path, port)  # stopped with the agents
    try:
        for device in DEVICES:
            agents.start(device)
        await asyncio.gather(
            *(_until(partial(_ready, agents.config(d)), 90, f"{d} ready") for d in DEVICES)
        )
        job_files.start()
        learn = "learn start --model skab-ae --rounds 1 --fraction 1 --min-devices 2 --deadline 25"
        argv = [*learn.split(), "--tick", "0.5", "--data", str(data)]
        ran = await asyncio.to_thread(cloud, *argv, check=False)
        assert ran.returncode == 0, ran.stdout + ran.stderr
    finally:
        job_files.done.set()
        if job_files.is_alive():
            job_files.join()
        agents.stop_all()
        relay.close()

    job = _job(tmp_path)
    assert job is not None and job.st.state == "done", ran.stdout
    # the round, then the round that only checks its model
    assert [(h["round"], h["uploads"]) for h in job.st.history] == [(1, 2), (2, 2)]
    storage = SQLiteStorage.in_dir(data)
    try:
        telemetry = {
            d: [decode_body(r.kind, r.body) for r in storage.records(d) if r.kind == "telemetry"]
            for d in DEVICES
        }
        stored = {
            (device, rnd): body
            for rnd in (1, 2)
            for device, body in storage.learn_updates(job.id, rnd)
        }
        candidate = Masters.from_cbor(storage.learn_blob(job.st.masters) or b"", job.st.masters)
    finally:
        storage.close()
    windows = {}
    for f in keep.iterdir():
        with np.load(f, allow_pickle=False) as z:
            windows[f.name] = (f.read_bytes(), z["windows"].astype(np.float32))
    assert sorted(windows) == [f"{d}-learn-{job.id}-{r}.npz" for d in DEVICES for r in (1, 2)]

    # the training exchanges, and what they carried
    captured = relay.captured
    paths = list(exchanges(captured))
    for path, data_ in paths:  # every datagram is classified, but empty ones (pings)
        assert path is not None or Message.decode(data_).code == Code.EMPTY, data_
    training = [(p, d) for p, d in paths if p is not None and p.startswith("learn/")]
    reference = masters_of(load_master_file(MASTERS), "skab-ae")
    # the masters of round 1 (the shipped weights), then in the check the round's model; the
    # incumbent is round 1's masters, which each device kept and does not fetch again
    fetched = list(block2_bodies(captured, "learn/masters/"))
    assert len(fetched) >= 2 * len(DEVICES)
    assert set(fetched) == {reference.to_cbor(), candidate.to_cbor()}
    weights = {f"learn/masters/{m.sha256()}": m for m in (reference, candidate)}
    uploads: dict[str, set[bytes]] = {}
    for path, _, body in requests(captured):
        if path.startswith("learn/") and path not in weights:
            uploads.setdefault(path, set()).add(body)
    assert {p for p, _ in training} == set(weights) | set(uploads)
    assert sorted(uploads) == [f"learn/{d}" for d in DEVICES]
    posts = [d for p, d in training if p in uploads and Message.decode(d).code == Code.POST]
    assert len(posts) >= 2 * len(DEVICES)  # Block1: several blocks per upload
    vectors = {
        (False, path): [(m.to_cbor(), m.weights.astype("<f4").tobytes())]
        for path, m in weights.items()
    }
    for path, bodies in uploads.items():
        device = path.split("/")[1]
        assert len(bodies) == 2  # one per round: a retried upload is the same bytes
        for body in bodies:
            update = ModelUpdate.from_cbor(body, parameter_count(reference.sizes))
            assert update.job == job.id and body == stored[(device, update.round)]
            if update.round == 1:
                assert set(cbor2.loads(body)) == UPDATE_KEYS
                assert 0 < update.samples <= len(windows[f"{device}-learn-{job.id}-1.npz"][1])
                vector = cbor2.loads(body)["delta"]
            else:  # the check: two fractions, no weights
                assert set(cbor2.loads(body)) == CHECK_KEYS and update.delta is None
                vector = b""
            vectors.setdefault((True, path), []).append((body, vector))

    # the values the devices measured and trained on, and the byte patterns they would leave
    measured = [readings(bodies) for bodies in telemetry.values()]
    values = [v for vals, _ in measured for v in vals]
    trained = [w for _, w in windows.values()]
    window_runs = (
        run.tolist()
        for w in trained
        for run in (*w.reshape(len(w), -1), *w.transpose(0, 2, 1).reshape(-1, w.shape[1]))
    )
    window_pairs = pairs(window_runs)
    one_value = singles([*values, *(float(v) for w in trained for v in np.unique(w))], "f")
    eight_bytes = (
        singles(values, "d") | window_pairs | pairs(r for _, runs in measured for r in runs)
    )

    # the search finds what it looks for where it is
    for device, (vals, _) in zip(DEVICES, measured, strict=True):
        sent = [d for p, d in paths if p == f"ingest/{device}"]
        assert len(vals) > 100 and found(singles(vals, "df"), sent)
    for raw, _ in windows.values():
        assert found(window_pairs, [raw])

    # ... and nowhere in the training exchanges
    for path, data_ in training:  # the headers: only the options of these exchanges
        options = {o.number for o in Message.decode(data_).opt.option_list()}
        assert options <= OPTIONS, (path, options - OPTIONS)
    assert not found(one_value, loose_bytes(training, vectors))
    assert not found(eight_bytes, (d for _, d in training))
