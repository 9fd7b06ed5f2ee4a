"""Judge validity (Sec. 3): the LLM judge agrees with human ratings.

"It is scalable, and has strong correlation with human judgements (rho = 0.816 audio,
rho = 0.732 video)." Runs only with a ratings file (--ratings): without one the claim is
skipped with the reason, never passed. Unscored judgments are excluded and counted.
"""

import numpy as np
import pytest

from avprobe.stats import spearman_ci


@pytest.mark.claim("judge_validity")
def test_judge_validity(model_name, claim, request):
    # Rated per --model (the verdict tables are per model); the judge is --judge's, not the model's.
    path = request.config.getoption("ratings")
    if not path:
        claim.skip("no human ratings file: pass --ratings RATINGS.csv "
                   "(columns id, modality, candidate, reference, human_score)")
    from avprobe.judge import JudgeItem, make_judge
    from avprobe.judge.calibrate import read_ratings

    rows = read_ratings(path)
    spec = request.config.getoption("judge") or "openai"
    judge = make_judge(spec)
    scores = judge.score_batch([JudgeItem(r.candidate, r.reference, r.modality) for r in rows])
    results = {}
    for modality in ("audio", "video"):
        pairs = [(s.value, r.human_score) for s, r in zip(scores, rows) if r.modality == modality]
        if len(pairs) < 3:
            continue
        j, h = np.array(pairs, dtype=float).T
        results[f"{modality} (judge {judge.label})"] = spearman_ci(
            j, h, n_boot=claim.n_boot, seed=claim.seed, alternative="greater", threshold=claim["min_rho"])
    if not results:
        claim.skip(f"{path}: fewer than 3 ratings per modality")
    claim.check(results)
