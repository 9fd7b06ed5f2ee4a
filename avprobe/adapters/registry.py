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
from avprobe.adapters.nemotron_h_omni import NemotronHOmniAdapter
from avprobe.adapters.phi4_multimodal import Phi4MultimodalAdapter
from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter
from avprobe.adapters.qwen2_5_vl import QwenVLAdapter
from avprobe.adapters.qwen3_omni import Qwen3OmniThinkerAdapter

log = logging.getLogger(__name__)

ORGANISM_DIR = Path(__file__).resolve().parent.parent / "organism" / "models"
# The built-in organisms, with the (recipe, variant) of `avprobe organism train` that makes each.
ORGANISMS: dict[str, tuple[str, str]] = {
    "organism": ("v1", "organism"),
    "organism-control": ("v1", "control"),
    "organism-base": ("v1", "base"),
    "organism-deep": ("deep", "organism"),
    "organism-deep-lens": ("deep-lens", "organism"),
    "organism-deep-partial": ("deep-partial", "organism"),
    "organism-deep-control": ("deep", "control"),
    "organism-deep-flipped": ("deep-flipped", "organism"),
    "organism-deep-guesser": ("deep-guesser", "control"),
    "organism-deep-sound-first": ("deep-sound-first", "control"),
    "organism-deep-base": ("deep", "base"),
}

SELF_ABLATED = "self-ablated"  # the shift base `records.shift_bases` reads: the model without its audio

_QWEN_OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)


@dataclass(frozen=True)
class Alias:
    """A known checkpoint: its HF id, the settings it runs with, and its shape (the family it
    loads as, the text model's depth and width, as its config.json gives them). A local
    directory without `avprobe.json` inherits the settings of the alias whose shape it has."""

    hf_id: str
    settings: AdapterSettings
    family: str
    n_layers: int
    hidden_size: int


# The paper's release prompts the Qwen models with the query before the video (issue 14): the
# real Qwen aliases run text-first, their Qwen2.5-VL bases too (the base-model shift must see the
# prompt the AV model saw). The organisms keep media-first (their avprobe.json, the default).
_PAPER_LAYOUT = "text-first"

ALIASES: dict[str, Alias] = {
    "qwen2.5-omni-3b": Alias(
        "Qwen/Qwen2.5-Omni-3B",
        AdapterSettings(system_prompt=_QWEN_OMNI_SYSTEM, base_model="qwen2.5-vl-3b", prompt_layout=_PAPER_LAYOUT),
        "qwen2_5_omni", 36, 2048,
    ),
    "qwen2.5-omni-7b": Alias(
        "Qwen/Qwen2.5-Omni-7B",
        AdapterSettings(system_prompt=_QWEN_OMNI_SYSTEM, base_model="qwen2.5-vl-7b", prompt_layout=_PAPER_LAYOUT),
        "qwen2_5_omni", 28, 3584,
    ),
    "qwen3-omni": Alias(
        "Qwen/Qwen3-Omni-30B-A3B-Instruct",
        AdapterSettings(system_prompt=None, base_model=None, prompt_layout=_PAPER_LAYOUT),
        "qwen3_omni", 48, 2048,
    ),
    "qwen2.5-vl-3b": Alias("Qwen/Qwen2.5-VL-3B-Instruct",
                           AdapterSettings(use_audio_in_video=False, prompt_layout=_PAPER_LAYOUT),
                           "qwen2_5_vl", 36, 2048),
    "qwen2.5-vl-7b": Alias("Qwen/Qwen2.5-VL-7B-Instruct",
                           AdapterSettings(use_audio_in_video=False, prompt_layout=_PAPER_LAYOUT),
                           "qwen2_5_vl", 28, 3584),
    # Gemma 4 with an audio tower (E2B, E4B). Audio is its own block after the frames
    # (use_audio_in_video does not apply); no vision-only base of the same weights exists: the
    # shift base is the model itself with the audio removed.
    "gemma-4-e2b": Alias("google/gemma-4-E2B-it", AdapterSettings(use_audio_in_video=False, base_model=SELF_ABLATED),
                         "gemma4", 35, 1536),
    "gemma-4-e4b": Alias("google/gemma-4-E4B-it", AdapterSettings(use_audio_in_video=False, base_model=SELF_ABLATED),
                         "gemma4", 42, 2560),
    # Phi-4-multimodal in transformers' format (the hub's refs/pr/70; main holds remote code).
    # Shape: Phi-4-mini's text model (32 layers, hidden 3072), not checked against the released
    # config.json here.
    "phi-4-multimodal": Alias("microsoft/Phi-4-multimodal-instruct",
                              AdapterSettings(use_audio_in_video=False, base_model=SELF_ABLATED), "phi4_multimodal",
                              32, 3072),
}
ALIASES["qwen2.5-omni"] = ALIASES["qwen2.5-omni-3b"]  # the paper's representative model
ALIASES["gemma-4"] = ALIASES["gemma-4-e4b"]
# Nemotron 3 Nano Omni: hybrid Mamba-2 / attention; audio is its own block after the frames.
# Its shape (52 hybrid layers, hidden 2688) is the Nemotron 3 Nano model card's, not checked against
# the released config.json here: a local directory of another shape keeps the family defaults.
ALIASES["nemotron-3-nano-omni"] = Alias("nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16",
                                        AdapterSettings(use_audio_in_video=False), "nemotron_h_omni", 52, 2688)

