"""The running agent as state sync sees it: what is reported, and how desired keys are applied.

:class:`AgentHooks` implements :class:`agent.sync.statedata.StateHooks` over the runtime's stages
(the sampler, the queue, the link monitor, the analyzer and the model assignments).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from agent.sync.statedata import error_text, model_name

log = logging.getLogger(__name__)


class AgentHooks:
    """:class:`StateHooks` over the running agent's parts (built by :mod:`agent.service.runtime`).

    Reported: ``agent/version``; per sensor its ``health`` and the ``enabled`` flag and
    ``interval`` in effect; ``queue/depth``; ``link/state`` (``link/rtt_ms`` and ``link/loss``
    once measured); ``model/<slot>`` from the analyzer's ``models()``; ``detect/<model>/threshold``
    once one was set. Applied live: ``sensor/<name>/interval`` and ``sensor/<name>/enabled`` on
    the sampler (the other sensors go on untouched; unset goes back to the config file's interval,
    or to enabled), and ``detect/<model>/threshold`` through the analyzer's ``set_threshold``.
    With ``models`` (the runtime's model assignments: ``apply(role, value)`` checks the value and
    starts the assignment in the background; ``reported()`` gives ``{"model/<role>": report}``),
    ``model/<role>`` is applied too and its report (active, or failed with the desired version)
    is merged over the analyzer's view. With ``learner`` (agent/learn/client.py), ``learn/<model>``
    (a federated round's task) is applied and reported. With ``commands``
    (agent/service/commands.py), ``command/<name>`` is run once per id and its outcome reported.
    With ``updates`` (agent/ota/controller.py), ``agent/version`` stages a signed release.
    Every other key is refused.
    """

    def __init__(
        self,
        sampler: Any,
        *,
        version: str,
        queue_depth: Callable[[], int | None],
        link: Callable[[], Mapping[str, Any]],
        analyzer: Callable[[], Any] = lambda: None,
        models: Any = None,
        learner: Any = None,
        commands: Any = None,
        updates: Any = None,
    ) -> None:
        self.sampler = sampler
        self.version = version
        self.queue_depth = queue_depth
        self.link = link
        self.analyzer = analyzer
        self.models = models
        self.learner = learner  # agent.learn.client.LearningClient: learn/<model>
        self.commands = commands  # agent.service.commands.CommandRunner: command/<name>
        self.updates = updates  # agent.ota.controller.UpdateController: agent/version
        self._thresholds: dict[str, float] = {}

    def reported(self) -> dict[str, Any]:
        out: dict[str, Any] = {"agent/version": self.version}
        for name, task in self.sampler.tasks.items():
            out[f"sensor/{name}/health"] = task.health.state.value
            out[f"sensor/{name}/enabled"] = task.enabled
            out[f"sensor/{name}/interval"] = task.interval
        depth = self.queue_depth()
        if depth is not None:
            out["queue/depth"] = depth
        link = self.link()
        if link.get("state") is not None:
            out["link/state"] = link["state"]
        if link.get("rtt_ms") is not None:
            out["link/rtt_ms"] = round(float(link["rtt_ms"]), 1)
        if link.get("loss") is not None:
            out["link/loss"] = round(float(link["loss"]), 3)
        for slot, info in self._models().items():
            report = _model_report(info)
            if report is not None:
                out[f"model/{slot}"] = report
        if self.models is not None:  # the assignment's view wins (status, desired, error)
            for key, report in self.models.reported().items():
                out[key] = {**out.get(key, {}), **report}
        for model, value in self._thresholds.items():
            out[f"detect/{model}/threshold"] = value
        if self.learner is not None:
            out.update(self.learner.reported())
        if self.commands is not None:
            out.update(self.commands.reported())
        if self.updates is not None:
            out.update(self.updates.reported())
        return out

    def apply(self, key: str, value: Any) -> None:
        kind, _, rest = key.partition("/")
        name, _, leaf = rest.rpartition("/")
        if kind == "sensor" and leaf in ("interval", "enabled"):
            task = self.sampler.tasks.get(name)
            if task is None:
                known = ", ".join(sorted(self.sampler.tasks))
                raise ValueError(f"no sensor named {name!r} in this agent's config ({known})")
            if leaf == "interval":
                seconds = task.cfg.interval if value is None else float(value)
                self.sampler.set_interval(name, seconds)
            else:
                self.sampler.set_enabled(name, True if value is None else bool(value))
            return
        if kind == "detect" and leaf == "threshold" and name:
            self._set_threshold(name, value)
            return
        if kind == "model" and self.models is not None:
            self.models.apply(rest, value)  # checked here; fetched and swapped in a task
            return
        if kind == "learn" and self.learner is not None and rest:
            self.learner.apply(rest, value)
            return
        if kind == "command" and self.commands is not None and rest:
            self.commands.apply(rest, value)
            return
        if key == "agent/version" and self.updates is not None:
            self.updates.apply(value)  # checked here; staged in the controller's task
            return
        also = ", model/<role>" if self.models is not None else ""
        also += ", learn/<model>" if self.learner is not None else ""
        also += ", agent/version" if self.updates is not None else ""
        raise ValueError(
            f"{key}: this agent applies only sensor/<name>/interval, sensor/<name>/enabled"
            f"{also} and detect/<model>/threshold"
        )

    def _set_threshold(self, model: str, value: Any) -> None:
        analyzer = self.analyzer()
        if analyzer is None or not callable(getattr(analyzer, "set_threshold", None)):
            raise ValueError("no detector runs on this agent: there is no threshold to set")
        models = self._models()
        names = {str(slot) for slot in models}
        names |= {v if isinstance(v, str) else model_name(v) or "" for v in models.values()}
        names.discard("")
        if models and model not in names:
            raise ValueError(f"no model {model!r} runs here ({', '.join(sorted(names))})")
        analyzer.set_threshold(None if value is None else float(value))  # None: calibrated
        if value is None:
            self._thresholds.pop(model, None)
        else:
            self._thresholds[model] = float(value)

    def _models(self) -> dict[str, Any]:
        models = getattr(self.analyzer(), "models", None)
        if not callable(models):
            return {}
        try:
            return dict(models())
        except Exception as err:  # a status read must never stop the reports
            log.warning("event=models_unreadable error=%r", error_text(err))
            return {}


def _model_report(info: Any) -> dict[str, Any] | None:
    """A ``model/<slot>`` report from what the analyzer says of a slot: a name, or a dict with
    ``name`` (``sha256``, ``active``: the one in use, ``status``, ``desired``, ``error``)."""
    if isinstance(info, str):
        return {"name": info, "status": "active"}
    if not isinstance(info, Mapping):
        return None
    report = {k: info[k] for k in ("name", "sha256", "status", "desired", "error") if k in info}
    report.setdefault("status", "active")  # loaded and ready
    if isinstance(info.get("active"), bool):
        report["in_use"] = info["active"]
    return report
