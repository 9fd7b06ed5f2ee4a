"""Issue 13's targets for an organism, measured with the engine: where its attention goes and
where a knockout acts, in the paper's depth bands.

For each kind (factual, counterfactual) and caption order: audio and video accuracy of greedy
captions (exact concept scoring) under the baseline, G-/->video and G-/->audio over the paper's
band, and G-/->video over every window of the band's width that lies outside it; and the
baseline row's attention shares (mean over steps and heads): audio over the paper's early band,
the largest per-layer audio share beyond 40% of depth, video over the paper's band.
"""

from __future__ import annotations

import numpy as np
import torch

from avprobe.conditions import Baseline, Condition, Knockout, band
from avprobe.organism.world import QUERY_HEAR_SEE, QUERY_SEE_HEAR, parse_caption, render
from avprobe.paper import band_fractions
from avprobe.types import Role, Sample

ORDERS = {"see_hear": QUERY_SEE_HEAR, "hear_see": QUERY_HEAR_SEE}


def target_conditions(n_layers: int) -> tuple[list[Condition], tuple[int, ...], list[tuple[int, ...]]]:
    """Baseline, the band's two knockouts, and G-/->video over each same-width window outside it."""
    paper = band(*band_fractions("paper"), n_layers)
    width = len(paper)
    outside = [tuple(range(s, s + width)) for s in range(0, n_layers - width + 1)
               if not set(range(s, s + width)) & set(paper)]
    conds: list[Condition] = [Baseline(), Knockout((Role.VIDEO,), paper), Knockout((Role.AUDIO,), paper)]
    conds += [Knockout((Role.VIDEO,), w) for w in outside]
    return conds, paper, outside


def measure(adapter, samples: list[Sample], max_new_tokens: int = 16, progress=None) -> dict[str, dict]:
    """{kind/order: {condition label: {audio, video}, "flow": {...}, "n": ...}}."""
    from avprobe.engine import EngineConfig, run

    L = adapter.n_layers
    conds, _, _ = target_conditions(L)
    early = list(band(*band_fractions("paper-early"), L))
    beyond = [layer for layer in range(L) if layer >= 0.4 * L]
    paper = list(band(*band_fractions("paper"), L))
    cfg = EngineConfig(max_new_tokens=max_new_tokens, record_attention=True, record_buckets=False)
    out: dict[str, dict] = {}
    for kind in ("counterfactual", "factual"):
        subset = [s for s in samples if s.kind == kind]
        if not subset:
            continue
        for order, query in ORDERS.items():
            hits = {c.label(): np.zeros(2) for c in conds}
            flows = []
            for s in subset:
                res = run(adapter, adapter.build_inputs(render(s), query), conds, cfg)
                for o in res.outputs:
                    seen, heard = parse_caption(o.text)
                    hits[o.condition.label()] += (heard == s.labels[0], seen == s.video_labels[0])
                    if o.condition == Baseline() and o.flow is not None and len(o.flow):
                        flows.append(o.flow.mean(0))
                if progress is not None:
                    progress()
            row: dict = {k: {"audio": float(a / len(subset)), "video": float(v / len(subset))}
                         for k, (a, v) in hits.items()}
            f = np.nanmean(np.stack(flows), 0)  # [layers, roles]
            row["flow"] = {"audio_early": float(f[early, int(Role.AUDIO)].mean()),
                           "audio_beyond_40pct_max": float(f[beyond, int(Role.AUDIO)].max()),
                           "video_paper_band": float(f[paper, int(Role.VIDEO)].mean())}
            row["n"] = len(subset)
            out[f"{kind}/{order}"] = row
    return out


def main(model: str, n: int, threads: int = 1) -> dict[str, dict]:
    from avprobe.adapters import load
    from avprobe.organism.dataset import eval_samples

    torch.set_num_threads(threads)
    adapter = load(model, device="cpu", dtype=torch.float32)
    samples = eval_samples()
    half = n // 2
    chosen = [s for s in samples if s.kind == "factual"][:half] + [s for s in samples if s.kind == "counterfactual"][:half]
    return measure(adapter, chosen)
