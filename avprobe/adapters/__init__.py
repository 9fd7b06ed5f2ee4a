"""Model adapters: one file per family, looked up by `config.architectures[0]` in the
registry's table."""

from avprobe.adapters.base import (
    AdapterSettings,
    MediaTokens,
    ModelAdapter,
    ModelInputs,
)
from avprobe.adapters.gemma4 import Gemma4Adapter
from avprobe.adapters.qwen import QwenAdapter
from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter
from avprobe.adapters.qwen2_5_vl import QwenVLAdapter
from avprobe.adapters.qwen3_omni import Qwen3OmniThinkerAdapter
from avprobe.adapters.registry import (
    ADAPTERS,
    ALIASES,
    ORGANISMS,
    ModelRef,
    UnsupportedModel,
    family_class,
    load,
    ref,
    register_adapter,
    supported,
)

__all__ = [
    "ADAPTERS",
    "ALIASES",
    "ORGANISMS",
    "AdapterSettings",
    "Gemma4Adapter",
    "MediaTokens",
    "ModelAdapter",
    "ModelInputs",
    "ModelRef",
    "OmniThinkerAdapter",
    "Qwen3OmniThinkerAdapter",
    "QwenAdapter",
    "QwenVLAdapter",
    "UnsupportedModel",
    "family_class",
    "load",
    "ref",
    "register_adapter",
    "supported",
]
