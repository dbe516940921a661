"""The training process of a round: ``python -m agent.learn.worker JOB_FILE OUT_FILE``.

The agent never trains in its own process: numpy's training loop would hold the GIL between
minibatches and delay the event loop that samples and scores. :class:`agent.learn.client.
LearningClient` writes the job (an ``.npz``: masters, layer widths, windows, the round task as
CBOR, a seed drawn from OS entropy) and starts this module, which

- lowers its own priority to nice 19 (it runs when the agent does not need the CPU),
- limits its address space to ``--memory-mb`` (a job that would need more fails, the agent
  does not),
- runs :func:`agent.learn.local.local_update` and writes the upload (ModelUpdate CBOR) to
  ``OUT_FILE`` atomically (a temporary file, fsync, rename).

The agent pauses it under load with SIGSTOP/SIGCONT and kills it at the round's deadline.
Exit status: 0 written, 65 (EX_DATAERR) the job does not decode or has nothing to train on,
70 (EX_SOFTWARE) anything else (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent.wire.records import dumps, loads

EX_DATAERR, EX_SOFTWARE = 65, 70


def _limit(memory_mb: int) -> None:
    try:
        os.nice(19)
    except OSError:
        pass
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):
        pass


def write_job(
    path: Path,
    masters: object,
    sizes: tuple[int, ...],
    windows: object,
    task: dict,
    seed: int,
    incumbent: object = None,
) -> None:
    """The job file the worker reads (numpy arrays, no pickle); ``incumbent``: the weights a
    checked round compares the masters with (same widths), None when it checks nothing."""
    import numpy as np

    with open(path, "wb") as f:
        np.savez(
            f,
            masters=np.asarray(masters, dtype=np.float32),
            incumbent=np.asarray([] if incumbent is None else incumbent, dtype=np.float32),
            sizes=np.asarray(sizes, dtype=np.int64),
            windows=np.asarray(windows, dtype=np.float32),
            task=np.frombuffer(dumps(task), dtype=np.uint8),
            seed=np.asarray([seed], dtype=np.uint64),
        )


def run(job: Path, out: Path) -> int:
    import numpy as np

    from agent.learn.autoencoder import DenseAutoencoder
    from agent.learn.local import local_update
    from agent.wire.learning import LearningError, RoundTask

    try:
        with np.load(job, allow_pickle=False) as z:
            sizes = tuple(int(v) for v in z["sizes"])
            masters = DenseAutoencoder.from_vector(z["masters"].astype(np.float32), sizes)
            raw = z["incumbent"].astype(np.float32)
            incumbent = DenseAutoencoder.from_vector(raw, sizes) if raw.size else None
            windows = z["windows"].astype(np.float32)
            task = RoundTask.from_value(loads(bytes(z["task"]), max_depth=2))
            seed = int(z["seed"][0])
        rng = np.random.default_rng(seed)
        update = local_update(masters, windows, task, rng, incumbent=incumbent)
    except (OSError, ValueError, KeyError, LearningError) as err:
        print(f"learn worker: {err}", file=sys.stderr)
        return EX_DATAERR
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(update.to_cbor())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.learn.worker")
    p.add_argument("job", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--memory-mb", type=int, default=384)
    args = p.parse_args(argv)
    _limit(args.memory_mb)
    try:
        return run(args.job, args.out)
    except MemoryError:
        print(f"learn worker: more than {args.memory_mb} MB needed", file=sys.stderr)
        return EX_SOFTWARE
    except Exception as err:  # one line, never a traceback in the agent's journal
        print(f"learn worker: {type(err).__name__}: {err}", file=sys.stderr)
        return EX_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
