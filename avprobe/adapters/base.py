"""The ModelAdapter interface: everything model-specific lives behind it.

The base class assumes no model family. Each adapter declares, as class data or small hooks:

- its canonical parts (`paths`: `text_model`, `layers`, `final_norm`, `embed`, `unembed`);
- how a checkpoint's full model is unwrapped into the probed part (`checkpoints`) and where
  its text config sits (`text_config_of`), so the registry never names an architecture;
- its special tokens (`special_tokens`: config attributes or token strings) and the token
  that ends a turn (`turn_end`: an EOS for decoding, the close of a teacher-forced answer);
- its prompt format (`prompt_segments`) and media layout (`encode_video`, `encode_audio`,
  `media_segments`), built without torchvision;
- its rotary positions, for the prompt (`compute_positions`) and for decode steps
  (`step_positions`), whatever their layout (Qwen's three M-RoPE axes, Gemma's one);
- how a decode step is fed (`decode_inputs`), how hidden states become logits (`logits`),
  model state one prompt's run must hold fixed (`prompt_scope`, e.g. a rotary set chosen by
  length), and a tiny random model of the family for tests (`tiny`).

Probes and the engine speak only these canonical names and hooks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from avprobe.media.decode import DEFAULT_FRAME_RULE, FRAME_RULES
from avprobe.types import Media, Role

log = logging.getLogger(__name__)

# A prompt is a list of segments: text (tokenized) or explicit token ids (specials, media).
Segment = str | list[int]

# Where the query sits in the user turn (`AdapterSettings.prompt_layout`): after the media
# block (what avprobe always built, and what the organisms were trained on) or before it (the
# paper's release: its user turn lists the text, then the video).
PROMPT_LAYOUTS = ("media-first", "text-first")


@dataclass(frozen=True)
class AdapterSettings:
    """How a model is prompted. Saved as `avprobe.json` next to local weights."""

    use_audio_in_video: bool = True  # the paper's setting for Qwen2.5-Omni
    system_prompt: str | None = None
    fps: float = 2.0  # video frames sampled per second
    min_pixels: int | None = None  # None: the family's processor default
    max_pixels: int | None = None
    max_frames: int = 768
    base_model: str | None = None  # the vision-only base for the shift analysis
    judge: str | None = None  # the default fidelity judge for this model
    seconds_per_chunk: float = 2.0  # audio-in-video interleaving chunk (Qwen2.5-Omni)
    queries: tuple[str, ...] | None = None  # prompts to run (None: "describe what you see and hear")
    # Which source frames a decoded clip keeps (`avprobe.media.decode.sample_indices`):
    # "linspace" = linspace(0, total-1, n).round(), qwen-omni-utils' rule, which the paper's
    # release ran; "floor" = floor(i*total/n), transformers' Qwen2VLVideoProcessor. Only file
    # decoding uses it: the organisms' in-memory clips are rendered at `fps` and never sampled.
    frame_rule: str = DEFAULT_FRAME_RULE
    # The user turn's order (PROMPT_LAYOUTS): "media-first" = media block, then the query (the
    # organisms' committed avprobe.json leave it out: they were trained so); "text-first" = the
    # query, then the media, as the paper's release prompted (the real Qwen aliases set it).
    prompt_layout: str = "media-first"
    # The experiments of `avprobe collect` the claims read for this model (None: all). A
    # counterpart built for a few claims (organism-deep-guesser: caption, judge, shift) keeps
    # its stored results small; the claims that need the others skip, saying so.
    experiments: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.frame_rule not in FRAME_RULES:
            raise ValueError(f"frame_rule must be one of {', '.join(FRAME_RULES)}; got {self.frame_rule!r}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {', '.join(PROMPT_LAYOUTS)}; got {self.prompt_layout!r}")

    def inputs_view(self) -> dict[str, Any]:
        """The settings that change a model's inputs (JSON-able): what `avprobe inputs`, the
        stored records and the report show."""
        return {"prompt_layout": self.prompt_layout, "system_prompt": self.system_prompt, "fps": self.fps,
                "max_frames": self.max_frames, "frame_rule": self.frame_rule, "min_pixels": self.min_pixels,
                "max_pixels": self.max_pixels, "use_audio_in_video": self.use_audio_in_video,
                "seconds_per_chunk": self.seconds_per_chunk}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSettings:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known - {"family"}
        if unknown:
            log.warning("ignoring unknown adapter settings: %s", sorted(unknown))
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("queries", "experiments"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


@dataclass
class ModelInputs:
    """Inputs of one prompt (batch 1) plus per-position annotations.

    roles: [P] Role values; times: [P] seconds into the clip for video/audio positions,
    NaN elsewhere; positions: explicit rotary positions in the family's layout, the sequence
    on the last axis (Qwen M-RoPE [3, 1, P], Gemma [1, P]); labels: [1, P] with -100 outside
    the answer (only when an answer was given, for training / teacher forcing).
    """

    inputs: dict[str, Any]
    roles: torch.Tensor
    times: torch.Tensor
    positions: torch.Tensor
    prompt_len: int
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def role_positions(self, role: Role) -> torch.Tensor:
        return torch.nonzero(self.roles == int(role)).flatten()


@dataclass
class MediaTokens:
    """One modality of a sample, encoded for the model: its input tensors, how many prompt
    tokens it fills, and per token its time (the model's time axis, for the layout; and
    seconds into the clip, for the `times` annotation). `layout` holds what else the family's
    `media_segments` needs (e.g. tokens per frame)."""

    tensors: dict[str, Any]
    n_tokens: int
    times: np.ndarray  # [n_tokens] the model's time axis (may be empty where unused)
    clip_times: torch.Tensor  # [n_tokens] float32 seconds into the clip
    layout: dict[str, Any] = field(default_factory=dict)


# Where transformers 5 keeps the parts of a model whose language model sits at
# model.language_model (the Qwen families, Gemma 4): a layout, not a family.
LANGUAGE_MODEL_PATHS: dict[str, str] = {
    "text_model": "model.language_model",
    "layers": "model.language_model.layers",
    "final_norm": "model.language_model.norm",
    "embed": "model.language_model.embed_tokens",
    "unembed": "lm_head",
}


# How a text config's `layer_types` entry mixes positions (see `ModelAdapter.layer_kinds`).
LAYER_KINDS: dict[str, str] = {
    "full_attention": "attention", "sliding_attention": "attention", "chunked_attention": "attention",
    "linear_attention": "recurrent", "mamba": "recurrent", "conv": "recurrent",
    "mlp": "none", "moe": "none",
}


def _pass_through_layer() -> Any:
    """A cache layer for an attention layer whose keys and values live elsewhere (the engine's
    session): it stores nothing, returns what it is given, and reports no past, so the
    model's causal mask covers the current call only."""
    from transformers.cache_utils import DynamicLayer

    class PassThroughLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0

    return PassThroughLayer()