# The table: every adapter class avprobe ships.
ADAPTERS: tuple[type[ModelAdapter], ...] = (OmniThinkerAdapter, Qwen3OmniThinkerAdapter, QwenVLAdapter, Gemma4Adapter,
                                           NemotronHOmniAdapter, Phi4MultimodalAdapter)

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


def canonical_alias(alias: Alias) -> str:
    """The first name an alias is registered under (`qwen2.5-omni-3b`, not its synonym)."""
    return next(name for name, a in ALIASES.items() if a is alias)


def text_shape(cls: type[ModelAdapter], config: Any, architecture: str) -> tuple[int, int]:
    """(depth, hidden size) of a checkpoint's text model, from its config alone."""
    text = cls.text_config_of(config, architecture)
    return int(text.num_hidden_layers), int(getattr(text, "hidden_size", 0) or 0)


def match_alias(cls: type[ModelAdapter], config: Any, architecture: str) -> tuple[str | None, str]:
    """The alias whose family and text-model shape a checkpoint's config has -> (its name or
    None, a sentence saying which settings apply and why)."""
    layers, hidden = text_shape(cls, config, architecture)
    shape = f"{architecture}, {layers} layers, hidden size {hidden}"
    found: list[str] = []
    for name, a in ALIASES.items():
        if a.family == cls.family and a.n_layers == layers and a.hidden_size == hidden:
            canon = canonical_alias(a)
            if canon not in found:
                found.append(canon)
    if len(found) == 1:
        return found[0], f"the settings of alias {found[0]!r}, whose shape it has ({shape})"
    known = sorted(f"{canonical_alias(a)} ({a.n_layers} layers, hidden {a.hidden_size})"
                   for a in {id(a): a for a in ALIASES.values() if a.family == cls.family}.values())
    why = (f"several aliases have its shape ({', '.join(found)})" if found else
           f"no alias of family {cls.family} has its shape ({shape})"
           + (f"; known: {', '.join(known)}" if known else ""))
    return None, f"the family defaults (no system prompt, no base model, media first): {why}"


def resolve_settings(name_or_path: str, path: Path | None, config: Any, cls: type[ModelAdapter], architecture: str,
                     alias_settings: AdapterSettings | None, given: AdapterSettings | None = None
                     ) -> tuple[AdapterSettings, str]:
    """The settings a model runs with, and where they come from (said in a log line, stored with
    each record, shown by `avprobe inputs` and the report): given by the caller; the
    `avprobe.json` beside the weights; the alias named; else, for a local directory or HF id
    without either, the alias whose family and text-model shape its config has; else the
    family defaults."""
    if given is not None:
        return given, "given by the caller"
    if path is not None:
        from_file = _read_settings(path)
        if from_file is not None:
            return from_file, _shown_path(path / "avprobe.json")
    if alias_settings is not None:
        return alias_settings, f"alias {name_or_path!r}"
    name, why = match_alias(cls, config, architecture)
    if name is not None:
        log.info("%s has no avprobe.json: it runs with %s. Put an avprobe.json beside the weights to change them.",
                 name_or_path, why)
        return ALIASES[name].settings, f"inherited from alias {name!r} (no avprobe.json; same family and shape)"
    log.warning("%s has no avprobe.json: it runs with %s. The base-model shift claims are skipped unless "
                "--base-model is given; put an avprobe.json beside the weights to set them.", name_or_path, why)
    return AdapterSettings(), "family defaults (no avprobe.json, no alias of the same shape)"


def _shown_path(f: Path) -> str:
    """A built-in organism's file relative to the package (records computed from any checkout
    then say the same thing); any other file as given."""
    try:
        return str(f.resolve().relative_to(ORGANISM_DIR.parent.parent.parent))
    except ValueError:
        return str(f)


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
    settings_source: str = ""  # where `settings` come from (`resolve_settings`)

    def load(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = "auto",
             local_files_only: bool = True) -> ModelAdapter:
        adapter = load(self.target, device=device, dtype=dtype, settings=self.settings,
                       local_files_only=local_files_only)
        adapter.name = self.name
        adapter.settings_source = self.settings_source
        return adapter


def _config(name_or_path: str, local_files_only: bool) -> tuple[str, AdapterSettings | None, str, Path | None, Any]:
    from transformers import AutoConfig

    target, alias_settings, display = resolve(name_or_path)
    path = Path(target) if Path(target).exists() else None
    if name_or_path in ORGANISMS and path is None:
        raise FileNotFoundError(
            f"organism {name_or_path!r} not found at {target}; train it with `avprobe organism train "
            f"--recipe {ORGANISMS[name_or_path][0]} --variant {ORGANISMS[name_or_path][1]}`"
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
    settings, source = resolve_settings(name_or_path, path, config, cls, arch, alias_settings, settings)
    text = cls.text_config_of(config, arch)
    return ModelRef(display, target, _revision(path, config), settings, int(text.num_hidden_layers), arch, source)


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
    settings, source = resolve_settings(name_or_path, path, config, cls, arch, alias_settings, settings)
    dtype = torch_dtype(dtype)
    if path is not None and path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        # checked before the weights load: without it every sample fails minutes later
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy them from "
                                "the model's snapshot into that directory")
    model = cls.load_pretrained(arch, target, dtype=dtype, local_files_only=local_files_only)
    model.eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local_files_only)
    adapter = cls(model, tokenizer, settings, name=display, revision=_revision(path, config))
    adapter.settings_source = source
    return adapter


def supported() -> list[str]:
    return sorted(_BY_ARCH)
