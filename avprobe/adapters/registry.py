"""Adapter registry: a plain table of adapter classes, looked up by `config.architectures[0]`
(each class declares the architectures it handles) or by family name, plus short model aliases.

    load("qwen2.5-omni-3b")           # HF id, from the local HF cache (no download here)
    load("/data/Qwen2.5-Omni-7B")     # a local directory
    load("organism")                  # the built-in model organism

Nothing here names an architecture: how a checkpoint is loaded and unwrapped, and where its
text config sits, are the adapter's (`ModelAdapter.load_pretrained`, `text_config_of`).
A new model family is one new adapter file plus a row in `ADAPTERS` (or `register_adapter`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avprobe.adapters.base import AdapterSettings, ModelAdapter
from avprobe.adapters.gemma4 import Gemma4Adapter
from avprobe.adapters.phi4_multimodal import Phi4MultimodalAdapter
from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter
from avprobe.adapters.qwen2_5_vl import QwenVLAdapter
from avprobe.adapters.qwen3_omni import Qwen3OmniThinkerAdapter

log = logging.getLogger(__name__)

ORGANISM_DIR = Path(__file__).resolve().parent.parent / "organism" / "models"
ORGANISMS = ("organism", "organism-control", "organism-base")

SELF_ABLATED = "self-ablated"  # the shift base `records.shift_bases` reads: the model without its audio

_QWEN_OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


@dataclass(frozen=True)
class Alias:
    hf_id: str
    settings: AdapterSettings


ALIASES: dict[str, Alias] = {
    "qwen2.5-omni-3b": Alias(
        "Qwen/Qwen2.5-Omni-3B", AdapterSettings(system_prompt=_QWEN_OMNI_SYSTEM, base_model="qwen2.5-vl-3b")
    ),
    "qwen2.5-omni-7b": Alias(
        "Qwen/Qwen2.5-Omni-7B", AdapterSettings(system_prompt=_QWEN_OMNI_SYSTEM, base_model="qwen2.5-vl-7b")
    ),
    "qwen3-omni": Alias(
        "Qwen/Qwen3-Omni-30B-A3B-Instruct", AdapterSettings(system_prompt=None, base_model=None)
    ),
    "qwen2.5-vl-3b": Alias("Qwen/Qwen2.5-VL-3B-Instruct", AdapterSettings(use_audio_in_video=False)),
    "qwen2.5-vl-7b": Alias("Qwen/Qwen2.5-VL-7B-Instruct", AdapterSettings(use_audio_in_video=False)),
    # Gemma 4 with an audio tower (E2B, E4B). Audio is its own block after the frames
    # (use_audio_in_video does not apply); no vision-only base of the same weights exists: the
    # shift base is the model itself with the audio removed.
    "gemma-4-e2b": Alias("google/gemma-4-E2B-it", AdapterSettings(use_audio_in_video=False, base_model=SELF_ABLATED)),
    "gemma-4-e4b": Alias("google/gemma-4-E4B-it", AdapterSettings(use_audio_in_video=False, base_model=SELF_ABLATED)),
    # Phi-4-multimodal in transformers' format (the hub's refs/pr/70; main holds remote code).
    "phi-4-multimodal": Alias("microsoft/Phi-4-multimodal-instruct",
                              AdapterSettings(use_audio_in_video=False, base_model=SELF_ABLATED)),
}
ALIASES["qwen2.5-omni"] = ALIASES["qwen2.5-omni-3b"]  # the paper's representative model
ALIASES["gemma-4"] = ALIASES["gemma-4-e4b"]

# The table: every adapter class avprobe ships.
ADAPTERS: tuple[type[ModelAdapter], ...] = (OmniThinkerAdapter, Qwen3OmniThinkerAdapter, QwenVLAdapter, Gemma4Adapter,
                                            Phi4MultimodalAdapter)

_BY_ARCH: dict[str, type[ModelAdapter]] = {}
_BY_FAMILY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class for each architecture name it declares, and its family."""
    for arch in cls.architectures:
        _BY_ARCH[arch] = cls
    _BY_FAMILY[cls.family] = cls
    return cls


for _cls in ADAPTERS:
    register_adapter(_cls)


class UnsupportedModel(ValueError):
    pass


def adapter_class(architecture: str) -> type[ModelAdapter]:
    try:
        return _BY_ARCH[architecture]
    except KeyError:
        supported = ", ".join(sorted(_BY_ARCH))
        raise UnsupportedModel(
            f"no avprobe adapter for architecture {architecture!r}. Supported: {supported}. "
            "To add one, subclass avprobe.adapters.base.ModelAdapter (fill `architectures`, `paths`, "
            "`special_tokens`, `turn_end`, the media and prompt hooks, `compute_positions` and `step_positions`) "
            "and call avprobe.adapters.register_adapter(YourAdapter)."
        ) from None


