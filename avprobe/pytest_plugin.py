"""avprobe's pytest plugin: options in one group, thin fixtures; the work lives in avprobe.

Loaded by the checkout's root conftest.py (not a pytest11 entry point), so an installed
avprobe adds nothing to other projects' pytest runs.

    pytest claims/ --model qwen2.5-omni-3b            # a reproducibility report
    pytest claims/ --model organism --model organism-control --report reports/claims.html

Claim tests ask for `evidence` (one model's results; parametrised over --model, and over
the model's queries where the test asks for `query`), for `evidence_of` (the results of any
--model, for claims across models, with `model_pair`) and for `claim` (its row of
claims/claims.toml; `claim.check(...)` records the outcome and asserts with the statistical
summary). The results come from `avprobe.pipeline.gather`, the orchestration that
`avprobe collect` runs too. Imports nothing heavy at load time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

_DEFAULT_MODEL = "organism"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("avprobe", "avprobe claims")
    g.addoption("--model", action="append", default=None,
                help="model alias, HF id or local path (repeatable for a cross-model run; default: organism)")
    g.addoption("--base-model", default=None,
                help="shift base(s): a vision-only model, self-ablated (the model itself with the audio removed), "
                     "or M,self-ablated for both (default: the model's own setting)")
    g.addoption("--max-new-tokens", type=int, default=None,
                help="caption length of computed results (default: the protocol's, 32; another length is "
                     "another protocol, stored apart)")
    g.addoption("--judge", default=None, help="fidelity judge spec: concept | openai[:MODEL] | transformers:PATH | embedding")
    g.addoption("--judge-url", default=None, help="base URL of an OpenAI-compatible judge endpoint")
    g.addoption("--samples", default=None, help="manifest (JSONL/CSV); default: the organism evaluation set")
    g.addoption("--limit", type=int, default=None, help="use N samples (half factual, half counterfactual)")
    g.addoption("--refresh", action="store_true", help="recompute cached results")
    g.addoption("--offline", action="store_true", help="never compute: a cache miss is an error naming what is missing")
    g.addoption("--store", default=None, help="result store directory (default: fixtures/ of the project)")
    g.addoption("--report", default=None, help="write the HTML claim report here")
    g.addoption("--ratings", default=None, help="human ratings CSV for the judge_validity claim")
    g.addoption("--device", default="cpu", help="torch device for computing missing results")
    g.addoption("--dtype", default="auto", help="torch dtype for computing missing results")
    g.addoption("--allow-download", action="store_true", help="let transformers download missing weights")
    g.addoption("--clips-per-batch", default="auto",
                help="records computed in one batched decode (1 = the one-clip engine; default auto: by memory)")
    g.addoption("--verdicts", default=None,
                help="directory of expected verdicts (<model>.json): a claim whose verdict is unchanged passes "
                     "(an expected failure shows as xfail), a moved verdict fails; missing files are written")
    g.addoption("--verdicts-regen", action="store_true", help="rewrite the expected verdict files from this run")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "claim(id): a test of one claim of claims/claims.toml (carries the citation)")
    limit = config.getoption("limit", None)
    if limit is not None and limit < 1:
        raise pytest.UsageError(f"--limit must be a positive number of samples, got {limit}")
    from avprobe.pipeline.gather import clips_per_batch

    try:
        clips_per_batch(config.getoption("clips_per_batch", "auto"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    config._avprobe = Session(config)  # type: ignore[attr-defined]


def _session(config: pytest.Config) -> Session:
    return config._avprobe  # type: ignore[attr-defined]


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    s = _session(config)
    if not s.active:
        return None
    revisions = []
    for m in s.models:
        try:
            r = s.ref(m)
            revisions.append(f"{m}@{r.revision} ({r.n_layers} layers)")
        except Exception as exc:  # noqa: BLE001 - the evidence fixture reports it in full
            revisions.append(f"{m} (unresolved: {type(exc).__name__})")
    return [
        f"avprobe: models={', '.join(revisions)} base={s.opt('base_model') or '(model default)'} "
        f"judge={s.opt('judge') or '(model default)'}",
        f"avprobe: samples={s.opt('samples') or 'organism evaluation set'} limit={s.opt('limit')} "
        f"store={s.store_root} offline={s.opt('offline')} refresh={s.opt('refresh')} seed={s.seed}",
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    s = _session(metafunc.config)
    names = metafunc.fixturenames
    if "model_pair" in names:
        pairs = [(a, b) for i, a in enumerate(s.models) for b in s.models[i + 1 :]]
        metafunc.parametrize("model_pair", pairs or [None], ids=[f"{a}-vs-{b}" for a, b in pairs] or ["single-model"])
    elif "model_name" in names:
        if "query" in names:
            combos = [(m, q) for m in s.models for q in s.queries(m)]
            metafunc.parametrize(("model_name", "query"), combos, ids=[f"{m}-{_qid(q)}" for m, q in combos])
        else:
            metafunc.parametrize("model_name", s.models)


def _qid(query: str) -> str:
    words = query.lower().split()
    order = [w for w in words if w in ("see", "hear")]
    return "-".join(order) or "query"


@pytest.fixture
def evidence(request: pytest.FixtureRequest, model_name: str):
    """One model's stored results with judged fidelities (computed on a cache miss). A model
    that cannot be resolved or a store that lacks results is one message, not a traceback."""
    from avprobe.pipeline.gather import GatherError
    from avprobe.store import StoreError

    try:
        return _session(request.config).evidence(model_name)
    except (FileNotFoundError, ValueError, GatherError, StoreError) as exc:
        msg = str(exc)
        pytest.fail(msg if msg.startswith(model_name) else f"{model_name}: {msg}", pytrace=False)


@pytest.fixture
def evidence_of(request: pytest.FixtureRequest):
    """`evidence_of(model)`: the results of any --model (claims that compare models)."""
    return _session(request.config).evidence


@pytest.fixture
def claim(request: pytest.FixtureRequest):
    from avprobe.claim import PROPERTY, ClaimCheck, claims_table

    marker = request.node.get_closest_marker("claim")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses the claim fixture without @pytest.mark.claim(id)")
    cid = marker.args[0]
    table = claims_table()
    if cid not in table:
        raise pytest.UsageError(f"claim {cid!r} is not in claims/claims.toml")
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    model = params.get("model_name", "")
    # a shift base other than the vision-only sibling names itself (the sibling's keys predate bases)
    scope = " ".join(str(params[k]) if k != "query" else _qid(params[k])
                     for k in ("query", "scope", "shift_base")
                     if k in params and not (k == "shift_base" and params[k] == "vision")) or "all samples"
    node = request.node
    return ClaimCheck(table[cid], model=model, scope=scope,
                      record=lambda value: node.user_properties.append((PROPERTY, value)), on_skip=pytest.skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    s = _session(item.config)
    if rep.when != "call" or not s.opt("verdicts") or s.opt("verdicts_regen"):
        return
    from avprobe.claim import PROPERTY, ClaimOutcome

    for name, value in item.user_properties:
        if name != PROPERTY:
            continue
        o = ClaimOutcome.from_json(value)
        expected = s.expected_verdict(o)
        # JUnit: pytest writes an xfail and a skip both as <skipped> (told apart only by its
        # type attribute); this property names the verdict against the expected one outright.
        # (junitxml writes the properties the item holds at teardown)
        item.user_properties.append((VERDICT_PROPERTY, _junit_verdict(o.status, expected)))
        if expected is None or o.status == "skipped":
            return
        if o.status == "failed" and expected == "failed":
            rep.outcome = "skipped"
            rep.wasxfail = f"expected verdict unchanged: {o.claim_id} not supported on {o.model}"
        elif o.status != expected:
            rep.outcome = "failed"
            rep.longrepr = (f"verdict moved: {o.claim_id} [{o.scope}] on {o.model} was {expected}, now {o.status}\n"
                            f"{o.summary}")
        return


VERDICT_PROPERTY = "avprobe_verdict"


def _junit_verdict(status: str, expected: str | None) -> str:
    """passed | failed | skipped, or against an expected verdict: xfailed (expected failure,
    unchanged), expected-pass, skipped (was <expected>) or moved (was X, now Y)."""
    if expected is None:
        return status
    if status == "skipped":
        return f"skipped (expected {expected})"
    if status == expected:
        return "xfailed" if status == "failed" else "passed (as expected)"
    return f"moved (was {expected}, now {status})"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    s = _session(config)
    outcomes = s.collected_outcomes(terminalreporter)
    report = config.getoption("report")
    if not outcomes:
        if report and s.active:
            # every claim errored before recording a verdict: say so where the report was asked for
            from avprobe.report.html import write_report

            path = write_report(Path(report), [], {}, run=s.run_settings())
            terminalreporter.write_line(f"avprobe: no claim recorded a verdict (see the errors above); "
                                        f"report written to {path}")
        return
    from avprobe.report.terminal import summary_table

    terminalreporter.write_line("")
    terminalreporter.write(summary_table(outcomes))
    if s.opt("verdicts") and not hasattr(config, "workerinput"):
        for line in s.write_verdicts(outcomes):
            terminalreporter.write_line(line)
    if report:
        from avprobe.report.html import write_report

        path = write_report(Path(report), outcomes, s.evidences_for_report(), run=s.run_settings())
        terminalreporter.write_line(f"avprobe: claim report written to {path}")


def _in_claims(arg: str) -> bool:
    """Whether a command-line path (or node id) lies in the claims directory."""
    from avprobe.claim import CLAIMS_TOML

    try:
        path = Path(str(arg).split("::", 1)[0]).resolve()
    except (OSError, ValueError):
        return False
    claims = CLAIMS_TOML.parent.resolve()
    return path == claims or claims in path.parents


class Session:
    """Per-process state: options, the store, and one Evidence per model (lazily built)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.active = bool(config.getoption("model", None)) or any(_in_claims(a) for a in config.args)
        self.models: list[str] = config.getoption("model", None) or [_DEFAULT_MODEL]
        self.seed = 0
        root = Path(str(config.rootpath))
        self.store_root = Path(self.opt("store") or root / "fixtures")
        self._evidence: dict[str, Any] = {}
        self._samples: tuple[list[Any], list[Any]] | None = None
        self._refs: dict[str, Any] = {}
        self._expected: dict[str, dict[str, str]] = {}

    def opt(self, name: str) -> Any:
        return self.config.getoption(name, None)

    def ref(self, model: str):
        if model not in self._refs:
            from avprobe.adapters import ref

            self._refs[model] = ref(model, local_files_only=not self.opt("allow_download"))
        return self._refs[model]

    def queries(self, model: str) -> list[str]:
        from avprobe.records import DEFAULT_QUERY

        try:
            return list(self.ref(model).settings.queries or (DEFAULT_QUERY,))
        except Exception:  # noqa: BLE001 - reported when the evidence fixture loads
            return [DEFAULT_QUERY]

    def samples(self) -> tuple[list[Any], list[Any]]:
        """(samples, bad manifest rows), as `avprobe collect --samples` reads them."""
        if self._samples is None:
            from avprobe.pipeline.gather import load_samples

            self._samples = load_samples(self.opt("samples") or "organism", self.opt("limit"))
        return self._samples

    def evidence(self, model: str):
        """One model's Evidence, gathered once per session (store, engine on a miss, judge).
        A failure is kept too: every test of that model reports it, none retries the load."""
        if model not in self._evidence:
            try:
                self._evidence[model] = self._gather(model)
            except Exception as exc:  # noqa: BLE001 - re-raised, the same, for each test
                self._evidence[model] = exc
        got = self._evidence[model]
        if isinstance(got, Exception):
            raise got
        return got

    def _gather(self, model: str):
        from avprobe.pipeline.gather import gather_evidence

        # pytest captures output during fixture setup: show the progress bar anyway
        capman = self.config.pluginmanager.getplugin("capturemanager")
        quiet = (capman.global_and_fixture_disabled if capman is not None else None)
        return gather_evidence(
            model, store_root=self.store_root, samples=self.opt("samples"), limit=self.opt("limit"),
            loaded_samples=self.samples(), judge=self.opt("judge"), judge_url=self.opt("judge_url"),
            base_model=self.opt("base_model"), offline=bool(self.opt("offline")), device=self.opt("device") or "cpu",
            dtype=self.opt("dtype") or "auto", allow_download=bool(self.opt("allow_download")),
            refresh=bool(self.opt("refresh")), quiet=quiet, clips_per_batch=self.opt("clips_per_batch") or "auto",
            max_new_tokens=self.opt("max_new_tokens"))

    def run_settings(self) -> dict[str, Any]:
        """What `avprobe report` needs to read the same results again (kept in claims.json)."""
        return {"models": list(self.models), "store": str(self.store_root), "samples": self.opt("samples"),
                "limit": self.opt("limit"), "judge": self.opt("judge"), "judge_url": self.opt("judge_url"),
                "base_model": self.opt("base_model"), "verdicts": self.opt("verdicts"),
                "offline": bool(self.opt("offline"))}

    def collected_outcomes(self, terminalreporter: Any) -> list[Any]:
        from avprobe.claim import PROPERTY, ClaimOutcome

        out, seen = [], set()
        for reports in terminalreporter.stats.values():
            for rep in reports:
                if getattr(rep, "when", "call") not in ("call", "setup"):
                    continue
                for name, value in getattr(rep, "user_properties", []):
                    if name == PROPERTY and value not in seen:
                        seen.add(value)
                        o = ClaimOutcome.from_json(value)
                        if self.opt("verdicts") and not self.opt("verdicts_regen"):
                            o.expected = self.expected_verdict(o)
                        out.append(o)
        return out

    def _verdict_file(self, model: str) -> Path:
        from avprobe.records import verdict_file

        return verdict_file(self.opt("verdicts"), model)

    def expected_verdict(self, outcome: Any) -> str | None:
        import json

        f = self._verdict_file(outcome.model)
        if not f.is_file():
            return None
        table = self._expected.setdefault(outcome.model, json.loads(f.read_text()))
        return table.get(f"{outcome.claim_id}[{outcome.scope}]")

    def write_verdicts(self, outcomes: list[Any]) -> list[str]:
        """Write expected-verdict files that are missing (or all, with --verdicts-regen)."""
        import json

        lines = []
        by_model: dict[str, dict[str, str]] = {}
        for o in outcomes:
            by_model.setdefault(o.model, {})[f"{o.claim_id}[{o.scope}]"] = o.status
        for model, table in by_model.items():
            f = self._verdict_file(model)
            if f.is_file() and not self.opt("verdicts_regen"):
                continue
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
            lines.append(f"avprobe: wrote expected verdicts of {model} to {f}")
        return lines

    def evidences_for_report(self) -> dict[str, Any]:
        """Evidence of every model, from the store (under xdist the controller reads what the
        workers stored; nothing is recomputed)."""
        out = {}
        for m in self.models:
            try:
                out[m] = self.evidence(m)
            except Exception as exc:  # noqa: BLE001 - the report still shows the verdicts
                log.warning("report: no evidence for %s: %s", m, exc)
        return out
