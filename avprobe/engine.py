"""The engine: prefill once, branch every condition, decode them together.

For one prompt: the prompt minus its last token is prefilled once (encoders and thousands
of media tokens), capturing each layer's keys and values and, for the logit lens, the
hidden states at audio positions. Then all conditions decode as one batch of rows: the
last prompt token is the first row input (its row predicts the first generated token, and
it is knocked out like every generated row), the prompt's keys and values are shared by
all rows (one matrix product per layer), and each row keeps only its own suffix. Greedy by
default. Attention mass per role is recorded for every row at no extra pass (NaN at layers
that have no attention). A hybrid model's recurrent layers (Mamba) carry a state, not keys and
values: the prefill leaves it in the adapter's `recurrent_cache`, and every row decodes from
its own copy of it (`branch_recurrent_cache`); such a model's clips decode one at a time.

`reference_decode` is the straightforward protocol for one condition (full forward with
HF's cache, a boolean mask per layer): the tests hold the engine to it token for token.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avprobe.adapters.base import ModelAdapter, ModelInputs
from avprobe.conditions import Baseline, Condition
from avprobe.probes import attention as attn
from avprobe.probes.knockout import RuleTracker, build_masks, reference_masks
from avprobe.probes.logit_lens import LensConfig, LensResult, capture_hidden, decode_hidden
from avprobe.types import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_new_tokens: int = 32
    record_attention: bool = True  # per-role attention mass of every row
    record_buckets: bool = True  # per-frame / per-second attention of the baseline row
    lens: LensConfig | None = None  # logit lens at audio positions (during the prefill)
    keep_logprobs: bool = False  # baseline row's log-probs per step (for the base-model shift)
    # Never pick an EOS token, so every row decodes exactly max_new_tokens (as HF's
    # min_new_tokens does); benchmarks use it so that every method does equal work.
    suppress_eos: bool = False
    # Keep every row's k best logits per step (and the logits' spread): the benchmark's
    # token check tells a reduced-precision near-tie from a real disagreement with them.
    keep_topk: int = 0
    # How the decode attends to the prompt prefix: "auto", "fused" or "dense"
    # (avprobe.probes.attention.PREFIX_PATHS); the result is the same, the cost differs.
    prefix_path: str = "auto"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        attn.check_prefix_path(self.prefix_path)


@dataclass
class ConditionOutput:
    condition: Condition
    token_ids: list[int]
    text: str
    flow: np.ndarray | None  # [T, L, R]: per generated step and layer, attention mass per role
    finished: bool  # ended with an EOS token (False: hit max_new_tokens)


@dataclass
class RunResult:
    prompt_len: int
    n_layers: int
    roles: np.ndarray  # [P] role ids of the prompt
    outputs: list[ConditionOutput]
    bucket_labels: list[str] = field(default_factory=list)
    bucket_flow: np.ndarray | None = None  # [T, L, NB] baseline row, mean over heads
    lens: LensResult | None = None
    logprobs: torch.Tensor | None = None  # [T, V] baseline row, float32 (only if kept)
    # with keep_topk: values and ids [B, T, k] of each row's best logits per step, and the
    # standard deviation of each row's logits per step [B, T] (float32, CPU)
    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    prefix_path: str = ""  # how the decode attended to the prompt: "fused" or "dense"
    # bytes of keys/values held by the decode: "prefix" (shared, independent of the number
    # of conditions) and "suffix" (the rows' own generated positions)
    memory: dict[str, int] = field(default_factory=dict)

    def output(self, condition: Condition) -> ConditionOutput:
        for o in self.outputs:
            if o.condition == condition:
                return o
        raise KeyError(f"condition {condition} was not run")


def time_buckets(roles: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """One-hot [P, NB] of (role, whole second) buckets for video and audio positions; all
    other positions fall in one bucket per role."""
    labels: list[str] = []
    index: dict[str, int] = {}
    ids = torch.zeros(len(roles), dtype=torch.long)
    for p in range(len(roles)):
        r = Role(int(roles[p]))
        t = float(times[p])
        name = f"{r.label}@{int(t)}s" if r in (Role.VIDEO, Role.AUDIO) and not np.isnan(t) else r.label
        if name not in index:
            index[name] = len(labels)
            labels.append(name)
        ids[p] = index[name]
    return torch.nn.functional.one_hot(ids, len(labels)).float(), labels


@torch.no_grad()
def run(
    adapter: ModelAdapter,
    mi: ModelInputs,
    conditions: list[Condition],
    config: EngineConfig = EngineConfig(),
) -> RunResult:
    """Decode every condition for one prompt. Returns tokens, text and attention flow per row.
    The model's attention implementation is avprobe's for the run, its own again after."""
    _check_conditions(conditions)
    with attn.installed(adapter.model):
        return _run_clips(adapter, [(mi, conditions)], config)[0]


@torch.no_grad()
def run_batch(
    adapter: ModelAdapter,
    clips: Sequence[tuple[ModelInputs, list[Condition]]],
    config: EngineConfig = EngineConfig(),
) -> list[RunResult]:
    """`run` for several prompts at once (clips of any lengths and layouts, each with its own
    conditions): one prefill per clip, then one decode in which every condition row of every
    clip is a row of the same batch. Each row attends to its own clip's prompt keys and values
    (held once per clip, never per row) and its own suffix, so the per-step work of the
    model's layers (the weight reads, the per-call overhead) is paid once for all clips, and
    clips of one prompt layout and condition list attend as one stack (one set of attention
    kernels per layer for all of them; `attention.StackedPrefixDecode`).
    A clip whose rows have all ended leaves the batch. Returns one RunResult per clip, in
    order, equal to `run`'s for that clip (bit for bit in float32 when every clip has at
    least two conditions: a one-row matrix product takes another kernel)."""
    if not clips:
        raise ValueError("no clips to run")
    for _, conds in clips:
        _check_conditions(conds)
    with attn.installed(adapter.model):
        return _run_clips(adapter, list(clips), config)


def _check_conditions(conditions: list[Condition]) -> None:
    if not conditions:
        raise ValueError("no conditions to run")
    if len(set(conditions)) != len(conditions):
        raise ValueError("conditions must be distinct")


@dataclass
class _Clip:
    """One prompt's state through the decode (`_prefill` makes it, `_result` reads it)."""

    mi: ModelInputs
    conditions: list[Condition]
    session: attn.SharedPrefixDecode
    tracker: RuleTracker
    base_row: int
    lens: LensResult | None
    bucket_labels: list[str]
    out_ids: list[list[int]]
    done: list[bool]
    steps_taken: list[int]
    logprobs: list[torch.Tensor] | None
    topk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    tokens: torch.Tensor  # [B] the rows' next inputs
    steps_run: int = 0
    state: Any = None  # a hybrid model's recurrent cache, one copy per row after the prefill

    @property
    def finished(self) -> bool:
        return all(self.done)