def family_class(family: str) -> type[ModelAdapter]:
    """The adapter class of a family name (`ModelAdapter.family`, e.g. "gemma4")."""
    try:
        return _BY_FAMILY[family]
    except KeyError:
        raise UnsupportedModel(f"unknown family {family!r}; known: {', '.join(sorted(_BY_FAMILY))}") from None


def resolve(name_or_path: str) -> tuple[str, AdapterSettings | None, str]:
    """-> (path or HF id, alias settings or None, display name)."""
    if name_or_path in ORGANISMS:
        return str(ORGANISM_DIR / name_or_path), None, name_or_path
    if name_or_path in ALIASES:
        a = ALIASES[name_or_path]
        return a.hf_id, a.settings, name_or_path
    return name_or_path, None, name_or_path


def _read_settings(path: Path) -> AdapterSettings | None:
    f = path / "avprobe.json"
    if not f.is_file():
        return None
    try:
        return AdapterSettings.from_dict(json.loads(f.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{f}: invalid adapter settings ({exc}); fix or delete the file") from exc


def _revision(path: Path | None, config: Any) -> str:
    """A stable id of the weights: the HF commit when known, else a hash of the weight files."""
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    if path is not None and path.is_dir():
        import hashlib

        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
        return "local-" + h.hexdigest()[:12]
    return "unknown"


@dataclass(frozen=True)
class ModelRef:
    """A model known by name, revision and settings, without loading its weights: enough to
    address cached results, so a fully cached run never loads the model."""

    name: str
    target: str
    revision: str
    settings: AdapterSettings
    n_layers: int
    architecture: str

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto",
             local_files_only: bool = True) -> ModelAdapter:
        adapter = load(self.target, device=device, dtype=dtype, settings=self.settings,
                       local_files_only=local_files_only)
        adapter.name = self.name
        return adapter


def _config(name_or_path: str, local_files_only: bool) -> tuple[str, AdapterSettings | None, str, Path | None, Any]:
    from transformers import AutoConfig

    target, alias_settings, display = resolve(name_or_path)
    path = Path(target) if Path(target).exists() else None
    if name_or_path in ORGANISMS and path is None:
        raise FileNotFoundError(
            f"organism {name_or_path!r} not found at {target}; train it with "
            f"`avprobe organism train --variant {name_or_path.removeprefix('organism-') if '-' in name_or_path else 'organism'}`"
        )
    try:
        config = AutoConfig.from_pretrained(target, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:  # ValueError: the hub's check of a name that is no repo id
        import difflib

        known = sorted({*ALIASES, *ORGANISMS})
        close = difflib.get_close_matches(name_or_path, known, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "") + (
            f"Known names: {', '.join(known)}. " if "/" not in name_or_path else "")
        raise FileNotFoundError(
            f"{hint}cannot load model {name_or_path!r} ({target}): not a local directory and not in the local "
            f"HF cache. Download it first (`hf download {target}`, then rerun; or pass --allow-download), "
            f"or give the local snapshot directory as --model DIR. ({exc})"
        ) from exc
    return target, alias_settings, display, path, config


def ref(name_or_path: str, settings: AdapterSettings | None = None, local_files_only: bool = True) -> ModelRef:
    """Resolve a model name to a `ModelRef` (reads only its config)."""
    target, alias_settings, display, path, config = _config(name_or_path, local_files_only)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    cls = adapter_class(arch)  # fail early, with the list of supported architectures
    settings = settings or (path and _read_settings(path)) or alias_settings or AdapterSettings()
    text = cls.text_config_of(config, arch)
    return ModelRef(display, target, _revision(path, config), settings, int(text.num_hidden_layers), arch)


# Short dtype names people type, mapped to torch's.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def torch_dtype(spec: torch.dtype | str) -> torch.dtype | str:
    """`auto`, a torch floating dtype or its name (bf16, fp16 and fp32 too); else ValueError."""
    if not isinstance(spec, str) or spec == "auto":
        return spec
    name = DTYPE_ALIASES.get(spec, spec)
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"--dtype {spec!r} is not a torch floating dtype; use auto, float32, bfloat16 (bf16) "
                         "or float16 (fp16)")
    return dt


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load(
    name_or_path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    settings: AdapterSettings | None = None,
    local_files_only: bool = True,
) -> ModelAdapter:
    """Load a model and wrap it in its adapter.

    `local_files_only=True` by default: avprobe never downloads silently; pass False (or
    `--allow-download` in the CLI) on a machine that may reach the hub.
    """
    from transformers import AutoTokenizer

    target, alias_settings, display, path, config = _config(name_or_path, local_files_only)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    cls = adapter_class(arch)
    settings = settings or (path and _read_settings(path)) or alias_settings or AdapterSettings()
    dtype = torch_dtype(dtype)
    if path is not None and path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        # checked before the weights load: without it every sample fails minutes later
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy them from "
                                "the model's snapshot into that directory")
    model = cls.load_pretrained(arch, target, dtype=dtype, local_files_only=local_files_only)
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local_files_only)
    return cls(model, tokenizer, settings, name=display, revision=_revision(path, config))


def supported() -> list[str]:
    return sorted(_BY_ARCH)
