"""The rich summary table printed at the end of a claims run."""

from __future__ import annotations

import io

from avprobe.claim import ClaimOutcome

_STYLE = {"passed": "green", "failed": "red", "skipped": "yellow"}


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
        verdict = f"[{_STYLE.get(o.status, 'white')}]{o.status.upper()}[/]"
        if o.status == "skipped":
            est = o.skip_reason
        t.add_row(o.claim_id, o.model, o.scope, verdict, est,
                  "" if o.p_value is None else f"{o.p_value:.2g}", "" if o.n is None else str(o.n),
                  o.paper_value, calibration.get(o.claim_id, "—"))
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=False).print(t)
    return buf.getvalue()
