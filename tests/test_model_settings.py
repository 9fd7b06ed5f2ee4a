"""Model settings (tracker issue 14): a local directory without `avprobe.json` inherits the
settings of the alias of its family and shape, and says so; the prompt layout (query before
or after the media) is a setting every family honours, shown by `avprobe inputs`, stored
with each record and shown in the report. The organisms keep their layout (their inputs are
pinned byte for byte in test_processor_parity.py)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

from avprobe.adapters import ALIASES, load, ref
from avprobe.adapters.base import AdapterSettings
from avprobe.cli import main
from avprobe.testing import random_media, tiny_adapter, tiny_tokenizer
from avprobe.types import Role

QUERY = "describe what you see and hear"


def _omni_text(layers: int, hidden: int) -> dict:
    # a config only (no weights are written): the registry reads config.json alone
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=16, num_key_value_heads=2,
                intermediate_size=hidden * 2, vocab_size=1000,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})


def _save_thinker_config(path, layers: int, hidden: int):
    from transformers import Qwen2_5OmniThinkerConfig

    cfg = Qwen2_5OmniThinkerConfig(text_config=_omni_text(layers, hidden), vision_start_token_id=1,
                                   vision_end_token_id=2)
    cfg.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    cfg.save_pretrained(path)
    return path


# --- settings of a directory without avprobe.json -----------------------------------------------


@pytest.mark.parametrize(("layers", "hidden", "alias"), [(36, 2048, "qwen2.5-omni-3b"), (28, 3584, "qwen2.5-omni-7b")])
def test_directory_without_settings_inherits_the_alias_of_its_shape(tmp_path, caplog, layers, hidden, alias):
    d = _save_thinker_config(tmp_path / "snap", layers, hidden)
    with caplog.at_level(logging.INFO, logger="avprobe.adapters.registry"):
        r = ref(str(d))
    assert r.settings == ALIASES[alias].settings
    assert r.settings.system_prompt and r.settings.base_model == ALIASES[alias].settings.base_model
    assert r.settings.prompt_layout == "text-first"
    assert alias in r.settings_source and "inherited" in r.settings_source
    assert any(alias in rec.getMessage() and "no avprobe.json" in rec.getMessage() for rec in caplog.records)


def test_full_checkpoint_config_matches_through_its_thinker(tmp_path):
    """A whole Qwen2_5OmniForConditionalGeneration snapshot: its shape is its thinker's."""
    from transformers import Qwen2_5OmniConfig

    cfg = Qwen2_5OmniConfig(thinker_config={"text_config": _omni_text(28, 3584), "vision_start_token_id": 1,
                                            "vision_end_token_id": 2})
    cfg.architectures = ["Qwen2_5OmniForConditionalGeneration"]
    cfg.save_pretrained(tmp_path)
    r = ref(str(tmp_path))
    assert r.settings == ALIASES["qwen2.5-omni-7b"].settings and r.n_layers == 28


def test_gemma_directory_matches_its_size(tmp_path):
    from transformers.models.gemma4 import Gemma4Config

    layer_types = (["sliding_attention"] * 4 + ["full_attention"]) * 7
    cfg = Gemma4Config(text_config={"num_hidden_layers": 35, "hidden_size": 1536, "layer_types": layer_types})
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    cfg.save_pretrained(tmp_path)
    r = ref(str(tmp_path))
    assert "gemma-4-e2b" in r.settings_source and r.settings == ALIASES["gemma-4-e2b"].settings


def test_unmatched_directory_keeps_family_defaults_and_says_so(tmp_path, caplog):
    d = _save_thinker_config(tmp_path / "odd", 30, 1024)
    with caplog.at_level(logging.INFO, logger="avprobe.adapters.registry"):
        r = ref(str(d))
    assert r.settings == AdapterSettings() and r.settings_source.startswith("family defaults")
    warned = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert warned and "no alias of family qwen2_5_omni" in warned[0] and "30 layers, hidden size 1024" in warned[0]
    assert "qwen2.5-omni-3b (36 layers, hidden 2048)" in warned[0] and "--base-model" in warned[0]


def test_settings_file_and_alias_win_over_the_shape(tmp_path):
    d = _save_thinker_config(tmp_path / "snap", 36, 2048)
    (d / "avprobe.json").write_text(json.dumps({"fps": 1.0}))
    r = ref(str(d))
    assert r.settings == AdapterSettings(fps=1.0) and r.settings_source == str(d / "avprobe.json")
    assert ref("organism").settings.prompt_layout == "media-first"
    # a built-in organism's file relative to the package: records from any checkout say the same
    assert ref("organism").settings_source == "avprobe/organism/models/organism/avprobe.json"


# --- the prompt layout ------------------------------------------------------------------------


def test_real_aliases_prompt_text_first_and_their_bases_too():
    for name in ("qwen2.5-omni", "qwen2.5-omni-3b", "qwen2.5-omni-7b", "qwen3-omni"):
        s = ALIASES[name].settings
        assert s.prompt_layout == "text-first", name
        if s.base_model:  # the shift teacher-forces the caption through the base: same prompt order
            assert ALIASES[s.base_model].settings.prompt_layout == "text-first"
    assert AdapterSettings().prompt_layout == "media-first"  # the organisms' avprobe.json leave it out
    with pytest.raises(ValueError, match="prompt_layout must be one of media-first, text-first"):
        AdapterSettings(prompt_layout="text-last")


