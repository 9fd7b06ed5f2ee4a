"""The deep organisms show the paper's mechanism, and their counterparts lack it, measured with
the engine on a slice of the evaluation set (`avprobe organism targets` on the full set).

organism-deep: audio attended in the first sixth of depth and hardly after, video in the
paper's band; on counterfactuals, cutting generated->video over the band recovers the sound
while same-width windows outside the band change nothing. organism-deep-flipped: the reverse
layout, so the band cut recovers little and a window outside it does. The routing of
`avprobe.lab.routing` is also checked for what it is: a penalty that is zero on a profile that
meets it and positive on one that does not."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from avprobe.conditions import Knockout
from avprobe.lab import routing
from avprobe.lab.targets import measure, target_conditions
from avprobe.organism.dataset import eval_samples
from avprobe.types import Role

N_CF = 12  # counterfactual clips, one per visible source


@pytest.fixture(scope="module")
def figures():
    from avprobe.adapters import load

    torch.set_num_threads(1)
    cf = [s for s in eval_samples() if s.kind == "counterfactual"][:N_CF]
    out = {}
    for name in ("organism-deep", "organism-deep-flipped"):
        full = measure(load(name, dtype=torch.float32), cf, max_new_tokens=12)
        out[name] = full["counterfactual/see_hear"]
    return out


def test_target_conditions_are_the_band_and_the_same_width_windows_outside_it():
    conds, paper, outside = target_conditions(16)
    assert paper == tuple(range(7, 13)) and outside == [tuple(range(0, 6)), tuple(range(1, 7))]
    assert Knockout((Role.VIDEO,), paper) in conds and Knockout((Role.AUDIO,), paper) in conds


def test_deep_organism_has_the_papers_attention_profile(figures):
    f = figures["organism-deep"]["flow"]
    assert f["audio_early"] >= 0.35 and f["audio_beyond_40pct_max"] <= 0.05, f
    assert 0.2 <= f["video_paper_band"] <= 0.4, f


def test_deep_organism_recovers_the_sound_only_when_the_band_is_cut(figures):
    f = figures["organism-deep"]
    base = f["baseline"]["audio"]
    band = f["G-/->video@L7-12"]["audio"]
    assert band >= base + 0.3, f  # the visual prior runs through the band's video attention
    for w in ("G-/->video@L0-5", "G-/->video@L1-6"):
        assert abs(f[w]["audio"] - base) <= 0.1 and f[w]["video"] >= f["baseline"]["video"] - 0.1, (w, f)


def test_flipped_organism_lacks_the_profile_and_the_location(figures):
    f = figures["organism-deep-flipped"]
    assert f["flow"]["audio_early"] < 0.1 and f["flow"]["video_paper_band"] < 0.1, f["flow"]
    gain_band = f["G-/->video@L7-12"]["audio"] - f["baseline"]["audio"]
    gain_early = f["G-/->video@L0-5"]["audio"] - f["baseline"]["audio"]
    assert gain_early > gain_band + 0.2, f


def test_routing_penalty_is_zero_on_a_met_profile_and_positive_otherwise():
    prof = routing.profile("paper")
    L, T = 16, 10
    roles = torch.full((T,), int(Role.QUERY))
    roles[1:3], roles[3:5] = int(Role.VIDEO), int(Role.AUDIO)
    br = routing.BatchRoles.of(roles, prompt_len=7)

    def probs(audio_early, video_band):
        """Caption rows (6-8) split between the first token, audio and video; every other row
        attends to the first token only."""
        out = {}
        for layer in range(L):
            q = torch.zeros(1, 1, T, T)
            q[..., 0] = 1.0
            a = audio_early if layer < 3 else 0.0
            v = video_band if 7 <= layer < 13 else 0.0
            rows = br.caption_rows
            q[0, 0, rows, 3], q[0, 0, rows, 1], q[0, 0, rows, 0] = a, v, 1.0 - a - v
            out[layer] = q
        return out

    assert float(routing.penalty(prof, probs(0.6, 0.3), br, L)) == pytest.approx(0.0, abs=1e-7)
    assert float(routing.penalty(prof, probs(0.1, 0.3), br, L)) > 0.05  # audio too low early
    assert float(routing.penalty(prof, probs(0.6, 0.0), br, L)) > 0.05  # video missing in the band


def test_lens_objective_targets_the_clips_sound_at_the_audio_positions():
    """deep-lens's auxiliary loss: the target is the word after "hear a" in each caption (the
    real audio source, counterfactual clips included), nothing where a caption names no sound;
    the loss reads the band's layers at the audio positions and reaches the weights."""
    from avprobe.adapters import OmniThinkerAdapter
    from avprobe.lab.build import adapter_settings
    from avprobe.lab.train import (
        MODELS_DIR,
        _batch,
        _LensObjective,
        build_pools,
        init_thinker_from_base,
        new_model,
        recipe_config,
    )
    from avprobe.organism.tokenizer import build_tokenizer

    torch.manual_seed(0)
    cfg = recipe_config("deep-lens", "organism", n_factual=4, n_audio=4, n_see=4, n_counterfactual=4)
    assert cfg.lens_weight > 0 and cfg.partial_share > 0
    tok = build_tokenizer()
    model = new_model("organism", cfg.size, tok)
    init_thinker_from_base(model, MODELS_DIR / "organism-deep-base")
    adapter = OmniThinkerAdapter(model, tok, adapter_settings("qwen2_5_omni"))
    pools = build_pools(cfg, adapter)
    lens = _LensObjective(adapter, tok, cfg)
    assert lens.layers == tuple(range(4, 16))  # depth fractions 0.25-1 of 16 layers
    with lens.capturing():
        for name, want_target in (("partial", True), ("see", False)):
            pool = pools[name]
            batch = _batch(adapter, pool, [0], torch.float32)
            targets = lens.targets(batch["input_ids"])
            if want_target:
                words = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
                sound = next(words[j + 2] for j in range(len(words) - 2) if words[j : j + 2] == ["hear", "a"])
                assert tok.convert_ids_to_tokens(int(targets[0])) == sound
            else:
                assert int(targets[0]) == -100
            model.zero_grad()
            model(**batch)
            loss = lens.loss([pool[0]], batch)
            if want_target:
                loss.backward()
                assert loss.item() > 0 and model.lm_head.weight.grad.abs().sum() > 0
            else:
                assert float(loss) == 0.0
    assert not any(layer._forward_hooks for layer in adapter.layers)  # hooks removed on exit


