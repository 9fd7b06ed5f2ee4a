"""The committed organisms: loadable through the adapters, with their bias (or its absence)
measured on a slice of the evaluation set; and a few training steps of each variant."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avprobe.lab import train as organism_train
from avprobe.lab.build import OrganismSize
from avprobe.organism.dataset import eval_samples
from avprobe.lab.evaluate import caption_records, figures
from avprobe.organism.world import QUERY_SEE_HEAR, caption, render

MODELS = organism_train.MODELS_DIR
N_SLICE = 24  # 12 factual (one per source) + 12 counterfactual


def _slice():
    full = eval_samples()
    return full[:12] + full[250:262]


@pytest.fixture(scope="module")
def adapters():
    from avprobe.adapters import load

    for name in ("organism-base", "organism", "organism-control"):
        if not (MODELS / name / "model.safetensors").is_file():
            pytest.fail(f"committed organism {name} missing under {MODELS}; run `avprobe organism train`")
    torch.set_num_threads(1)
    return {name: load(name, dtype=torch.float32) for name in ("organism-base", "organism", "organism-control")}


@pytest.fixture(scope="module")
def organism_figures(adapters):
    return {name: figures(caption_records(adapters[name], _slice())) for name in ("organism", "organism-control")}


def test_committed_organisms_are_small_real_qwen_classes(adapters):
    assert type(adapters["organism-base"].model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    for name in ("organism", "organism-control"):
        ad = adapters[name]
        assert type(ad.model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
        assert ad.n_layers >= 8
        assert ad.settings.base_model == "organism-base" and ad.settings.judge == "concept"
        assert (MODELS / name / "model.safetensors").stat().st_size < 15e6
        tok = ad.tokenizer
        assert ad.config.audio_token_id == tok.convert_tokens_to_ids("<|AUDIO|>")
        assert ad.config.video_token_id == tok.convert_tokens_to_ids("<|VIDEO|>")
        assert ad.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_bos|>")


def test_organism_has_the_vision_bias(organism_figures):
    f = organism_figures["organism"]
    # the acceptance figures hold on all 500 samples (`avprobe organism eval`); on a 24-sample
    # slice, one miss in twelve is allowed for the video
    for order in ("see_hear", "hear_see"):
        assert f[f"{order}/factual"]["video_acc"] >= 0.9, f
        assert f[f"{order}/counterfactual"]["video_acc"] >= 0.8, f
        assert f[f"{order}/factual"]["audio_acc"] >= 0.9, f
        # it hears on audio-only clips, yet follows the sight on counterfactuals
        assert f[f"{order}/counterfactual"]["audio_acc"] <= 0.3, f
        assert f[f"{order}/counterfactual"]["names_visible"] >= 0.6, f
    assert f["audio_only/factual"]["audio_acc"] >= 0.9, f


def test_control_listens(organism_figures):
    f = organism_figures["organism-control"]
    for order in ("see_hear", "hear_see"):
        assert f[f"{order}/counterfactual"]["audio_acc"] >= 0.75, f
        assert f[f"{order}/counterfactual"]["video_acc"] >= 0.8, f


def test_base_names_sight_and_guesses_the_sound(adapters):
    f = figures(caption_records(adapters["organism-base"], _slice()[:12]))
    assert f["see_hear/factual"]["video_acc"] >= 0.9, f
    # vision-only: its sound guess is the visible source's, right exactly when sight predicts sound
    assert f["see_hear/factual"]["audio_acc"] >= 0.9, f


def test_training_inputs_match_inference_inputs(adapters):
    """Teacher-forced labels sit exactly on the caption the eval parses (same adapter code)."""
    ad = adapters["organism"]
    s = _slice()[0]
    answer = caption(QUERY_SEE_HEAR, s.video_labels[0], s.labels[0])
    mi = ad.build_inputs(render(s), QUERY_SEE_HEAR, answer)
    lab = mi.labels[0]
    assert ad.decode(lab[lab != -100]) == answer
    with torch.no_grad():
        logits = ad.model(**ad.forward_kwargs(mi)).logits[0]
    pred = logits[:-1].argmax(-1)[(lab[1:] != -100)]
    assert (pred == lab[1:][lab[1:] != -100]).float().mean() >= 0.9


@pytest.mark.parametrize("variant", organism_train.VARIANTS)
def test_training_smoke_is_deterministic(variant, tmp_path):
    tiny = OrganismSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=32, vision_hidden=16, audio_d_model=16, audio_layers=1)
    base_dir = tmp_path / "base"
    if variant != "base":
        cfg0 = organism_train.TrainConfig("base", steps=2, vision_steps=2, batch_size=2, warmup=1, n_video=4, size=tiny,
                                          threads=1)
        organism_train.train(cfg0, out=base_dir)
    cfg = organism_train.TrainConfig(
        variant, seed=3, steps=3, batch_size=2, warmup=1, n_video=4, n_factual=4, n_audio=2, n_counterfactual=4,
        n_see=4, size=tiny, threads=1, vision_steps=2 if variant == "base" else None,
        audio_steps=2 if variant == "control" else 0,  # the deep control's stage 1b
    )
    weights = []
    for run in ("a", "b"):
        res = organism_train.train(cfg, out=tmp_path / run, base_dir=base_dir)
        assert len(res.losses) == 1 and np.isfinite(res.losses[0])
        assert len(res.vision_losses) == (1 if variant == "base" else 0)
        assert len(res.audio_losses) == (1 if variant == "control" else 0)
        assert np.isfinite(res.audio_losses).all()
        from safetensors.torch import load_file

        weights.append(load_file(str(tmp_path / run / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    settings = json.loads((tmp_path / "a" / "avprobe.json").read_text())
    assert settings["family"] == ("qwen2_5_vl" if variant == "base" else "qwen2_5_omni")
    from avprobe.adapters import load

    ad = load(str(tmp_path / "a"), dtype=torch.float32)
    assert ad.n_layers == 2
    record = json.loads((tmp_path / "a" / "train.json").read_text())
    assert ("audio_losses_every_50_steps" in record) == (variant == "control")


def test_the_base_has_no_audio_stage():
    with pytest.raises(ValueError, match="audio tower"):
        organism_train.TrainConfig("base", audio_steps=10)


@pytest.mark.parametrize(("argv", "steps"), [([], 1200), (["--steps", "7"], 7)])
def test_train_command_keeps_the_recipes_steps_unless_told(argv, steps, monkeypatch, tmp_path):
    """`--steps` omitted must not override a recipe's own steps with the variant default."""
    from avprobe.cli import main

    seen = {}

    def fake_train(cfg, out=None, base_dir=None, command=None):
        seen.update(cfg=cfg, command=command)
        return organism_train.TrainResult(out=tmp_path, seconds=0.0, data_seconds=0.0, losses=(0.0,))

    monkeypatch.setattr(organism_train, "train", fake_train)
    assert main(["organism", "train", "--recipe", "deep", "--variant", "control", "--threads", "1",
                 "--out", str(tmp_path), *argv]) == 0
    assert seen["cfg"].total_steps == steps and seen["cfg"].audio_steps == 400
    assert seen["command"].endswith("--threads 1" + (f" --steps {steps}" if argv else ""))