def _prefill(adapter: ModelAdapter, mi: ModelInputs, conditions: list[Condition], config: EngineConfig) -> _Clip:
    """The prompt minus its last token through the model once, capturing each layer's keys
    and values (and the lens states); returns the clip ready to decode."""
    model, dev = adapter.model, adapter.device
    P, L, B = mi.prompt_len, adapter.n_layers, len(conditions)
    roles = mi.roles[:P]
    if P < 2:
        raise ValueError("prompt too short")

    # 1. prefill the shared prefix (prompt minus its last token), capturing K/V and lens states
    capture = attn.PrefixCapture()
    lens_pos = torch.nonzero(roles[: P - 1] == int(Role.AUDIO)).flatten()
    lens_result = None
    kw = adapter.forward_kwargs(mi, upto=P - 1)
    # Hybrid models: the recurrent layers' state after the prefix (attention keys and values
    # stay with the session); one copy per row after the prefill, each evolving on its own.
    state = adapter.recurrent_cache()
    with attn.using(capture):
        if config.lens is not None and len(lens_pos):
            with capture_hidden(adapter, lens_pos) as hidden:
                model(**kw, **_cache_kw(state), logits_to_keep=adapter.prefill_logits_to_keep(P - 1, all_rows=True))
            lens_result = decode_hidden(adapter, hidden, lens_pos, config.lens)
        else:
            model(**kw, **_cache_kw(state), logits_to_keep=adapter.prefill_logits_to_keep(P - 1))
    if state is not None:
        adapter.branch_recurrent_cache(state, B)

    # 2. the decode session of all condition rows over the shared prefix
    masks = build_masks(conditions, roles, L)

    def to_dev(xs):
        return [x.to(dev) if x is not None else None for x in xs]

    buckets, bucket_labels = (None, [])
    base_row = next((i for i, c in enumerate(conditions) if isinstance(c, Baseline)), 0)
    if config.record_attention and config.record_buckets:
        buckets, bucket_labels = time_buckets(roles[: P - 1], mi.times[: P - 1])
    session = attn.SharedPrefixDecode(
        capture.keys, capture.values, B, config.max_new_tokens,
        to_dev(masks.prefix_block), to_dev(masks.suffix0_block), to_dev(masks.rule_rows),
        roles[: P - 1], int(roles[P - 1]), record=config.record_attention,
        buckets=buckets, bucket_row=base_row, prefix_path=config.prefix_path,
    )
    # The session keeps its own role-ordered copy of the prefix: drop the captured one.
    capture.keys.clear()
    capture.values.clear()
    return _Clip(
        mi=mi, conditions=conditions, session=session, tracker=RuleTracker(masks.rules), base_row=base_row,
        lens=lens_result, bucket_labels=bucket_labels, out_ids=[[] for _ in range(B)], done=[False] * B,
        steps_taken=[0] * B, logprobs=[] if config.keep_logprobs else None, topk=[],
        tokens=torch.full((B,), int(mi.input_ids[0, P - 1]), dtype=torch.long, device=dev), state=state,
    )


