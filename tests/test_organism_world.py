"""The organism world, tokenizer, evaluation set and weight mapping: deterministic and exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avprobe.organism import dataset, world
from avprobe.lab.build import OrganismSize, thinker_state_from_vl, vl_state_from_thinker
from avprobe.organism.tokenizer import SPECIAL_TOKENS, build_tokenizer, special_token_ids
from avprobe.types import SAMPLE_RATE


def test_render_is_deterministic_and_seed_dependent():
    s = dataset.eval_samples(4)[1]
    a, b = world.render(s), world.render(s)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.waveform, b.waveform)
    assert a.frames.shape == (8, world.FRAME_SIZE, world.FRAME_SIZE, 3) and a.frames.dtype == np.uint8
    assert a.waveform.shape == (int(world.SECONDS * SAMPLE_RATE),) and a.waveform.dtype == np.float32
    other = world.Clip(s.video_labels[0], 12345, s.labels[0], 54321).media()
    assert not np.array_equal(a.frames, other.frames)
    assert not np.array_equal(a.waveform, other.waveform)


@pytest.mark.parametrize("source", world.SOURCES)
def test_every_source_renders_an_audible_sound_and_a_visible_object(source):
    x = world.render_waveform(source, 7)
    assert np.isfinite(x).all() and np.abs(x).max() <= 1.0
    # clearly above the background noise (noise std <= 0.03) where it sounds: the loudest
    # twentieth of 25 ms frames (clicks and ticks are sparse); a quiet sound stays unlearned
    frame_rms = np.sqrt((x[: x.size // 400 * 400].reshape(-1, 400) ** 2).mean(axis=1))
    assert np.quantile(frame_rms, 0.95) > 0.1, source
    frames = world.render_frames(source, 7)
    hue = world.look_of(source).hue
    assert frames.std() > 10  # not a blank clip
    assert 0.0 <= hue < 1.0


def test_looks_need_shape_and_colour_together():
    looks = [world.look_of(s) for s in world.SOURCES]
    assert len({(lk.shape, lk.hue) for lk in looks}) == len(world.SOURCES)
    assert len({lk.hue for lk in looks}) < len(world.SOURCES)  # colour alone is not enough
    assert len({lk.shape for lk in looks}) < len(world.SOURCES)  # nor shape alone


def test_caption_grammar_both_orders_and_parse():
    assert world.caption(world.QUERY_SEE_HEAR, "dog", "siren") == "i see a dog . i hear a siren ."
    assert world.caption(world.QUERY_HEAR_SEE, "dog", "siren") == "i hear a siren . i see a dog ."
    assert world.caption(world.QUERY_HEAR, None, "siren") == "i hear a siren ."
    assert world.caption(world.QUERY_SEE, "dog", "siren") == "i see a dog ."
    assert world.parse_caption("i hear a siren . i see a dog .") == ("dog", "siren")
    # the first sentence of each kind counts: listing sources earns nothing
    assert world.parse_caption("i hear a rain . i hear a siren .") == (None, "rain")
    assert world.parse_caption("i hear a banana .") == (None, None)
    with pytest.raises(ValueError, match="unknown organism source"):
        world.caption(world.QUERY_HEAR, None, "banana")
    with pytest.raises(ValueError, match="unknown organism query"):
        world.caption("what is this", "dog", "dog")


def test_eval_set_is_deterministic_balanced_and_unseen_in_training():
    a, b = dataset.eval_samples(), dataset.eval_samples()
    assert a == b and len(a) == 500
    assert [s.kind for s in a].count("factual") == 250
    for s in a[:250]:
        assert s.labels == s.video_labels and s.kind == "factual"
    for s in a[250:]:
        assert s.labels != s.video_labels and s.kind == "counterfactual"
    assert len({s.media_key for s in a}) == 500
    # every source appears as sound and as sight in the counterfactual half
    assert {s.labels[0] for s in a[250:]} == set(world.SOURCES)
    assert {s.video_labels[0] for s in a[250:]} == set(world.SOURCES)
    eval_seeds = {int(dict(s.meta)[k]) for s in a for k in ("video_seed", "audio_seed")}
    assert min(eval_seeds) >= world.EVAL_SEED_BASE
    for kind in ("factual", "counterfactual", "audio", "video"):
        clips = dataset.train_clips(99, 50, kind, offset=world._TRAIN_RUN_STRIDE // 2 - 60)
        assert max(max(c.video_seed, c.audio_seed) for c in clips) < world.EVAL_SEED_BASE
    with pytest.raises(ValueError, match="training seed out of range"):
        world.train_seed(100, 0)


def test_sample_meta_roundtrip_and_audio_only():
    s = dataset.eval_samples(300)[290]
    assert world.sample_to_clip(s).media_key == s.media_key
    assert dataset.sample_from_record(json.loads(json.dumps(dataset.sample_record(s)))) == s
    ao = world.audio_only(s)
    m = world.render(ao)
    assert m.frames is None and np.array_equal(m.waveform, world.render(s).waveform)
    assert ao.labels == s.labels and ao.video_labels == () and ao.kind == "factual"
    with pytest.raises(ValueError, match="not an organism sample"):
        world.render(type(s)(id="x"))


def test_mp4_export_decodes_back(tmp_path):
    av = pytest.importorskip("av")
    manifest = dataset.write_dataset(tmp_path, n=2, mp4=True)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["kind"] == "counterfactual"
    path = tmp_path / rows[0]["video"]
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(str(path)) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].rate
    ref = world.render(dataset.sample_from_record(rows[0]))
    assert frames.shape == ref.frames.shape and rate == SAMPLE_RATE
    assert np.abs(frames.astype(int) - ref.frames).mean() < 12  # lossy, but the same picture
    n = ref.waveform.size
    assert audio.size >= n
    # aac adds a priming delay; compare energy, not samples
    assert abs(np.sqrt(np.mean(audio**2)) - np.sqrt(np.mean(ref.waveform**2))) < 0.05


def test_tokenizer_one_token_per_word_and_specials():
    tok = build_tokenizer()
    for name in world.SOURCES:
        assert len(tok(name, add_special_tokens=False)["input_ids"]) == 1
    ids = tok("i see a dog . i hear a siren .", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 10
    assert tok.decode(ids) == "i see a dog . i hear a siren ."
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    sid = special_token_ids(tok)
    assert len({sid[k] for k in sid if k not in ("bos_token_id", "pad_token_id")}) == len(sid) - 2
    text = tok.apply_chat_template([{"role": "user", "content": "describe what you hear"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user") and text.endswith("<|im_start|>assistant\n")


def test_vl_thinker_weight_mapping_roundtrips():
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from avprobe.lab.build import thinker_config, vl_config

    tok = build_tokenizer()
    ids = special_token_ids(tok)
    size = OrganismSize(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=32, vision_hidden=16, audio_d_model=16, audio_layers=1)
    torch.manual_seed(0)
    vl = Qwen2_5_VLForConditionalGeneration(vl_config(size, len(tok), ids))
    th = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(size, len(tok), ids))
    state = thinker_state_from_vl(vl.state_dict())
    missing, unexpected = th.load_state_dict(state, strict=False)
    assert not unexpected and missing and all(k.startswith("model.audio_tower.") for k in missing)
    back = vl_state_from_thinker(th.state_dict())
    ref = vl.state_dict()
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    assert th.config.video_token_id == ids["video_token_id"] and th.config.vision_start_token_id == ids["vision_start_token_id"]