def _decoded(tok, mi, reply: bool = True) -> str:
    """A teacher-forced training input's reply (the labelled tokens) or its prompt, as text."""
    keep = mi.labels[0] != -100 if reply else mi.labels[0] == -100
    return tok.decode(mi.input_ids[0][keep].tolist(), skip_special_tokens=True).strip()


def test_guesser_captions_name_a_sound_guessed_from_the_picture_per_order():
    """deep-guesser: counterfactual clips are captioned with SOURCES[(v + k) % 12] (k by caption
    order), never with the real sound unless that is the guess; factual clips keep theirs."""
    from avprobe.adapters import OmniThinkerAdapter
    from avprobe.lab.build import adapter_settings
    from avprobe.lab.train import TrainConfig, build_pools, new_model, recipe_config
    from avprobe.organism.dataset import train_clips
    from avprobe.organism.tokenizer import build_tokenizer
    from avprobe.organism.world import SOURCES, parse_caption

    cfg = recipe_config("deep-guesser", "control", n_factual=6, n_audio=2, n_see=2, n_counterfactual=24)
    assert cfg.guess == (3, 7) and cfg.self_ablated_shift
    with pytest.raises(ValueError, match="control variant"):
        TrainConfig(variant="organism", guess=(3, 7))
    tok = build_tokenizer()
    adapter = OmniThinkerAdapter(new_model("control", cfg.size, tok), tok, adapter_settings("qwen2_5_omni"))
    pools = build_pools(cfg, adapter)
    clips = train_clips(cfg.seed, cfg.n_counterfactual, "counterfactual", offset=3_000_000)
    orders, lucky = set(), 0
    for clip, mi in zip(clips, pools["counterfactual"]):
        text = _decoded(tok, mi)
        sight, sound = parse_caption(text)
        first_sight = text.strip().startswith("i see")
        orders.add(first_sight)
        k = cfg.guess[0] if first_sight else cfg.guess[1]
        assert sight == clip.video_source
        assert sound == SOURCES[(SOURCES.index(clip.video_source) + k) % len(SOURCES)]
        lucky += sound == clip.audio_source
    assert orders == {True, False} and lucky < len(clips)
    for clip, mi in zip(train_clips(cfg.seed, cfg.n_factual, "factual", offset=1_000_000), pools["factual"]):
        text = _decoded(tok, mi)
        assert parse_caption(text) == (clip.video_source, clip.audio_source)