class ModelAdapter:
    """Base adapter: no family. Subclasses declare the class data and implement the hooks
    marked "family-specific"."""

    family: ClassVar[str] = "base"
    architectures: ClassVar[tuple[str, ...]] = ()
    # config.architectures[0] of a checkpoint -> (transformers class that loads it, attribute
    # of the loaded model that is probed, or None for the model itself). Architectures not
    # listed load as themselves.
    checkpoints: ClassVar[dict[str, tuple[str, str | None]]] = {}
    # canonical name -> attribute path on the probed model (every family declares all five)
    paths: ClassVar[dict[str, str]] = {}
    # special name -> where its id is found: config attribute names (searched in the config,
    # then its text config), or token strings ("<...>") looked up in the tokenizer
    special_tokens: ClassVar[dict[str, tuple[str, ...]]] = {}
    turn_end: ClassVar[str | None] = None  # the special that closes a turn
    has_audio: ClassVar[bool] = True
    position_batch_dim: ClassVar[int] = 0  # the batch axis of `ModelInputs.positions`
    # per-position model inputs: cut with the prompt by `forward_kwargs(upto=...)`
    per_token_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: AdapterSettings | None = None,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or AdapterSettings()
        self.name = name or type(model).__name__
        self.revision = revision or "unknown"
        self.config = model.config
        self._specials = self._special_ids()
        # where `settings` come from (the registry says: avprobe.json, an alias, inherited, defaults)
        self.settings_source = "given by the caller"

    # ---- loading (the registry asks these; no architecture names outside adapters) ---------
    @classmethod
    def load_pretrained(cls, architecture: str, target: str, **kw: Any) -> nn.Module:
        """Load a checkpoint and return the part this adapter probes."""
        import transformers

        class_name, part = cls.checkpoints.get(architecture, (architecture, None))
        model = getattr(transformers, class_name).from_pretrained(target, **kw)
        if part is None:
            return model
        if hasattr(model, "disable_talker"):  # a speech head the probes never use
            model.disable_talker()
        return getattr(model, part)

    @classmethod
    def text_config_of(cls, config: Any, architecture: str) -> Any:
        """The text model's config inside a checkpoint's config (read before loading)."""
        _, part = cls.checkpoints.get(architecture, (architecture, None))
        if part is not None:
            config = getattr(config, f"{part}_config")
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @classmethod
    def tiny(cls, n_layers: int = 4, seed: int = 0, **kw: Any) -> ModelAdapter:
        """A tiny random model of this family, built from the real config classes (tests,
        benchmarks; no weights)."""
        raise NotImplementedError(f"{cls.__name__} has no tiny model")

    # ---- canonical parts -------------------------------------------------------------
    def _get(self, canonical: str) -> Any:
        path = self.paths.get(canonical)
        if path is None:
            raise NotImplementedError(f"{type(self).__name__} declares no path for {canonical!r} (ModelAdapter.paths)")
        obj: Any = self.model
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def text_model(self) -> nn.Module:
        return self._get("text_model")

    @property
    def layers(self) -> nn.ModuleList:
        return self._get("layers")

    @property
    def final_norm(self) -> nn.Module:
        return self._get("final_norm")

    @property
    def embed(self) -> nn.Module:
        return self._get("embed")

    @property
    def unembed(self) -> nn.Module:
        return self._get("unembed")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.text_config, self.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is None:
                continue
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        end = self._specials.get(self.turn_end) if self.turn_end else None
        if end is not None:
            ids.add(end)
        return ids

    # ---- tokens and roles ------------------------------------------------------------
    def _token_id(self, token: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return None if tid is None or tid == unk else int(tid)

    def _config_sources(self) -> tuple[Any, ...]:
        return (self.config, self.text_config)

    def _cfg(self, *names: str) -> int | None:
        for src in self._config_sources():
            for n in names:
                v = getattr(src, n, None) if src is not None else None
                if isinstance(v, int) and not isinstance(v, bool):
                    return v
        return None

    def _special_ids(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name, where in self.special_tokens.items():
            tid = None
            for w in where:
                tid = self._token_id(w) if w.startswith("<") else self._cfg(w)
                if tid is not None:
                    break
            out[name] = tid
        return out

    def special(self, name: str) -> int:
        tid = self._specials.get(name)
        if tid is None:
            raise ValueError(f"{self.name}: no id for special token {name!r} in config or tokenizer")
        return tid

    def label_roles(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Role of every position, from token ids alone (never from contiguous ranges)."""
        ids = input_ids.reshape(-1)
        roles = torch.full_like(ids, int(Role.QUERY))
        special_ids = {v for k, v in self._specials.items() if v is not None and k not in ("video", "audio", "image")}
        special_ids.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", []) or [])
        for mod in ("video", "audio", "image"):
            special_ids.discard(self._specials.get(mod))
        if special_ids:
            roles[torch.isin(ids, torch.tensor(sorted(special_ids), device=ids.device))] = int(Role.SPECIAL)
        for name, role in (("video", Role.VIDEO), ("audio", Role.AUDIO), ("image", Role.IMAGE)):
            tid = self._specials.get(name)
            if tid is not None:
                roles[ids == tid] = int(role)
        return roles

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True).strip()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- media and prompt (family-specific) ---------------------------------------------
    def encode_video(self, media: Media) -> MediaTokens:
        """The sample's frames as model inputs (family-specific)."""
        raise NotImplementedError

    def encode_audio(self, media: Media) -> MediaTokens:
        """The sample's waveform as model inputs (family-specific; only if `has_audio`)."""
        raise NotImplementedError

    def media_segments(self, video: MediaTokens | None, audio: MediaTokens | None) -> list[Segment]:
        """The media block of the prompt (family-specific)."""
        raise NotImplementedError

    def prompt_segments(self, media_ids: list[Segment], query: str) -> list[Segment]:
        """The whole prompt around the media block, ending with the reply opener (family-specific)."""
        raise NotImplementedError

    def user_content(self, opener: str, media_ids: list[Segment], query: str) -> list[Segment]:
        """The user turn's content after its opener text (e.g. "user\\n"), in the order of
        `settings.prompt_layout`. Text-first joins the opener and the query into one string, as
        a chat template writes them, so they tokenize as the upstream processor's prompt does."""
        if self.settings.prompt_layout == "text-first":
            return [opener + query, *media_ids]
        return [opener, *media_ids, query]

    def answer_ids(self, answer: str) -> list[int]:
        """A teacher-forced reply: its tokens and the turn's closing token."""
        if self.turn_end is None:
            raise NotImplementedError(f"{type(self).__name__} declares no turn_end")
        return self.encode(answer) + [self.special(self.turn_end)]

    def _tokenize_segments(self, segs: list[Segment]) -> list[int]:
        ids: list[int] = []
        for s in segs:
            ids += self.encode(s) if isinstance(s, str) else list(s)
        return ids

    def extra_inputs(self, input_ids: torch.Tensor, roles: torch.Tensor, video: MediaTokens | None,
                     audio: MediaTokens | None) -> dict[str, Any]:
        """Model inputs that depend on the whole prompt (flags, token types)."""
        return {}

    def build_inputs(self, media: Media, query: str, answer: str | None = None) -> ModelInputs:
        """Model inputs for one sample and query (batch 1). `answer` appends a teacher-forced
        reply (plus the turn's closing token) with labels on it."""
        video = self.encode_video(media) if media.frames is not None else None
        audio = self.encode_audio(media) if media.waveform is not None and self.has_audio else None
        if (video is None or video.n_tokens == 0) and (audio is None or audio.n_tokens == 0):
            raise ValueError("sample has neither video frames nor (for this model) audio")
        tensors: dict[str, Any] = {}
        for block in (video, audio):
            if block is not None:
                tensors.update(block.tensors)
        ids = self._tokenize_segments(self.prompt_segments(self.media_segments(video, audio), query))
        prompt_len = len(ids)
        labels = None
        if answer is not None:
            ans = self.answer_ids(answer)
            labels = torch.tensor([[-100] * prompt_len + ans])
            ids = ids + ans
        input_ids = torch.tensor([ids])
        tensors["input_ids"] = input_ids
        tensors["attention_mask"] = torch.ones_like(input_ids)
        roles = self.label_roles(input_ids)
        tensors.update(self.extra_inputs(input_ids, roles, video, audio))
        times = torch.full(roles.shape, float("nan"))
        for role, block in ((Role.VIDEO, video), (Role.AUDIO, audio)):
            pos = torch.nonzero(roles == int(role)).flatten()
            if block is not None and len(pos):
                if len(pos) != block.n_tokens:
                    raise RuntimeError(f"{self.name}: {len(pos)} {role.label} positions for {block.n_tokens} tokens")
                times[pos] = block.clip_times
        mi = ModelInputs(inputs=tensors, roles=roles, times=times, positions=torch.zeros(0), prompt_len=prompt_len,
                         labels=labels)
        mi.positions = self.compute_positions(mi)
        return mi

    # ---- positions (family-specific) ------------------------------------------------------
    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        """Explicit rotary positions of the whole sequence, sequence on the last axis."""
        raise NotImplementedError

    def step_positions(self, mi: ModelInputs, t: int, rows: int) -> torch.Tensor:
        """`position_ids` of one decode step for `rows` rows, each at sequence index
        prompt_len - 1 + t (t = 0: the last prompt token), continuing `mi.positions`."""
        raise NotImplementedError

    # ---- running the model ------------------------------------------------------------
    def forward_kwargs(self, mi: ModelInputs, upto: int | None = None) -> dict[str, Any]:
        """Kwargs for `model(...)` over positions [:upto], with explicit positions."""
        kw = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mi.inputs.items()}
        if upto is not None:
            for k in self.per_token_inputs:
                if k in kw:
                    kw[k] = kw[k][:, :upto]
            kw["position_ids"] = mi.positions[..., :upto].to(self.device)
        else:
            kw["position_ids"] = mi.positions.to(self.device)
        return kw

    def decode_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """Inputs of `text_model` for one decode step of tokens [B]."""
        return {"input_ids": tokens[:, None]}

    # Whether several prompts' condition rows may share one decode (engine.run_batch). False
    # where `prompt_scope` pins state that differs from prompt to prompt.
    clips_share_a_decode: ClassVar[bool] = True

    @contextlib.contextmanager
    def prompt_scope(self, mi: ModelInputs, n_new: int = 0) -> Iterator[None]:
        """Model state held fixed while one prompt (plus `n_new` generated or teacher-forced
        tokens) runs: the engine prefills the prompt minus its last token and decodes the rest
        one step at a time, so state a model picks per call from that call's length (a rotary
        set chosen by the longest position) must be pinned to what a prefill of the whole
        prompt picks. Restored on exit. Default: nothing to hold."""
        yield

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed hidden states, as the model's own head computes them."""
        return self.unembed(hidden)

    def prefill_logits_to_keep(self, n: int, all_rows: bool = False) -> int | torch.Tensor:
        """`logits_to_keep` for a prefill of n positions whose logits are not read;
        `all_rows`: every layer's hidden state at every position is wanted (logit lens)."""
        return 1

    # ---- token mixing by layer (hybrid models) -------------------------------------------
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """Per layer, how it mixes positions: "attention" (knockout blocks it, flow records
        it), "recurrent" (a state carried along the sequence, e.g. Mamba: no attention to
        block) or "none" (MLP / MoE only). From the text config's `layer_types`; a config
        without them is all attention."""
        types = getattr(self.text_config, "layer_types", None) or ["full_attention"] * self.n_layers
        kinds = []
        for t in types:
            if t not in LAYER_KINDS:
                raise ValueError(f"{self.name}: unknown layer type {t!r} in the text config's layer_types; "
                                 f"add it to avprobe.adapters.base.LAYER_KINDS")
            kinds.append(LAYER_KINDS[t])
        return tuple(kinds)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "attention")

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "recurrent")

    @property
    def knockout_is_cut(self) -> bool:
        """Whether an attention knockout in every layer blocks every direct read of the blocked
        positions by the generated rows: only if every layer that mixes positions is an
        attention layer (a recurrent layer's state carries them past any attention mask)."""
        return not self.recurrent_layers

    def recurrent_cache(self) -> Any | None:
        """A cache for the shared-prefix decode that holds the recurrent layers' state only,
        or None when there are none (then the engine runs without a cache). Its attention
        layers store nothing and hand their keys and values straight through: the engine's
        attention session holds the prompt's keys and values and the rows' suffixes."""
        if not self.recurrent_layers:
            return None
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        cache = DynamicCache(config=self.text_config)
        for i, layer in enumerate(cache.layers):
            if self.layer_kinds[i] == "attention" and not isinstance(layer, LinearAttentionCacheLayerMixin):
                cache.layers[i] = _pass_through_layer()
        return cache

    @staticmethod
    def branch_recurrent_cache(cache: Any, rows: int) -> Any:
        """The prefix's recurrent state, one copy per condition row: each row's state then
        evolves on its own (its inputs differ once an attention layer below is knocked out)."""
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        for layer in cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                for d in (layer.conv_states, layer.recurrent_states):
                    for i, x in d.items():
                        if x is not None:
                            d[i] = x.repeat(rows, *([1] * (x.dim() - 1)))
        return cache

    def collate(self, items: list[ModelInputs]) -> dict[str, Any]:
        """Batch samples that share one layout (same token sequence length and media shapes)."""
        lens = {int(mi.input_ids.shape[1]) for mi in items}
        if len(lens) != 1:
            raise ValueError(f"collate needs one layout; got sequence lengths {sorted(lens)}")
        out: dict[str, Any] = {}
        for key, first in items[0].inputs.items():
            vals = [mi.inputs[key] for mi in items]
            out[key] = torch.cat(vals, dim=0) if torch.is_tensor(first) else first
        out["position_ids"] = torch.cat([mi.positions for mi in items], dim=self.position_batch_dim)
        if items[0].labels is not None:
            out["labels"] = torch.cat([mi.labels for mi in items], dim=0)
        return out


def extend_inputs(adapter: ModelAdapter, mi: ModelInputs, ids: list[int]) -> ModelInputs:
    """Append token ids (e.g. a caption to teacher-force) to a prompt; positions recomputed
    the model's own way. `prompt_len` is unchanged."""
    extra = torch.tensor([ids], dtype=mi.input_ids.dtype)
    inputs = dict(mi.inputs)
    inputs["input_ids"] = torch.cat([mi.input_ids, extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    roles = torch.cat([mi.roles, torch.full((len(ids),), int(Role.GENERATED))])
    times = torch.cat([mi.times, torch.full((len(ids),), float("nan"))])
    out = ModelInputs(inputs=inputs, roles=roles, times=times, positions=torch.zeros(0), prompt_len=mi.prompt_len)
    out.positions = adapter.compute_positions(out)
    return out
