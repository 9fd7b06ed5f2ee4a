"""Model adapters: one file per family, looked up by `config.architectures[0]`."""

from avprobe.adapters.base import AdapterSettings, ModelAdapter, ModelInputs
from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter
from avprobe.adapters.qwen2_5_vl import QwenVLAdapter
from avprobe.adapters.qwen3_omni import Qwen3OmniThinkerAdapter
from avprobe.adapters.registry import (
    ALIASES,
    ORGANISMS,
    ModelRef,
    UnsupportedModel,
    load,
    ref,
    register_adapter,
    supported,
)

__all__ = [
    "ALIASES",
    "ORGANISMS",
    "AdapterSettings",
    "ModelAdapter",
    "ModelInputs",
    "ModelRef",
    "OmniThinkerAdapter",
    "Qwen3OmniThinkerAdapter",
    "QwenVLAdapter",
    "UnsupportedModel",
    "load",
    "ref",
    "register_adapter",
    "supported",
]