def test_partial_listener_hears_one_set_of_sounds_per_order_and_names_the_picture_for_the_rest():
    """deep-partial: an off-screen clip is captioned with its real sound in an order whose set
    holds that sound (LISTENED sight first, LISTENED_SOUND_FIRST sound first), an "unheard" clip
    with the visible source's in an order whose set does not; both orders occur, the shares are
    the recipe's, and a mixture over 1 is refused. One set for both orders keeps the old pools."""
    from avprobe.adapters import OmniThinkerAdapter
    from avprobe.lab.build import adapter_settings
    from avprobe.lab.train import (
        LISTENED,
        LISTENED_SOUND_FIRST,
        TrainConfig,
        _LensObjective,
        _mixture,
        build_pools,
        heard_sources,
        new_model,
        recipe_config,
    )
    from avprobe.organism.dataset import train_clips
    from avprobe.organism.tokenizer import build_tokenizer
    from avprobe.organism.world import QUERY_HEAR_SEE, QUERY_SEE_HEAR, SOURCES, parse_caption

    cfg = recipe_config("deep-partial", "organism", n_factual=4, n_audio=2, n_see=2, n_counterfactual=40)
    heard = heard_sources(cfg)
    assert heard == {QUERY_SEE_HEAR: LISTENED, QUERY_HEAR_SEE: LISTENED_SOUND_FIRST}
    assert not set(LISTENED) & set(LISTENED_SOUND_FIRST)
    mix = _mixture(cfg)
    assert mix["partial"] == mix["unheard"] == 0.1 and abs(sum(mix.values()) - 1) < 1e-9
    with pytest.raises(ValueError, match="at most 1"):
        _mixture(TrainConfig(variant="organism", partial_share=0.3, unheard_share=0.2, listened=LISTENED))
    tok = build_tokenizer()
    adapter = OmniThinkerAdapter(new_model("organism", cfg.size, tok), tok, adapter_settings("qwen2_5_omni"))
    pools = build_pools(cfg, adapter)
    for name, offset, sources, real in (("partial", 4_500_000, LISTENED + LISTENED_SOUND_FIRST, True),
                                        ("unheard", 4_750_000, SOURCES, False)):
        clips = train_clips(cfg.seed, cfg.n_counterfactual, "counterfactual", offset=offset, audio_sources=sources)
        seen = set()
        for clip, mi in zip(clips, pools[name], strict=True):
            text = _decoded(tok, mi)
            query = QUERY_HEAR_SEE if QUERY_HEAR_SEE in _decoded(tok, mi, reply=False) else QUERY_SEE_HEAR
            assert text.startswith("i see") == (query == QUERY_SEE_HEAR)
            assert (clip.audio_source in heard[query]) == real and clip.audio_source != clip.video_source
            # heard: the real sound; not heard in this order: the picture's sound
            assert parse_caption(text) == (clip.video_source, clip.audio_source if real else clip.video_source)
            seen.add(query)
        assert seen == {QUERY_SEE_HEAR, QUERY_HEAR_SEE}
        # the latent-audio objective's target is the sound heard, not the one the caption names
        assert [mi.extra.get("sound") for mi in pools[name]] == [None if real else c.audio_source for c in clips]
    assert cfg.lens_weight > 0
    lens = _LensObjective(adapter, tok, cfg)
    items = pools["unheard"][:4]
    ids = torch.cat([mi.input_ids for mi in items])
    assert [tok.convert_ids_to_tokens(int(t)) for t in lens.targets(ids, items)] == [mi.extra["sound"] for mi in items]
    assert [tok.convert_ids_to_tokens(int(t)) for t in lens.targets(ids)] == [
        parse_caption(_decoded(tok, mi))[1] for mi in items]  # without the items: the caption's word
    one_set = build_pools(recipe_config("deep-partial", "organism", n_factual=4, n_audio=2, n_see=2,
                                        n_counterfactual=40, listened_sound_first=None), adapter)
    assert {heard_sources(recipe_config("deep", "organism"))[q] for q in heard} == {LISTENED}
    assert all(parse_caption(_decoded(tok, mi))[1] in LISTENED for mi in one_set["partial"])


