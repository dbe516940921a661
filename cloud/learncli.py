"""``edge-agent-cloud learn start|resume|status|stop``: federated training jobs (cloud/learning.py,
docs/learning.md).

``learn start`` records a job and runs its coordinator in the foreground until the job ends
(Ctrl-C leaves it where it is: ``learn resume JOB`` goes on, from storage). It needs the model
signing key (each round publishes a signed version) and the float master weights of the base
version (``--masters``: a float32 TFLite file; default the shipped ``models/cloud/<model>.float32
.tflite``). ``learn status`` prints jobs (one, or all) with their rounds, as text or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.exits import EX_DATAERR, EX_NOINPUT, EX_OK, EX_SOFTWARE, CommandError
from agent.learn.autoencoder import DenseAutoencoder
from cloud import tflitepatch
from cloud.learning import MAX_ATTEMPTS, Coordinator
from cloud.learnjob import DamagedJob, Job, JobError, JobSpec, UnknownJob, out_counts

REPO_MODELS = Path(__file__).resolve().parent.parent / "models" / "cloud"


def add_parser(sub: Any, open_storage: Any, signing_key: Any) -> None:
    """The ``learn`` subcommand; ``open_storage(data, existing=, storage=)`` and
    ``signing_key(args)`` are cloud/cli.py's (passed in: it imports this module)."""
    p = sub.add_parser("learn", help="federated training jobs (docs/learning.md)")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("start", help="start a job and run its rounds (foreground)")
    q.add_argument("--data", required=True)
    q.add_argument("--model", required=True, help="a published model (its int8 file is the graph)")
    q.add_argument("--version", help="the version to start from (default: the newest)")
    q.add_argument("--role", default="anomaly", help="the slot new versions are assigned to")
    q.add_argument("--masters", help="float32 TFLite of that version (default: models/cloud/)")
    q.add_argument("--rounds", type=int, default=3)
    q.add_argument("--fraction", type=float, default=0.5, help="of eligible devices per round")
    q.add_argument("--min-devices", type=int, default=2, help="uploads a round needs")
    q.add_argument("--deadline", type=float, default=600.0, help="seconds a round stays open")
    q.add_argument("--devices", help="comma-separated eligible devices (default: all)")
    q.add_argument("--epochs", type=int, default=JobSpec.epochs)
    q.add_argument("--lr", type=float, default=JobSpec.lr)
    q.add_argument("--mu", type=float, default=JobSpec.mu, help="FedProx proximal weight")
    q.add_argument("--clip", type=float, default=JobSpec.clip, help="L2 bound of an update")
    q.add_argument("--noise", type=float, default=JobSpec.noise, help="noise multiplier")
    q.add_argument(
        "--no-gate",
        dest="gate",
        action="store_false",
        help="assign each round's model without the check (devices older than the check)",
    )
    q.add_argument(
        "--check-tolerance",
        type=float,
        default=JobSpec.tolerance,
        help="how much lower a model's median recall of synthetic faults may be and pass",
    )
    q.add_argument("--key", help="signing key (default: DIR/models/signing.key)")
    q.add_argument("--tick", type=float, default=1.0, help=argparse.SUPPRESS)
    q.add_argument("--detach", action="store_true", help="record the job; run it with resume")
    q = dsub.add_parser("resume", help="run a job's coordinator again (foreground)")
    q.add_argument("job", type=int)
    q.add_argument("--data", required=True)
    q.add_argument("--key", help="signing key (default: DIR/models/signing.key)")
    q.add_argument("--tick", type=float, default=1.0, help=argparse.SUPPRESS)
    q = dsub.add_parser("status", help="jobs and their rounds")
    q.add_argument("job", type=int, nargs="?")
    q.add_argument("--data", required=True)
    q.add_argument("--json", action="store_true")
    q = dsub.add_parser("stop", help="stop a running job (no further rounds)")
    q.add_argument("job", type=int)
    q.add_argument("--data", required=True)
    p.set_defaults(func=cmd_learn, open_storage=open_storage, signing_key=signing_key)


def _newest(storage: Any, model: str) -> str:
    found = storage.models(model)
    if not found:
        raise CommandError(EX_NOINPUT, f"error: no published versions of {model}")
    return max(found, key=lambda m: m.published).version


def _masters(args: argparse.Namespace) -> DenseAutoencoder:
    path = Path(args.masters) if args.masters else REPO_MODELS / f"{args.model}.float32.tflite"
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CommandError(
            EX_NOINPUT, f"error: {path}: {err.strerror}; give --masters FLOAT32_TFLITE"
        ) from None
    try:
        layers = tflitepatch.read_float_layers(data, label=str(path))
    except ModelError as err:
        raise CommandError(EX_DATAERR, f"error: {err}") from None
    return DenseAutoencoder(tuple(w for w, _ in layers), tuple(b for _, b in layers))


def _print(job: Job) -> None:
    st, spec = job.st, job.spec
    where = (
        f"round {st.round}/{spec.rounds}"
        if st.round <= spec.rounds
        else f"round {st.round}, the check of round {spec.rounds}'s model"
    ) + (" open" if st.open else "")
    if st.open and st.attempt:
        where += f" (attempt {st.attempt + 1} of {MAX_ATTEMPTS})"
    if st.out and st.open:
        where += f", {_out_text(out_counts(st.out), len(st.selected))}"
    print(
        f"job {job.id} {spec.model} from {spec.base}: {st.state}, {where}"
        + (f", model {st.version}" if st.version else "")
        + (f": {st.error}" if st.error else "")
    )
    for h in st.history:
        parts = _round_parts(h, spec.rounds, bool(st.incumbent))
        print(f"  round {h['round']}: " + ", ".join(parts))


