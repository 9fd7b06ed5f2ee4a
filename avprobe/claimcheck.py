"""What the claim fixtures do: gather a model's evidence (store -> engine on a miss -> judge)
and record each claim's verdict with its statistical summary."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import pytest

from avprobe.claim import PROPERTY, ClaimOutcome, part
from avprobe.stats import TestResult
from avprobe.types import Sample

log = logging.getLogger(__name__)


def limit_balanced(samples: Sequence[Sample], n: int | None) -> list[Sample]:
    """The first n samples, half factual and half counterfactual (audio-only kept in
    proportion), so a limited run keeps the paper's shape."""
    if not n or n >= len(samples):
        return list(samples)
    fac = [s for s in samples if s.kind == "factual"]
    cf = [s for s in samples if s.kind == "counterfactual"]
    k = n // 2
    return fac[: n - min(k, len(cf))] + cf[:k]


class ClaimCheck:
    """The `claim` fixture: its row of claims.toml plus `check` / `skip`."""

    def __init__(self, cfg: dict[str, Any], model: str, scope: str, node: Any, session: Any) -> None:
        self.cfg = cfg
        self.id = cfg["id"]
        self.model = model
        self.scope = scope
        self.node = node
        self.session = session
        self.alpha = float(cfg.get("alpha", 0.05))
        self.n_boot = int(cfg.get("n_boot", 2000))
        self.seed = int(cfg.get("seed", 0))
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        try:
            return self.cfg[key]
        except KeyError:
            raise KeyError(f"claims.toml [{self.id}] has no {key!r}") from None

    @property
    def stats_kw(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "n_boot": self.n_boot, "seed": self.seed}

    def _outcome(self, status: str, **kw: Any) -> ClaimOutcome:
        return ClaimOutcome(
            claim_id=self.id,
            model=self.model,
            scope=self.scope,
            status=status,
            statement=self.cfg.get("statement", ""),
            figure=self.cfg.get("figure", ""),
            paper_value=self.cfg.get("paper_value", ""),
            notes=list(self.notes),
            data=dict(self.data),
            **kw,
        )

    def _record(self, outcome: ClaimOutcome) -> None:
        self.node.user_properties.append((PROPERTY, outcome.to_json()))

    def skip(self, reason: str) -> None:
        """Skip with the reason, recorded in the report (a claim that cannot run never passes)."""
        self._record(self._outcome("skipped", skip_reason=reason))
        pytest.skip(reason)

    def check(self, results: dict[str, TestResult] | TestResult, require: str = "all") -> None:
        """Record the verdict and assert it. `results` maps sub-test names to results;
        `require` is "all" (every sub-test must pass) or "any"."""
        if isinstance(results, TestResult):
            results = {self.id: results}
        parts = [part(name, r) for name, r in results.items()]
        flags = [bool(r.passed) for r in results.values()]
        passed = all(flags) if require == "all" else any(flags)
        main = next(iter(results.values()))
        summary = " | ".join(f"{name}: {r.summary()}" for name, r in results.items())
        if self.notes:
            summary += " | " + "; ".join(self.notes)
        outcome = self._outcome(
            "passed" if passed else "failed",
            summary=summary,
            estimate=_num(main.estimate),
            ci=(_num(main.ci_low), _num(main.ci_high)),
            p_value=_num(main.p_value),
            effect=f"{main.effect_name}={main.effect_size:.3g}" if main.effect_name and not math.isnan(main.effect_size) else "",
            n=int(main.n),
            parts=parts,
        )
        self._record(outcome)
        assert passed, f"claim {self.id} not supported on {self.model} [{self.scope}]: {summary}"


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def gather_evidence(session: Any, model: str):
    """Records from the store (computing misses with a progress bar), then judged."""
    from avprobe.collect import DEFAULT_QUERY, Protocol, collect
    from avprobe.evidence import build_evidence
    from avprobe.judge import make_judge
    from avprobe.store import Store
    from avprobe.types import SampleError

    ref = session.ref(model)
    store = Store(session.store_root, readonly=bool(session.opt("offline")))
    protocol = Protocol(queries=ref.settings.queries or (DEFAULT_QUERY,))
    device, dtype = session.opt("device") or "cpu", session.opt("dtype") or "auto"
    base_name = session.opt("base_model") or ref.settings.base_model

    def get_adapter():
        return ref.load(device=device, dtype=dtype, local_files_only=not session.opt("allow_download"))

    def get_base():
        if not base_name:
            log.info("%s: no vision-only base model configured; shift claims will be skipped", model)
            return None
        from avprobe.adapters import ref as make_ref

        return make_ref(base_name).load(device=device, dtype=dtype)

    samples = session.samples()
    records, failed = [], []
    with _progress(f"{model}: collecting", total=len(samples) * len(protocol.queries)) as advance:
        for item in collect(ref, samples, store, protocol, get_adapter=get_adapter, get_base=get_base,
                            refresh=bool(session.opt("refresh")), on_progress=lambda s, what: advance(what)):
            (failed if isinstance(item, SampleError) else records).append(item)
    if not records:
        raise RuntimeError(f"{model}: no results ({len(failed)} samples failed); see the log for the reasons")
    spec = session.opt("judge") or ref.settings.judge or "openai"
    judge_kw = {"cache": store if not store.readonly else None}
    if session.opt("judge_url"):
        judge_kw["base_url"] = session.opt("judge_url")
    judge = make_judge(spec, **judge_kw)
    ev = build_evidence(model, records, judge, failed)
    ev.base_model = base_name
    return ev


class _progress:
    """A rich progress bar that appears only when something is computed."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self.bar = None
        self.task = None
        self.counts = {"cached": 0, "computed": 0, "failed": 0}

    def __enter__(self):
        return self.advance

    def advance(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        if what != "cached" and self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, info="")
        if self.bar is not None:
            done = sum(self.counts.values())
            self.bar.update(self.task, completed=done,
                            info=f"{self.counts['computed']} computed, {self.counts['cached']} cached, "
                                 f"{self.counts['failed']} failed")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
        log.info("%s: %s", self.label, ", ".join(f"{v} {k}" for k, v in self.counts.items()))