def _cache_kw(state: Any) -> dict[str, Any]:
    return {"cache": state, "use_cache": True} if state is not None else {"use_cache": False}


def _run_clips(adapter: ModelAdapter, items: list[tuple[ModelInputs, list[Condition]]],
               config: EngineConfig) -> list[RunResult]:
    if len(items) > 1 and not adapter.clips_share_a_decode:
        # model state pinned per prompt (prompt_scope) differs between prompts: one at a time
        return [r for item in items for r in _run_clips(adapter, [item], config)]
    with contextlib.ExitStack() as scopes:
        for mi, _ in items:
            scopes.enter_context(adapter.prompt_scope(mi, config.max_new_tokens))
        return _run_scoped(adapter, items, config)


def _run_scoped(adapter: ModelAdapter, items: list[tuple[ModelInputs, list[Condition]]],
                config: EngineConfig) -> list[RunResult]:
    clips = [_prefill(adapter, mi, conds, config) for mi, conds in items]
    if any(c.state is not None for c in clips):
        for c in clips:  # one recurrent cache per clip: no grouped decode across clips
            _decode(adapter, [c], config)
    else:
        _decode(adapter, clips, config)
    return [_result(adapter, c, config) for c in clips]


def _decode(adapter: ModelAdapter, clips: list[_Clip], config: EngineConfig) -> None:
    """Greedy decode of every row of every clip, one batch per step. Each clip's rows are a
    contiguous block; a clip leaves the batch once all its rows have ended (as `run` stops)."""
    dev = adapter.device
    eos = adapter.eos_ids
    eos_idx = torch.tensor(sorted(eos), dtype=torch.long, device=dev) if config.suppress_eos and eos else None
    text_model = adapter.text_model
    dim = adapter.position_batch_dim
    # clips of one layout side by side: their attention runs as one stack (GroupedPrefixDecode)
    active = [clips[i] for i in attn.stack_order([c.session for c in clips])]
    grouped = attn.GroupedPrefixDecode([c.session for c in active])
    for t in range(config.max_new_tokens):
        if len(active) == 1:  # one clip: its own session, as the one-clip engine always ran
            session, pos = active[0].session, adapter.step_positions(active[0].mi, t, len(active[0].done))
            tokens = active[0].tokens
        else:
            session = grouped
            pos = torch.cat([adapter.step_positions(c.mi, t, len(c.done)) for c in active], dim=dim)
            tokens = torch.cat([c.tokens for c in active])
        for c in active:
            c.session.t = t
        cache_kw = _cache_kw(active[0].state) if len(active) == 1 else {"use_cache": False}
        with attn.using(session):
            h = text_model(**adapter.decode_inputs(tokens), position_ids=pos.to(dev), **cache_kw)
        logits = adapter.logits(h.last_hidden_state[:, -1]).float()
        start = 0
        for c in active:
            rows = slice(start, start + len(c.done))
            start = rows.stop
            _step(c, t, logits[rows], eos, eos_idx, config)
        still = [c for c in active if not c.finished]
        if not still:
            break
        if len(still) != len(active):
            for c in active:
                if c.finished:  # its keys and values may be views of a stack's: let them go
                    c.session.release()
            active = still
            grouped = attn.GroupedPrefixDecode([c.session for c in active])


