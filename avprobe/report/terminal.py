"""The rich summary table printed at the end of a claims run."""

from __future__ import annotations

import io

from avprobe.claim import ClaimOutcome
from avprobe.report.numbers import format_p

_STYLE = {"passed": "green", "failed": "red", "skipped": "yellow", "xfailed": "bright_black", "moved": "bold red"}


def summary_table(outcomes: list[ClaimOutcome], width: int = 160) -> str:
    from rich.console import Console
    from rich.table import Table

    from avprobe.calibration import load_summary

    calibration = load_summary()  # the committed calibration/claims.json: size and power per claim
    t = Table(title="avprobe claims", show_lines=False)
    for col in ("claim", "model", "scope", "verdict", "estimate [CI]", "p", "n", "paper", "calibration"):
        t.add_column(col, overflow="fold")
    for o in sorted(outcomes, key=lambda o: (o.claim_id, o.model, o.scope)):
        est = "" if o.estimate is None else f"{o.estimate:.3g}"
        if o.ci and None not in o.ci:
            est += f" [{o.ci[0]:.3g}, {o.ci[1]:.3g}]"
        shown = o.shown_status  # an expected failure reads XFAILED, as pytest's own line says
        verdict = f"[{_STYLE.get(shown, 'white')}]{shown.upper()}[/]"
        if shown == "moved":
            verdict += f" (was {o.expected})"
        if o.status == "skipped":
            est = o.skip_reason
        part = next((p for p in o.parts if p.get("name") == o.deciding), None)
        p_text = "" if o.p_value is None else format_p(o.p_value, part.get("n_boot") if part else None)
        t.add_row(o.claim_id, o.model, o.scope, verdict, est, p_text, "" if o.n is None else str(o.n),
                  o.paper_value, calibration.get(o.claim_id, "—"))
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False).print(t)
    return buf.getvalue()