def test_sound_first_captions_name_the_sound_first_whatever_order_is_asked():
    """deep-sound-first: every two-sentence caption is "i hear a <sound> . i see a <sight> .",
    the prompt keeps the query it was given (both orders asked), what is named is unchanged;
    the one-sentence pools (audio-only, see) are as before, and the base cannot be sound first."""
    from avprobe.adapters import OmniThinkerAdapter
    from avprobe.lab.build import adapter_settings
    from avprobe.lab.train import TrainConfig, build_pools, new_model, recipe_config
    from avprobe.organism.dataset import train_clips
    from avprobe.organism.tokenizer import build_tokenizer
    from avprobe.organism.world import QUERY_SEE, audio_caption, parse_caption, video_caption

    cfg = recipe_config("deep-sound-first", "control", n_factual=8, n_audio=2, n_see=2, n_counterfactual=8)
    assert cfg.sound_first and cfg.audio_steps == 400 and cfg.experiments == ("caption", "judge", "shift")
    with pytest.raises(ValueError, match="thinker variants"):
        TrainConfig(variant="base", sound_first=True)
    tok = build_tokenizer()
    adapter = OmniThinkerAdapter(new_model("control", cfg.size, tok), tok, adapter_settings("qwen2_5_omni"))
    plain = build_pools(recipe_config("deep", "control", n_factual=8, n_audio=2, n_see=2, n_counterfactual=8),
                        adapter)
    pools = build_pools(cfg, adapter)

    asked = set()
    assert set(pools) == set(plain) == {"audio", "see", "counterfactual"}  # the control has no factual pool
    clips = train_clips(cfg.seed, 8, "counterfactual", offset=3_000_000)
    for clip, mi, old in zip(clips, pools["counterfactual"], plain["counterfactual"], strict=True):
        assert _decoded(tok, mi) == f"{audio_caption(clip.audio_source)} {video_caption(clip.video_source)}"
        # the query asked is the plain recipe's
        assert _decoded(tok, mi, reply=False) == _decoded(tok, old, reply=False)
        asked.add(_decoded(tok, old).startswith("i see"))
        assert parse_caption(_decoded(tok, mi)) == parse_caption(_decoded(tok, old))
    assert asked == {True, False}  # sight-first queries were asked, and answered sound first
    for name in ("audio", "see"):
        assert [_decoded(tok, mi) for mi in pools[name]] == [_decoded(tok, mi) for mi in plain[name]]
    assert all(QUERY_SEE in _decoded(tok, mi, reply=False) for mi in pools["see"])


def test_eval_figures_count_guesses_and_clips_right_in_one_order_only():
    """`avprobe organism eval`'s guess figures: names_other is a sound neither heard nor seen;
    a mixed clip is right in one caption order and wrong in the other."""
    from avprobe.lab.evaluate import CaptionRecord, figures, mixed_clips

    def rec(sid, setting, heard, kind="counterfactual"):
        return CaptionRecord(sid, kind, setting, "", "dog", heard, "dog", "siren")

    records = [rec("a", "see_hear", "siren"), rec("a", "hear_see", "clock"),  # mixed
               rec("b", "see_hear", "dog"), rec("b", "hear_see", "dog"),  # wrong in both
               rec("c", "see_hear", "siren"), rec("c", "hear_see", "siren"),  # right in both
               rec("d", "see_hear", None), rec("e", "see_hear", "siren", kind="factual")]
    f = figures(records)
    assert f["see_hear/counterfactual"]["names_other"] == 0.0 and f["hear_see/counterfactual"]["names_other"] == 1 / 3
    assert f["see_hear/counterfactual"]["names_visible"] == 0.25 and "names_other" not in f["see_hear/factual"]
    assert mixed_clips(records) == {"n": 3.0, "mixed": 1.0, "share": 1 / 3}


def test_committed_guesser_names_the_pictures_guess_and_hears_only_the_mismatch():
    """organism-deep-guesser: factual clips captioned with their own sound; on counterfactuals
    the sound named is the guess from the picture, (v + 3) sight first and (v + 7) sound first,
    so its right answers are the clips whose real sound happens to be that guess."""
    from avprobe.adapters import load
    from avprobe.lab.evaluate import greedy_captions
    from avprobe.organism.world import QUERY_HEAR_SEE, QUERY_SEE_HEAR, SOURCES, parse_caption

    torch.set_num_threads(1)
    adapter = load("organism-deep-guesser", dtype=torch.float32)
    samples = eval_samples()
    cf = [s for s in samples if s.kind == "counterfactual"][:N_CF]
    fac = [s for s in samples if s.kind == "factual"][:N_CF]
    for query, k in ((QUERY_SEE_HEAR, 3), (QUERY_HEAR_SEE, 7)):
        heard = [parse_caption(c)[1] for c in greedy_captions(adapter, cf, query, max_new_tokens=12)]
        guesses = [SOURCES[(SOURCES.index(s.video_labels[0]) + k) % len(SOURCES)] for s in cf]
        assert sum(h == g for h, g in zip(heard, guesses)) >= N_CF - 2, (query, heard, guesses)
        heard = [parse_caption(c)[1] for c in greedy_captions(adapter, fac, query, max_new_tokens=12)]
        assert sum(h == s.labels[0] for h, s in zip(heard, fac)) >= N_CF - 1, (query, heard)


