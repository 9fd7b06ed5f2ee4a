"""The family-neutral adapter interface (tracker issue 15, part 1): the base adapter assumes no
family, the registry is a plain table of adapter classes, tiny models come from the classes."""

from __future__ import annotations

import inspect

import pytest
import torch

from avprobe.adapters import ADAPTERS, ModelAdapter, family_class, supported
from avprobe.adapters import registry as registry_module
from avprobe.testing import random_media, tiny_adapter

CANONICAL = ("text_model", "layers", "final_norm", "embed", "unembed")


def test_base_adapter_names_no_family():
    assert ModelAdapter.paths == {} and ModelAdapter.special_tokens == {}
    assert ModelAdapter.turn_end is None and ModelAdapter.checkpoints == {}
    src = inspect.getsource(ModelAdapter)
    for word in ("im_end", "im_start", "Qwen", "mrope", "Whisper", "vision_bos", "thinker"):
        assert word not in src, word
    with pytest.raises(NotImplementedError):
        ModelAdapter.tiny()


def test_registry_is_a_table_without_architecture_names():
    src = inspect.getsource(registry_module)
    assert "ForConditionalGeneration" not in src and "thinker" not in src
    archs = {a for cls in ADAPTERS for a in cls.architectures}
    assert archs == set(supported())
    for cls in ADAPTERS:
        assert family_class(cls.family) is cls
        assert set(cls.paths) == set(CANONICAL), cls.__name__
        assert cls.turn_end in cls.special_tokens, cls.__name__


@pytest.mark.parametrize("cls", ADAPTERS, ids=lambda c: c.family)
def test_each_family_builds_its_tiny_model_and_decodes_one_step(cls):
    a = tiny_adapter(cls.family, n_layers=2)
    assert type(a) is cls and a.n_layers == 2
    mi = a.build_inputs(random_media(seconds=2.0, audio=cls.has_audio), "describe what you see and hear")
    with torch.no_grad():
        own = a.model(**a.forward_kwargs(mi)).logits[0, -1]
        # the decode-step hooks continue the prompt's positions: one step from the last
        # prompt token's own input reproduces the model's logits there
        prefix = a.forward_kwargs(mi, upto=mi.prompt_len - 1)
        from transformers import DynamicCache

        cache = DynamicCache(config=a.text_config)
        a.model(**prefix, cache=cache, use_cache=True)
        tok = mi.input_ids[0, mi.prompt_len - 1 :].to(a.device)
        h = a.text_model(**a.decode_inputs(tok), position_ids=a.step_positions(mi, 0, 1), cache=cache,
                         use_cache=True)
        step = a.logits(h.last_hidden_state[:, -1])[0]
    torch.testing.assert_close(step, own, rtol=1e-4, atol=1e-4)
