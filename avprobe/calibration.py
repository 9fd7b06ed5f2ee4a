"""Calibration of the claims: how often each claim passes when its effect is absent (false
positives) and when the paper's effect is there (power), measured by running the real claim
code of claims/ on synthetic evidence in exactly the form the store gives it.

    avprobe calibrate --reps 1000 --out calibration/claims.json      # the full run
    avprobe calibrate --claims visual_bias,base_shift_small --reps 200 --n 50

The synthetic world mimics what makes real data hard: fidelity scores on the judge's 0.1 grid
with many 0s and 1s, two caption orders per clip that are strongly correlated (the clip is
the unit), right-skewed per-token KL, proportions clustered within clips, and a lens whose
dominant word may be a frequent word that every caption shares. Every null sits *at* the
claim's threshold where it has one (the hardest null), exactly: population effects are solved
from the score distribution in closed form, not hoped for.

A scenario names its effect "null" (the claim must pass at most alpha of the time) or
"paper" (the paper's effect, or, where the paper gives none, the stated assumption: the
claim should pass; its rate is the power). `judge_validity` is not calibrated here: it reads
a human-ratings file and a judge, not evidence (its Spearman test is covered in tests/).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from avprobe.claim import CLAIMS_TOML, ClaimCheck, ClaimSkipped, claims_table
from avprobe.conditions import band, window
from avprobe.paper import band_fractions
from avprobe.pipeline.evidence import Evidence
from avprobe.records import SampleRecord
from avprobe.types import Role

log = logging.getLogger(__name__)

QUERIES = ("describe what you see and hear", "describe what you hear and see")
N_LAYERS = 8
WINDOW = 2
CONCEPTS = ("dog", "siren", "horse", "bird", "engine", "drill", "keyboard", "piano", "rain", "baby", "crowd", "clock")
WORDS = ("i", "see", "hear", "a", ".", "loud", *CONCEPTS)
VOCAB = {str(i): w for i, w in enumerate(WORDS)}
ID = {w: i for i, w in enumerate(WORDS)}
N_POSITIONS = 12  # audio positions of the synthetic lens
SD_CLIP, SD_QUERY, SD_PAIR = 0.30, 0.08, 0.15  # latent fidelity: clip, caption order, condition


# ---- fidelity on the judge's grid ------------------------------------------------------------

def grid_mean(m: float, s: float) -> float:
    """E[score] for a latent N(m, s^2) scored as the judge does: clipped to [0, 1], rounded to 0.1."""
    edges = np.arange(0.05, 1.0, 0.1)  # score k/10 for a latent in [k/10 - .05, k/10 + .05)
    cdf = sps.norm.cdf((edges - m) / s)
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    return float(np.dot(probs, np.arange(11) / 10))


def _solve(f: Callable[[float], float], target: float, lo: float = -3.0, hi: float = 3.0) -> float:
    """x with f(x) = target for an increasing f (bisection)."""
    flo, fhi = f(lo) - target, f(hi) - target
    if flo > 0 or fhi < 0:
        raise ValueError(f"target {target} out of reach")
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@lru_cache(maxsize=256)
def latent_for_mean(mean_score: float) -> float:
    """The latent mean whose grid score (clip + query noise) has this population mean."""
    return _solve(lambda m: grid_mean(m, math.hypot(SD_CLIP, SD_QUERY)), mean_score)


@lru_cache(maxsize=256)
def latent_shift(base_mean: float, diff: float = 0.0, relative: float | None = None) -> float:
    """The latent shift of a condition whose mean score differs from the baseline's by `diff`
    (or by `relative` x the baseline mean): exact in the population."""
    m0 = latent_for_mean(base_mean)
    s1 = math.sqrt(SD_CLIP**2 + SD_QUERY**2 + SD_PAIR**2)
    target = base_mean * (1 + relative) if relative is not None else base_mean + diff
    return _solve(lambda m: grid_mean(m, s1), target) - m0


def grid(latent: np.ndarray) -> np.ndarray:
    return np.round(np.clip(latent, 0.0, 1.0) * 10) / 10


# ---- synthetic records -----------------------------------------------------------------------

def conditions(n_layers: int = N_LAYERS, w: int = WINDOW) -> list[dict[str, Any]]:
    """The conditions of a record as the store holds them: baseline, the sweep of both roles,
    the band knockouts, the own-sight-word knockouts of the bands."""
    out = [{"key": "baseline", "label": "baseline", "blocked": [], "layers": []}]

    def ko(blocked: Sequence[str], layers: Iterable[int]) -> None:
        layers = list(layers)
        key = f"ko:{'+'.join(blocked)}:{','.join(map(str, layers))}"
        if all(c["key"] != key for c in out):
            out.append({"key": key, "label": key, "blocked": list(blocked), "layers": layers})

    for role in ("video", "audio"):
        for c in range(n_layers):
            ko([role], window(c, w, n_layers))
    for name in ("paper", "early", "all"):
        layers = band(*band_fractions(name), n_layers)
        ko(["video"], layers)
        ko(["audio"], layers)
        ko(["video", "own-sight-words"], layers)
    return out


def band_key(blocked: Sequence[str], name: str, n_layers: int = N_LAYERS) -> str:
    return f"ko:{'+'.join(blocked)}:{','.join(map(str, band(*band_fractions(name), n_layers)))}"


def sweep_keys(role: str, n_layers: int = N_LAYERS, w: int = WINDOW) -> list[str]:
    return [f"ko:{role}:{','.join(map(str, window(c, w, n_layers)))}" for c in range(n_layers)]


@dataclass
class World:
    """One synthetic sample set: clips (half factual, half counterfactual), two caption orders
    each. Builders fill fidelity, flow, lens and shift; `evidence()` gives the claims' view."""

    rng: np.random.Generator
    n: int  # clips per kind
    conds: list[dict[str, Any]] = field(default_factory=conditions)

    def __post_init__(self) -> None:
        self.kinds = ("factual", "counterfactual")
        self.clips = [(f"{k[0]}{i:04d}", k) for k in self.kinds for i in range(self.n)]
        self.truth = {cid: CONCEPTS[self.rng.integers(len(CONCEPTS))] for cid, _ in self.clips}
        self.sight = {cid: CONCEPTS[self.rng.integers(len(CONCEPTS))] for cid, _ in self.clips}
        self.arrays: dict[tuple[str, str], dict[str, np.ndarray]] = {(c, q): {} for c, _ in self.clips for q in QUERIES}
        self.tokens: dict[tuple[str, str], list[int]] = {}
        self.fidelity: dict[tuple[str, str, str], list[float]] = {}
        self.clip_u = {cid: self.rng.normal() for cid, _ in self.clips}

    # fidelity ---------------------------------------------------------------------------
    def fidelity_of(self, kind: str, modality: str, base_mean: float,
                    effects: dict[str, tuple[float, float | None]] | None = None) -> None:
        """Scores of every condition for one kind and modality: the baseline's population mean
        is `base_mean`; `effects[key] = (diff, relative)` moves a condition's mean exactly
        (others differ from the baseline by noise only)."""
        j = 0 if modality == "audio" else 1
        m0 = latent_for_mean(base_mean)
        effects = effects or {}
        ids = [cid for cid, k in self.clips if k == kind]
        u = np.array([self.clip_u[c] for c in ids])
        lat = m0 + SD_CLIP * u[:, None] + self.rng.normal(0, SD_QUERY, (len(ids), len(QUERIES)))
        for c in self.conds:
            key = c["key"]
            if key == "baseline":
                score = grid(lat)
            else:
                diff, rel = effects.get(key, (0.0, None))
                score = grid(lat + latent_shift(base_mean, diff, rel) + self.rng.normal(0, SD_PAIR, lat.shape))
            for i, cid in enumerate(ids):
                for qi, q in enumerate(QUERIES):
                    self.fidelity.setdefault((cid, q, key), [math.nan, math.nan])[j] = float(score[i, qi])

    def exact_fidelity_of(self, kind: str, modality: str, drops: dict[str, float] | None = None) -> None:
        """Exact-scored fidelity (0 or 1, as the concept judge scores the organisms): every
        baseline caption right (the organisms' factual captions), and under condition `key`
        each caption falls to 0 with probability `drops[key]`: rare changes, all one way."""
        j = 0 if modality == "audio" else 1
        ids = [cid for cid, k in self.clips if k == kind]
        for c in self.conds:
            share = 0.0 if c["key"] == "baseline" else (drops or {}).get(c["key"], 0.0)
            score = (self.rng.random((len(ids), len(QUERIES))) >= share).astype(float)
            for i, cid in enumerate(ids):
                for qi, q in enumerate(QUERIES):
                    self.fidelity.setdefault((cid, q, c["key"]), [math.nan, math.nan])[j] = float(score[i, qi])

    # attention --------------------------------------------------------------------------
    def flow_of(self, role: Role, layers: Sequence[int], mean: float, concentration: float = 30.0) -> None:
        """The baseline's attention share of `role` in `layers`: per clip Beta with this mean,
        the caption orders nearly identical (correlation about 0.99, as on the organisms)."""
        for cid, _ in self.clips:
            share = self.rng.beta(mean * concentration, (1 - mean) * concentration)
            for q in QUERIES:
                a = self.arrays[(cid, q)].setdefault("flow_mean", np.zeros((1, N_LAYERS, len(Role)), np.float32))
                a[0, list(layers), int(role)] = np.clip(share + self.rng.normal(0, 0.003), 0, 1)

    # lens -------------------------------------------------------------------------------
    def lens_of(self, informative: float, shared_word: float = 0.3) -> None:
        """Lens top-1 ids at the audio positions of every layer: with probability
        `informative` a clip's dominant word is its true sound, else a concept drawn
        independently of the truth, or (with `shared_word`) the word every caption shares."""
        for cid, _ in self.clips:
            u = self.rng.random()
            if u < informative:
                word = self.truth[cid]
            elif self.rng.random() < shared_word:
                word = "loud"
            else:
                word = CONCEPTS[self.rng.integers(len(CONCEPTS))]
            ids = self.rng.integers(ID["i"], len(WORDS), size=(N_LAYERS, N_POSITIONS, 1))
            ids[:, : N_POSITIONS // 2 + 1, 0] = ID[word]  # the majority of positions
            for q in QUERIES:  # the prefill precedes the query's order: identical lens
                self.arrays[(cid, q)]["lens_top_ids"] = ids.astype(np.int16)

    # captions and base shift ---------------------------------------------------------------
    def captions(self, extra_wrong: bool = False) -> None:
        """Baseline captions "i see a X . i hear a [loud] Y (Z) .": the audio-event tokens are
        the words after "hear" (Y the truth or not, Z another concept)."""
        for cid, _ in self.clips:
            for q in QUERIES:
                named = self.truth[cid] if self.rng.random() < 0.5 or extra_wrong else self.sight[cid]
                words = ["i", "see", "a", self.sight[cid], ".", "i", "hear", "a", named]
                if extra_wrong or self.rng.random() < 0.5:
                    words.append(CONCEPTS[(CONCEPTS.index(self.truth[cid]) + 1 + self.rng.integers(10)) % 12])
                words.append(".")
                self.tokens[(cid, q)] = [ID[w] for w in words]

    def kl_of(self, mean: float, sigma: float = 1.0, right_factor: float = 1.0) -> None:
        """Per-token KL: a clip level drawn lognormal with population mean `mean` (right
        skew), tokens Gamma around it; tokens naming the true sound x `right_factor`."""
        mu = math.log(mean) - sigma**2 / 2
        for cid, _ in self.clips:
            level = math.exp(self.rng.normal(mu, sigma))
            for q in QUERIES:
                toks = self.tokens[(cid, q)]
                kl = level * self.rng.gamma(2.0, 0.5, size=len(toks))
                kl = np.where(np.array(toks) == ID[self.truth[cid]], kl * right_factor, kl)
                self.arrays[(cid, q)]["shift_kl"] = kl.astype(np.float32)

    def top_of(self, p_top1: float, p_top3: float, concentration: float = 8.0) -> None:
        """Per clip the chance that an audio token keeps the base's top-1 (Beta, mean p_top1)
        and lies within its top 3 (mean p_top3 >= p_top1); tokens of a clip share it."""
        q3 = (p_top3 - p_top1) / (1 - p_top1)
        for cid, _ in self.clips:
            p1 = self.rng.beta(p_top1 * concentration, (1 - p_top1) * concentration)
            p3 = p1 + (1 - p1) * q3
            for q in QUERIES:
                n = len(self.tokens[(cid, q)])
                t1 = self.rng.random(n) < p1
                t3 = t1 | (self.rng.random(n) < (p3 - p1) / max(1 - p1, 1e-9))
                self.arrays[(cid, q)]["shift_top1_same"] = t1
                self.arrays[(cid, q)]["shift_in_top3"] = t3

    # the claims' view --------------------------------------------------------------------
    def evidence(self, model: str = "synthetic") -> Evidence:
        records = []
        for cid, kind in self.clips:
            for q in QUERIES:
                toks = self.tokens.get((cid, q), [ID["i"], ID["."]])
                conds = [dict(c, text="", token_ids=toks if c["key"] == "baseline" else [], finished=True)
                         for c in self.conds]
                meta = {
                    "sample_id": cid, "kind": kind, "query": q, "n_layers": N_LAYERS, "window": WINDOW,
                    "role_counts": {"video": 1, "audio": 1}, "conditions": conds,
                    "audio_captions": [f"i hear a loud {self.truth[cid]} ."],
                    "video_captions": [f"i see a {self.sight[cid]} ."],
                    "vocab": VOCAB, "lens": {"use_norm": True, "top_k": 1},
                    "shift": {"base_model": "synthetic-base"},
                }
                records.append(SampleRecord(meta, dict(self.arrays[(cid, q)])))
        fid = {k: (v[0], v[1]) for k, v in self.fidelity.items()}
        return Evidence(model=model, records=records, judge_label="synthetic", fidelity=fid, base_model="base")


# ---- scenarios -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    claim: str
    name: str
    effect: str  # "null" (must pass <= alpha) | "paper" (power)
    build: Callable[[World], Any]  # fills the world; returns the test's extra kwargs
    scope: str | None = None
    note: str = ""


def _knockout_world(w: World, cf_audio: float = 0.231, cf_video: float = 0.6, fac: float = 0.55,
                    cf_effects: dict[str, dict[str, tuple[float, float | None]]] | None = None,
                    fac_effects: dict[str, dict[str, tuple[float, float | None]]] | None = None) -> None:
    cf_effects, fac_effects = cf_effects or {}, fac_effects or {}
    w.fidelity_of("counterfactual", "audio", cf_audio, cf_effects.get("audio"))
    w.fidelity_of("counterfactual", "video", cf_video, cf_effects.get("video"))
    w.fidelity_of("factual", "audio", fac, fac_effects.get("audio"))
    w.fidelity_of("factual", "video", fac, fac_effects.get("video"))


def _exact_factual_world(w: World, audio_drops: dict[str, float]) -> None:
    """The knockout world, with the factual captions exact-scored and every one right at
    baseline; `audio_drops[key]`: share of them that lose the sound under that condition."""
    _knockout_world(w)
    w.exact_fidelity_of("factual", "audio", audio_drops)
    w.exact_fidelity_of("factual", "video")


def _all(keys: Iterable[str], diff: float = 0.0, rel: float | None = None) -> dict[str, tuple[float, float | None]]:
    return {k: (diff, rel) for k in keys}


def _flow_world(w: World, early: float, late: float, video: float) -> None:
    early_l = band(*band_fractions("paper-early"), N_LAYERS)
    late_l = band(*band_fractions("paper-after-early"), N_LAYERS)
    w.flow_of(Role.AUDIO, early_l, early)
    w.flow_of(Role.AUDIO, late_l, late)
    w.flow_of(Role.VIDEO, band(*band_fractions("paper"), N_LAYERS), video)


def _lens_world(w: World, hit_rate: float, fidelity: float, shared_word: float = 0.3) -> None:
    # P(hit) = informative + (1 - informative) * P(uninformative word names the truth)
    chance = (1 - shared_word) / len(CONCEPTS) + shared_word  # "loud" is in every caption
    informative = max(0.0, (hit_rate - chance) / (1 - chance))
    w.lens_of(informative, shared_word)
    w.fidelity_of("counterfactual", "audio", fidelity)


def scenarios() -> list[Scenario]:
    """Every (claim, scenario) the calibration runs."""
    t = claims_table()
    kv, ka = sweep_keys("video"), sweep_keys("audio")
    bv, ba = band_key(["video"], "paper"), band_key(["audio"], "paper")
    rd, drop = t["visual_bias"]["min_relative_drop"], t["knockout_late_integration"]["min_drop"]
    margin, gain = t["knockout_factual_compensation"]["margin"], t["knockout_video_block_recovers_audio"]["min_relative_gain"]
    out: list[Scenario] = []

    def vb(fac: float, cf: float) -> Callable[[World], None]:
        def build(w: World) -> None:
            w.fidelity_of("factual", "audio", fac)
            w.fidelity_of("counterfactual", "audio", cf)
            w.fidelity_of("factual", "video", 0.5)
            w.fidelity_of("counterfactual", "video", 0.5)
        return build

    out += [Scenario("visual_bias", "drop at the threshold", "null", vb(0.536, 0.536 * (1 - rd))),
            Scenario("visual_bias", "no drop", "null", vb(0.536, 0.536)),
            Scenario("visual_bias", "paper: 53.6 -> 23.1", "paper", vb(0.536, 0.231))]
    e_min, l_max = t["audio_attention_early"]["min_early_share"], t["audio_attention_early"]["max_late_share"]
    v_min = t["video_attention_late"]["min_share"]
    out += [Scenario("audio_attention_early", "early share at the threshold", "null",
                     lambda w: _flow_world(w, e_min, 0.03, 0.3)),
            Scenario("audio_attention_early", "later share at the threshold", "null",
                     lambda w: _flow_world(w, 0.45, l_max, 0.3)),
            Scenario("audio_attention_early", "paper: 45% early, 3% later", "paper",
                     lambda w: _flow_world(w, 0.45, 0.03, 0.3)),
            Scenario("video_attention_late", "share at the threshold", "null", lambda w: _flow_world(w, 0.45, 0.03, v_min)),
            Scenario("video_attention_late", "paper: 30%", "paper", lambda w: _flow_world(w, 0.45, 0.03, 0.30))]
    g = t["latent_audio"]["min_gain_over_caption"]
    out += [Scenario("latent_audio", "lens carries no audio (frequent shared word)", "null",
                     lambda w: _lens_world(w, (0.7 / len(CONCEPTS)) + 0.3, 0.05)),
            Scenario("latent_audio", "gain over the caption at the threshold", "null",
                     lambda w: _lens_world(w, 0.231 + g, 0.231)),
            Scenario("latent_audio", "paper: 61.4% vs 23%", "paper", lambda w: _lens_world(w, 0.614, 0.231))]
    for scope in ("paper-band", "sweep"):
        keys = [bv] if scope == "paper-band" else kv
        out += [
            Scenario("knockout_factual_compensation", "one window at the margin", "null",
                     lambda w, keys=keys: _knockout_world(w, fac_effects={"audio": {keys[len(keys) // 2]: (margin, None)}}),
                     scope),
            Scenario("knockout_factual_compensation", "every window at the margin", "null",
                     lambda w, keys=keys: _knockout_world(w, fac_effects={"video": _all(keys, -margin)}), scope),
            # the world where a bootstrap of a few changed pairs did not hold its size (0.10 at
            # n = 50): exact scores, one window losing the sound in a share `margin` of captions
            Scenario("knockout_factual_compensation", "exact scores: one window loses 1 -> 0 in a share at the margin",
                     "null", lambda w, keys=keys: _exact_factual_world(w, {keys[len(keys) // 2]: margin}), scope),
            Scenario("knockout_factual_compensation", "paper: flat curves", "paper", lambda w: _knockout_world(w), scope),
            Scenario("knockout_late_integration", "every window at the threshold", "null",
                     lambda w, kv_=([bv] if scope == "paper-band" else kv), ka_=([ba] if scope == "paper-band" else ka):
                     _knockout_world(w, cf_audio=0.5, cf_effects={"video": _all(kv_, -drop), "audio": _all(ka_, -drop)}),
                     scope),
            Scenario("knockout_late_integration", "paper: drops of 0.15 in the band", "paper",
                     lambda w: _knockout_world(w, cf_audio=0.5, cf_effects={
                         "video": _all([bv, *kv[3:7]], -0.15), "audio": _all([ba, *ka[3:7]], -0.15)}), scope,
                     note="the paper gives no size: a drop of 0.15 in the paper band assumed"),
            Scenario("knockout_video_block_recovers_audio", "every window at the threshold", "null",
                     lambda w, keys=keys: _knockout_world(w, cf_effects={"audio": _all(keys, 0.0, gain)}), scope),
            Scenario("knockout_video_block_recovers_audio", "paper: +50% in the band", "paper",
                     lambda w: _knockout_world(w, cf_effects={"audio": _all([bv, *kv[3:7]], 0.0, 0.5)}), scope),
        ]
    kl_max = t["base_shift_small"]["max_mean_kl"]
    p1, p3 = t["audio_tokens_unshifted"]["min_top1_same"], t["audio_tokens_unshifted"]["min_in_top3"]

    def shift(kl: float, top1: float = 0.66, top3: float = 0.85, right: float = 1.0,
              extra_wrong: bool = False) -> Callable[[World], None]:
        def build(w: World) -> None:
            w.captions(extra_wrong=extra_wrong)
            w.kl_of(kl, right_factor=right)
            w.top_of(top1, top3)
        return build

    out += [Scenario("base_shift_small", "mean KL at the threshold (skewed)", "null", shift(kl_max)),
            Scenario("base_shift_small", "paper: mean KL 0.4", "paper", shift(0.4)),
            Scenario("audio_tokens_unshifted", "top-1 share at the threshold", "null", shift(0.4, p1, 0.95)),
            Scenario("audio_tokens_unshifted", "top-3 share at the threshold", "null", shift(0.4, 0.70, p3)),
            Scenario("audio_tokens_unshifted", "paper: 66% and 85%", "paper", shift(0.4, 0.66, 0.85)),
            Scenario("correct_audio_tokens_shift", "no difference", "null", shift(0.4, extra_wrong=True)),
            Scenario("correct_audio_tokens_shift", "KL of correct tokens doubled", "paper",
                     shift(0.4, right=2.0, extra_wrong=True), note="the paper is qualitative: a doubling assumed")]
    mg = t["visual_prior_via_own_words"]["min_gain"]
    own = {name: band_key(["video", "own-sight-words"], name) for name in ("paper", "early", "all")}
    out += [Scenario("visual_prior_via_own_words", "every band at the threshold", "null",
                     lambda w: _knockout_world(w, cf_effects={"audio": _all(own.values(), mg)})),
            Scenario("visual_prior_via_own_words", "gain of 0.15 in one band", "paper",
                     lambda w: _knockout_world(w, cf_effects={"audio": {own["early"]: (0.15, None)}}),
                     note="ours, not in the paper: a gain of 0.15 in the early band assumed")]
    am, md = t["attention_is_not_use"]["attention_margin"], t["attention_is_not_use"]["min_effect_difference"]
    out += [Scenario("attention_is_not_use", "shares differ by the margin", "null", _pair(0.30 + am, 0.5)),
            Scenario("attention_is_not_use", "gains differ by the threshold", "null", _pair(0.30, md)),
            Scenario("attention_is_not_use", "organism vs control: equal shares, gains 0.5 apart", "paper",
                     _pair(0.30, 0.5), note="ours: the organisms' contrast assumed")]
    return out


def _pair(share_b: float, gain_diff: float) -> Callable[[World], Any]:
    """Two models on the same clips: audio shares (A 0.30, B `share_b`) and G-/->V (all
    layers) audio gains (A 0.1, B 0.1 + gain_diff); returns the second world."""
    all_v = band_key(["video"], "all")

    def build(w: World) -> Any:
        w.flow_of(Role.AUDIO, range(N_LAYERS), 0.30)
        w.fidelity_of("counterfactual", "audio", 0.2, {all_v: (0.1, None)})
        w2 = World(w.rng, w.n)
        w2.clip_u = dict(w.clip_u)  # the same clips: shares and fidelities correlate
        w2.flow_of(Role.AUDIO, range(N_LAYERS), share_b)
        w2.fidelity_of("counterfactual", "audio", 0.2, {all_v: (0.1 + gain_diff, None)})
        return {"second": w2}
    return build


# ---- running the real claim code -------------------------------------------------------------

# claim id -> (module under claims/, test function)
TESTS = {
    "visual_bias": ("test_visual_bias", "test_visual_bias"),
    "audio_attention_early": ("test_attention_flow", "test_audio_attention_early"),
    "video_attention_late": ("test_attention_flow", "test_video_attention_late"),
    "latent_audio": ("test_logit_lens", "test_latent_audio"),
    "knockout_factual_compensation": ("test_knockout", "test_knockout_factual_compensation"),
    "knockout_late_integration": ("test_knockout", "test_knockout_late_integration"),
    "knockout_video_block_recovers_audio": ("test_knockout", "test_knockout_video_block_recovers_audio"),
    "base_shift_small": ("test_base_shift", "test_base_shift_small"),
    "audio_tokens_unshifted": ("test_base_shift", "test_audio_tokens_unshifted"),
    "correct_audio_tokens_shift": ("test_base_shift", "test_correct_audio_tokens_shift"),
    "visual_prior_via_own_words": ("test_ours", "test_visual_prior_via_own_words"),
    "attention_is_not_use": ("test_ours", "test_attention_is_not_use"),
}
NOT_CALIBRATED = {"judge_validity": "reads a human-ratings file and a judge, not evidence"}


@lru_cache(maxsize=None)
def claim_function(claim_id: str) -> Callable[..., Any]:
    """The claim's test function from claims/ (the code `pytest claims/` runs)."""
    module, fn = TESTS[claim_id]
    path = CLAIMS_TOML.parent / f"{module}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the calibration runs the claims of a checkout (claims/ is not installed)")
    spec = importlib.util.spec_from_file_location(f"avprobe_claims_{module}", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return getattr(mod, fn)


def run_once(sc: Scenario, n: int, seed: int, n_boot: int | None = None) -> str:
    """One replicate: build the world of `n` clips per kind, run the claim; -> passed |
    failed | skipped."""
    rng = np.random.default_rng(seed)
    w = World(rng, n)
    extra = sc.build(w) or {}
    cfg = dict(claims_table()[sc.claim])
    cfg["seed"] = int(rng.integers(2**31))  # the bootstrap's draws differ between replicates
    if n_boot is not None:
        cfg["n_boot"] = n_boot
    claim = ClaimCheck(cfg, model="synthetic", scope=sc.scope or "all samples")
    fn = claim_function(sc.claim)
    kw: dict[str, Any] = {"claim": claim}
    if sc.claim == "attention_is_not_use":
        evs = {"a": w.evidence("a"), "b": extra["second"].evidence("b")}
        kw.update(model_pair=("a", "b"), evidence_of=evs.__getitem__)
    else:
        kw["evidence"] = w.evidence()
        params = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        if "query" in params:
            kw["query"] = QUERIES[0]
        if "scope" in params:
            kw["scope"] = sc.scope
        if "shift_base" in params:
            kw["shift_base"] = "vision"  # the synthetic shift arrays are the vision base's
    try:
        fn(**kw)
    except ClaimSkipped:
        return "skipped"
    except AssertionError:
        return "failed"
    return "passed"


@dataclass
class Row:
    claim: str
    scenario: str
    effect: str
    scope: str | None
    n: int
    reps: int
    passed: int
    skipped: int
    seconds: float
    note: str = ""

    @property
    def pass_rate(self) -> float:
        return self.passed / self.reps

    @property
    def mcse(self) -> float:
        """Monte-Carlo standard error of the pass rate."""
        p = self.pass_rate
        return math.sqrt(max(p * (1 - p), 1e-12) / self.reps)

    def ok(self, alpha: float) -> bool | None:
        """Nulls: pass rate within alpha + 2 MC standard errors (of alpha). Power: None."""
        if self.effect != "null":
            return None
        return self.pass_rate <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / self.reps)

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.claim, "scenario": self.scenario, "effect": self.effect, "scope": self.scope,
                "n": self.n, "reps": self.reps, "pass_rate": round(self.pass_rate, 4),
                "skip_rate": round(self.skipped / self.reps, 4), "mcse": round(self.mcse, 4),
                "seconds": round(self.seconds, 2), "note": self.note}


def calibrate(claims: Sequence[str] | None = None, reps: int = 1000, ns: Sequence[int] = (250, 50),
              power_reps: int | None = None, seed: int = 0, n_boot: int | None = None,
              progress: Callable[[Row], None] | None = None,
              scenario: tuple[str, str | None] | None = None) -> list[Row]:
    """Run every scenario of `claims` (default: all; `scenario` = (name, scope): that one only)
    `reps` times at each n (clips per kind); power scenarios `power_reps` times (default: reps)."""
    unknown = set(claims or ()) - set(TESTS) - set(NOT_CALIBRATED)
    if unknown:
        raise ValueError(f"unknown claim(s) {sorted(unknown)}; calibrated: {', '.join(TESTS)}")
    rows = []
    for sc in scenarios():
        if claims and sc.claim not in claims:
            continue
        if scenario is not None and (sc.name, sc.scope) != tuple(scenario):
            continue
        for n in ns:
            k = reps if sc.effect == "null" else (power_reps or reps)
            t0 = time.perf_counter()
            outcomes = [run_once(sc, n, seed * 1_000_003 + i, n_boot) for i in range(k)]
            row = Row(sc.claim, sc.name, sc.effect, sc.scope, n, k, outcomes.count("passed"),
                      outcomes.count("skipped"), time.perf_counter() - t0, sc.note)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def summary_by_claim(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """claim id -> "false positives <= 0.04 at n = 250; power 0.97 at the paper's effect" (the
    worst null and the power at the largest n), for the report and the terminal table."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["claim"], []).append(r)
    out = {}
    for cid, rs in by.items():
        n = max(r["n"] for r in rs)
        nulls = [r["pass_rate"] for r in rs if r["effect"] == "null" and r["n"] == n]
        power = [r["pass_rate"] for r in rs if r["effect"] == "paper" and r["n"] == n]
        parts = []
        if nulls:
            parts.append(f"false positives {max(nulls):.3f} at n = {n}")
        if power:
            parts.append(f"power {min(power):.2f} at the paper's effect")
        out[cid] = "; ".join(parts)
    return out


DEFAULT_OUT = Path(__file__).resolve().parent.parent / "calibration" / "claims.json"


def load_summary(path: Path | None = None) -> dict[str, str]:
    """The committed calibration's one-line summary per claim ({} when there is none)."""
    import json

    p = path or DEFAULT_OUT
    if not p.is_file():
        return {}
    try:
        out = summary_by_claim(json.loads(p.read_text())["rows"])
    except (ValueError, KeyError) as exc:
        log.warning("%s: unreadable calibration (%s)", p, exc)
        return {}
    out.update({cid: f"not calibrated: {why}" for cid, why in NOT_CALIBRATED.items()})
    return out