def test_a_base_prompted_in_another_order_is_named():
    from avprobe.adapters.registry import ModelRef
    from avprobe.pipeline.gather import base_layout_mismatch

    def mref(name, layout):
        return ModelRef(name, name, "r", AdapterSettings(prompt_layout=layout), 2, "x")

    assert base_layout_mismatch(mref("m", "text-first"), mref("b", "text-first")) is None
    msg = base_layout_mismatch(mref("m", "text-first"), mref("b", "media-first"))
    assert msg and "b media-first" in msg and '"prompt_layout": "text-first"' in msg


def _chat_template_ids(adapter, content_order: list[str], query: str, media_block: list[int]) -> list[int]:
    """The prompt as a Qwen chat template writes it (the organism's copy of the template: parts
    joined with nothing between them), the video placeholder expanded to `media_block` as the
    processor expands it."""
    content = [{"type": "text", "text": query} if k == "text" else {"type": "video"} for k in content_order]
    text = adapter.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    placeholder = [adapter.special("vision_start"), adapter.special("video"), adapter.special("vision_end")]
    i = next(k for k in range(len(ids)) if ids[k:k + 3] == placeholder)
    return ids[:i] + media_block + ids[i + 3:]


@pytest.mark.parametrize(("layout", "order"), [("media-first", ["video", "text"]), ("text-first", ["text", "video"])])
def test_prompt_layout_gives_the_chat_templates_order(layout, order):
    base = load("organism")
    a = type(base)(base.model, base.tokenizer, replace(base.settings, prompt_layout=layout), name="organism")
    media = random_media(seconds=4.0, size=56)
    mi = a.build_inputs(media, QUERY)
    video, audio = a.encode_video(media), a.encode_audio(media)
    (block,) = a.media_segments(video, audio)
    assert mi.input_ids[0, : mi.prompt_len].tolist() == _chat_template_ids(a, order, QUERY, block)
    roles = mi.roles[: mi.prompt_len]
    first_media = int(torch.nonzero((roles == int(Role.VIDEO)) | (roles == int(Role.AUDIO)))[0])
    query_ids = a.encode(QUERY)
    where = next(k for k in range(mi.prompt_len) if mi.input_ids[0, k:k + len(query_ids)].tolist() == query_ids)
    assert (where < first_media) == (layout == "text-first")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_omni", "gemma4"])
def test_every_family_honours_the_layout(family):
    media = random_media(seconds=2.0, size=64, audio=family != "qwen2_5_vl")
    ids = {}
    for layout in ("media-first", "text-first"):
        a = tiny_adapter(family, n_layers=2)
        a.settings = replace(a.settings, prompt_layout=layout)
        mi = a.build_inputs(media, QUERY)
        roles = mi.roles[: mi.prompt_len].tolist()
        text = a.tokenizer.decode(mi.input_ids[0, : mi.prompt_len].tolist())
        first_media = next(k for k, r in enumerate(roles) if r in (int(Role.VIDEO), int(Role.AUDIO)))
        before = a.tokenizer.decode(mi.input_ids[0, :first_media].tolist())
        assert (QUERY in before) == (layout == "text-first"), (family, layout, text)
        assert QUERY in text
        ids[layout] = mi
    # the same tokens, in another order: nothing but the layout moved
    a_ids, b_ids = (sorted(ids[k].input_ids[0].tolist()) for k in ids)
    assert a_ids == b_ids and ids["media-first"].prompt_len == ids["text-first"].prompt_len


def test_inputs_cli_shows_layout_and_source_of_a_local_directory(tmp_path, capsys):
    from media_factory import make_video

    a = tiny_adapter("qwen2_5_omni", n_layers=2)
    d = tmp_path / "model"
    a.model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    clip = make_video(tmp_path / "c.mp4", seconds=2.0, fps=10)
    assert main(["inputs", str(clip), "--model", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["settings"]["prompt_layout"] == "media-first" and info["settings_source"].startswith("family defaults")
    (d / "avprobe.json").write_text(json.dumps({"prompt_layout": "text-first", "min_pixels": 3136,
                                                "max_pixels": 12544}))
    assert main(["inputs", str(clip), "--model", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["settings"]["prompt_layout"] == "text-first" and info["settings_source"] == str(d / "avprobe.json")
    assert info["prompt"].index(QUERY) < info["prompt"].index("<video x")
    runs = [r["role"] for r in info["role_runs"]]
    assert runs.index("query") < runs.index("video")


# --- records and the report ---------------------------------------------------------------------


def test_records_store_their_input_settings_and_the_report_shows_them():
    from avprobe.pipeline.collect import compute_record
    from avprobe.pipeline.evidence import Evidence
    from avprobe.records import Protocol
    from avprobe.report.html import _inputs_info
    from avprobe.types import Sample

    a = tiny_adapter("qwen2_5_omni", n_layers=2)
    a.settings = replace(a.settings, prompt_layout="text-first")
    a.settings_source = "alias 'x'"
    proto = Protocol(max_new_tokens=2, knockout=False, flow=False, lens=False, shift=False)
    rec = compute_record(a, Sample("s"), random_media(seconds=2.0), QUERY, proto)
    assert rec.meta["inputs"] == {**a.settings.inputs_view(), "source": "alias 'x'"}
    now = {**a.settings.inputs_view(), "source": "alias 'x'"}
    html = _inputs_info(Evidence(model="m", records=[rec], settings=now))
    assert "text-first" in html and "alias &#x27;x&#x27;" in html and "other settings" not in html
    old = replace(a.settings, prompt_layout="media-first").inputs_view()
    html = _inputs_info(Evidence(model="m", records=[rec], settings={**old, "source": "y"}))
    assert "1 record(s) computed with other settings: text-first" in html