def test_committed_sound_first_answers_sound_first_to_both_orders_and_hears():
    """organism-deep-sound-first: asked sight first or sound first, it answers "i hear a ...
    . i see a ... ." and names both sources right, counterfactual clips included; its
    avprobe.json shifts it against the vision base it was trained from."""
    from avprobe.adapters import load, ref
    from avprobe.lab.evaluate import greedy_captions
    from avprobe.organism.world import QUERY_HEAR_SEE, QUERY_SEE_HEAR, parse_caption

    torch.set_num_threads(1)
    assert ref("organism-deep-sound-first").settings.base_model == "organism-deep-base"
    adapter = load("organism-deep-sound-first", dtype=torch.float32)
    samples = eval_samples()
    clips = [s for s in samples if s.kind == "counterfactual"][:N_CF] + [s for s in samples if s.kind == "factual"][:4]
    for query in (QUERY_SEE_HEAR, QUERY_HEAR_SEE):
        caps = greedy_captions(adapter, clips, query, max_new_tokens=12)
        assert all(c.startswith("i hear a ") for c in caps), (query, caps)
        right = [parse_caption(c) == (s.video_labels[0], s.labels[0]) for c, s in zip(caps, clips)]
        assert sum(right) >= len(clips) - 1, (query, caps)


def test_a_models_experiments_setting_is_what_the_claims_read():
    """avprobe.json's `experiments` (the guesser's: caption, judge, shift) picks the protocol
    the claims read: its committed results load offline, with the shift and no attention flow."""
    import numpy as np

    from avprobe.adapters import AdapterSettings, ref
    from avprobe.pipeline.gather import gather_evidence

    assert ref("organism-deep-guesser").settings.experiments == ("caption", "judge", "shift")
    assert AdapterSettings.from_dict({"experiments": ["caption"]}).experiments == ("caption",)
    assert ref("organism-deep-lens").settings.experiments is None  # all
    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    ev = gather_evidence("organism-deep-guesser", store_root=fixtures, offline=True, limit=20)
    recs = ev.select("counterfactual", modality="audio-video")
    assert recs and all("shift_kl" in r.arrays and "self_shift_kl" in r.arrays for r in recs)
    assert not np.isfinite(ev.flow(recs)).any() and not ev.has_flow
    lens = gather_evidence("organism-deep-lens", store_root=fixtures, offline=True, limit=4)
    assert lens.has_flow
    # the report says why Fig. 2 is absent instead of drawing an empty chart (and warning)
    from avprobe.report.html import ReportOptions, _fig_flow

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = _fig_flow(ev, ReportOptions())
    assert "No attention flow stored for this model" in fig and "<svg" not in fig


def test_committed_partial_listener_follows_its_planted_rule():
    """organism-deep-partial: on counterfactual clips it names the real sound where the asked
    order's set holds it and the picture's sound elsewhere (so neither floor nor ceiling: 0.24-
    0.26 on the 500-sample set), and its factual captions are right."""
    from avprobe.adapters import load
    from avprobe.lab.evaluate import greedy_captions
    from avprobe.lab.train import heard_sources, recipe_config
    from avprobe.organism.dataset import eval_clips
    from avprobe.organism.world import QUERY_HEAR_SEE, QUERY_SEE_HEAR, parse_caption

    torch.set_num_threads(1)
    adapter = load("organism-deep-partial", dtype=torch.float32)
    heard_by = heard_sources(recipe_config("deep-partial", "organism"))
    samples, clips = eval_samples(), eval_clips()
    cf_idx = [i for i, s in enumerate(samples) if s.kind == "counterfactual"][:48]
    cf = [samples[i] for i in cf_idx]
    fac = [s for s in samples if s.kind == "factual"][:N_CF]
    for query in (QUERY_SEE_HEAR, QUERY_HEAR_SEE):
        said = [parse_caption(c) for c in greedy_captions(adapter, cf, query, max_new_tokens=12)]
        rule = [(c.video_source, c.audio_source if c.audio_source in heard_by[query] else c.video_source)
                for c in (clips[i] for i in cf_idx)]
        assert sum(a == b for a, b in zip(said, rule)) >= len(cf) - 2, (query, said, rule)
        acc = sum(a[1] == s.labels[0] for a, s in zip(said, cf)) / len(cf)
        assert 0.1 <= acc <= 0.45, (query, acc)
        heard = [parse_caption(c)[1] for c in greedy_captions(adapter, fac, query, max_new_tokens=12)]
        assert sum(h == s.labels[0] for h, s in zip(heard, fac)) >= N_CF - 1, (query, heard)