def _step(c: _Clip, t: int, logits: torch.Tensor, eos: set[int], eos_idx: torch.Tensor | None,
          config: EngineConfig) -> None:
    """One decode step's bookkeeping for one clip's rows (`logits` [B, V], float32)."""
    c.steps_run = t + 1
    if c.logprobs is not None:
        c.logprobs.append(torch.log_softmax(logits[c.base_row], -1).cpu())
    spread = logits.std(-1) if config.keep_topk else None
    if eos_idx is not None:
        logits.index_fill_(1, eos_idx, float("-inf"))
    if config.keep_topk:
        v, i = logits.topk(min(config.keep_topk, logits.shape[-1]), dim=-1)
        c.topk.append((v, i, spread))
    nxt = logits.argmax(-1)
    nl = nxt.tolist()
    for i in range(len(c.done)):
        if not c.done[i]:
            c.out_ids[i].append(nl[i])
            c.steps_taken[i] = t + 1
            if nl[i] in eos:
                c.done[i] = True
    if c.finished:
        return
    picked = c.tracker.step(nl)
    c.session.picked[:, t + 1] = torch.tensor(picked, device=c.session.picked.device)
    c.tokens = nxt


def _result(adapter: ModelAdapter, c: _Clip, config: EngineConfig) -> RunResult:
    session, eos = c.session, adapter.eos_ids
    P = c.mi.prompt_len
    outputs = []
    flow = session.flow.cpu().numpy() if session.flow is not None else None
    no_attention = [i for i, k in enumerate(adapter.layer_kinds) if k != "attention"]
    if flow is not None and no_attention:
        flow[:, no_attention] = np.nan  # layers that attend to nothing: no share, not zero
    for i, cond in enumerate(c.conditions):
        ids = c.out_ids[i]
        text_ids = [x for x in ids if x not in eos]
        outputs.append(
            ConditionOutput(
                condition=cond,
                token_ids=ids,
                text=adapter.decode(text_ids),
                flow=flow[: c.steps_taken[i], :, i].copy() if flow is not None else None,
                finished=c.done[i],
            )
        )
    bucket_flow = None
    if session.bucket_flow is not None:
        bucket_flow = session.bucket_flow[: c.steps_taken[c.base_row]].cpu().numpy()
        bucket_flow[:, no_attention] = np.nan
    return RunResult(
        prompt_len=P,
        n_layers=adapter.n_layers,
        roles=c.mi.roles[:P].cpu().numpy().astype(np.int8),
        outputs=outputs,
        bucket_labels=c.bucket_labels,
        bucket_flow=bucket_flow,
        lens=c.lens,
        logprobs=torch.stack(c.logprobs[: c.steps_taken[c.base_row]]) if c.logprobs else None,
        memory=session.memory_bytes(),
        topk=tuple(torch.stack(x, 1).cpu() for x in zip(*c.topk)) if c.topk else None,
        prefix_path=session.path or "",
    )


@torch.no_grad()
def reference_decode(
    adapter: ModelAdapter,
    mi: ModelInputs,
    condition: Condition,
    max_new_tokens: int = 32,
    record: bool = False,
) -> tuple[list[int], attn.ReferenceKnockout]:
    """One condition, decoded the straightforward way: full prompt forward with the
    knockout mask on generated rows, then one token at a time with HF's cache."""
    with attn.installed(adapter.model), adapter.prompt_scope(mi, max_new_tokens):
        return _reference_decode(adapter, mi, condition, max_new_tokens, record)


def _reference_decode(adapter: ModelAdapter, mi: ModelInputs, condition: Condition, max_new_tokens: int,
                      record: bool) -> tuple[list[int], attn.ReferenceKnockout]:
    from transformers import DynamicCache

    P, L = mi.prompt_len, adapter.n_layers
    blocked, rule_layers = reference_masks(condition, L)
    session = attn.ReferenceKnockout(P, mi.roles[:P], blocked, rule_layers, record=record)
    rules = condition.rules if hasattr(condition, "rules") else ()
    tracker = RuleTracker([rules])
    eos = adapter.eos_ids
    cache = DynamicCache(config=adapter.text_config)
    kw = adapter.forward_kwargs(mi, upto=P)
    ids: list[int] = []
    with attn.using(session):
        out = adapter.model(**kw, cache=cache, use_cache=True, logits_to_keep=1)
        for t in range(max_new_tokens):
            tok = int(out.logits[0, -1].float().argmax())
            ids.append(tok)
            if tok in eos or t == max_new_tokens - 1:
                break
            if tracker.step([tok])[0]:
                session.picked.add(P + t)
            pos = adapter.step_positions(mi, t + 1, 1).to(adapter.device)
            out = adapter.model(
                input_ids=torch.tensor([[tok]], device=adapter.device),
                position_ids=pos,
                cache=out.cache if hasattr(out, "cache") and out.cache is not None else cache,
                use_cache=True,
            )
    return ids, session