def _round_parts(h: dict[str, Any], rounds: int, checked: bool) -> list[str]:
    """What ``learn status`` says of one closed round (a history entry, cloud/learning.py)."""
    parts = [f"{h['uploads']}/{h['selected']} uploads", f"{h['samples']} windows"]
    check = h.get("check")
    if check is not None:
        verdict = "passed" if check["passed"] else "FAILED"
        found = "no device answered"
        if check["margin"] is not None:
            found = (
                f"faults detected {check['recall']:.3f} against {check['recall_incumbent']:.3f} "
                f"for the model the fleet runs, median margin {check['margin']:+.3f} over "
                f"{check['devices']} devices"
            )
        parts.append(
            f"round {check['round']}'s model {verdict} the check ({found})"
            + ("" if check["passed"] else ": not assigned")
        )
    if "version" in h:
        parts.append(f"assigned {h['version']} (threshold {h['threshold']:.4g})")
    if h.get("dropped"):
        parts.append("trained from a model that failed the check: dropped")
    elif checked and h["round"] <= rounds:
        parts.append("its model checked by the next round")
    for r in h.get("reopened", []):  # the attempts before the one that closed
        when = "before the deadline" if r["early"] else "at the deadline"
        parts.append(
            f"attempt {r['attempt'] + 1} ended {when} with {r['uploads']} "
            + ("upload" if r["uploads"] == 1 else "uploads")
            + (f", {_out_text(r['out'])}" if r["out"] else "")
        )
    if h.get("out"):
        early = ": closed before the deadline" if h.get("early") else ""
        parts.append(_out_text(h["out"], h["selected"]) + early)
    if h["missing"]:
        parts.append(f"missing {','.join(h['missing'])}")
    return parts


def _out_text(counts: dict[str, int], selected: int | None = None) -> str:
    """``3/10 selected out (refused 2, not_applied 1)``: devices that said they will not
    upload, by why (cloud/learnjob.py out_of_round)."""
    n = sum(counts.values())
    of = f"{n}/{selected} selected" if selected is not None else f"{n} selected devices"
    return f"{of} out (" + ", ".join(f"{why} {k}" for why, k in counts.items()) + ")"


def _summary(job: Job | DamagedJob) -> dict[str, Any]:
    """A job's entry in ``learn status --json`` (a damaged one: its number and the error)."""
    if isinstance(job, DamagedJob):
        return {"job": job.job, "error": str(job)}
    return job.summary()


def cmd_learn(args: argparse.Namespace) -> int:
    from agent.modelstore.signing import load_private_key
    from cloud.models import Direct, ModelRegistry

    storage = args.open_storage(args.data, existing=True, storage=args.storage)
    try:
        if args.action == "status":
            rows = [r for r in storage.learn_jobs() if args.job is None or r.id == args.job]
            if args.job is not None and not rows:
                raise CommandError(EX_NOINPUT, f"error: no learning job {args.job}")
            jobs: list[Job | DamagedJob] = []
            for row in rows:
                try:
                    jobs.append(Job.from_row(row))
                except DamagedJob as err:  # said, and the others printed
                    jobs.append(err)
            if args.json:
                json.dump([_summary(j) for j in jobs], sys.stdout, indent=2)
                print()
            for j in [] if args.json else jobs:
                if isinstance(j, DamagedJob):
                    print(f"error: {j}", file=sys.stderr)
                else:
                    _print(j)
            return EX_DATAERR if any(isinstance(j, DamagedJob) for j in jobs) else EX_OK
        if args.action == "stop":
            _print(Coordinator(storage).stop(args.job))
            return EX_OK
        try:
            key = load_private_key(args.signing_key(args))
        except (OSError, ValueError, ModelError) as err:
            raise CommandError(EX_NOINPUT, f"error: signing key: {err}") from None
        registry = ModelRegistry(Path(args.data) / "models", args.storage and Direct(storage))
        coordinator = Coordinator(storage, registry, key)
        if args.action == "start":
            spec = JobSpec(
                model=args.model,
                role=args.role,
                base=args.version or _newest(storage, args.model),
                rounds=args.rounds,
                fraction=args.fraction,
                min_devices=args.min_devices,
                round_seconds=args.deadline,
                epochs=args.epochs,
                lr=args.lr,
                mu=args.mu,
                clip=args.clip,
                noise=args.noise,
                gate=args.gate,
                tolerance=args.check_tolerance,
                devices=tuple(d for d in (args.devices or "").split(",") if d),
            )
            job = coordinator.start(spec, _masters(args))
            print(f"job {job.id} started: {spec.model} from {spec.base}, {spec.rounds} rounds")
            if args.detach:
                return EX_OK
            job_id = job.id
        else:
            job_id = coordinator.job(args.job).id
        seen: list[tuple[int, bool, int]] = []

        def progress(j: Job) -> None:
            mark = (j.st.round, j.st.open, len(j.st.history))
            if not seen or seen[-1] != mark:
                seen.append(mark)
                _print(j)

        final = coordinator.run(job_id, args.tick, progress)
        return EX_OK if final.st.state == "done" else EX_SOFTWARE
    except JobError as err:
        code = EX_NOINPUT if isinstance(err, UnknownJob) else EX_DATAERR
        raise CommandError(code, f"error: {err}") from None
    finally:
        storage.close()
