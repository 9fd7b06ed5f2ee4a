"""The engine: prefill once, branch every condition, decode them together.

For one prompt: the prompt minus its last token is prefilled once (encoders and thousands
of media tokens), capturing each layer's keys and values and, for the logit lens, the
hidden states at audio positions. Then all conditions decode as one batch of rows: the
last prompt token is the first row input (its row predicts the first generated token, and
it is knocked out like every generated row), the prompt's keys and values are shared by
all rows (one matrix product per layer), and each row keeps only its own suffix. Greedy by
default. Attention mass per role is recorded for every row at no extra pass.

`reference_decode` is the straightforward protocol for one condition (full forward with
HF's cache, a boolean mask per layer): the tests hold the engine to it token for token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    if not conditions:
        raise ValueError("no conditions to run")
    if len(set(conditions)) != len(conditions):
        raise ValueError("conditions must be distinct")
    with attn.installed(adapter.model), adapter.prompt_scope(mi, config.max_new_tokens):
        return _run(adapter, mi, conditions, config)


def _run(adapter: ModelAdapter, mi: ModelInputs, conditions: list[Condition], config: EngineConfig) -> RunResult:
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
    with attn.using(capture):
        if config.lens is not None and len(lens_pos):
            with capture_hidden(adapter, lens_pos) as hidden:
                model(**kw, use_cache=False, logits_to_keep=adapter.prefill_logits_to_keep(P - 1, all_rows=True))
            lens_result = decode_hidden(adapter, hidden, lens_pos, config.lens)
        else:
            model(**kw, use_cache=False, logits_to_keep=adapter.prefill_logits_to_keep(P - 1))

    # 2. batched decode of all condition rows over the shared prefix
    masks = build_masks(conditions, roles, L)

    def to_dev(xs):
        return [x.to(dev) if x is not None else None for x in xs]

    buckets, bucket_labels = (None, [])
    base_row = next((i for i, c in enumerate(conditions) if isinstance(c, Baseline)), 0)
    if config.record_attention and config.record_buckets:
        buckets, bucket_labels = time_buckets(roles[: P - 1], mi.times[: P - 1])
    T = config.max_new_tokens
    session = attn.SharedPrefixDecode(
        capture.keys, capture.values, B, T,
        to_dev(masks.prefix_block), to_dev(masks.suffix0_block), to_dev(masks.rule_rows),
        roles[: P - 1], int(roles[P - 1]), record=config.record_attention,
        buckets=buckets, bucket_row=base_row, prefix_path=config.prefix_path,
    )
    # The session keeps its own role-ordered copy of the prefix: drop the captured one.
    capture.keys.clear()
    capture.values.clear()
    tracker = RuleTracker(masks.rules)
    eos = adapter.eos_ids
    eos_idx = torch.tensor(sorted(eos), dtype=torch.long, device=dev) if config.suppress_eos and eos else None
    tokens = torch.full((B,), int(mi.input_ids[0, P - 1]), dtype=torch.long, device=dev)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    steps_taken = [0] * B
    logprobs = [] if config.keep_logprobs else None
    topk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    text_model = adapter.text_model
    with attn.using(session):
        for t in range(T):
            session.t = t
            pos = adapter.step_positions(mi, t, B).to(dev)  # the family's rotary layout
            h = text_model(**adapter.decode_inputs(tokens), position_ids=pos, use_cache=False)
            logits = adapter.logits(h.last_hidden_state[:, -1]).float()
            if logprobs is not None:
                logprobs.append(torch.log_softmax(logits[base_row], -1).cpu())
            spread = logits.std(-1) if config.keep_topk else None
            if eos_idx is not None:
                logits.index_fill_(1, eos_idx, float("-inf"))
            if config.keep_topk:
                v, i = logits.topk(min(config.keep_topk, logits.shape[-1]), dim=-1)
                topk.append((v, i, spread))
            nxt = logits.argmax(-1)
            nl = nxt.tolist()
            for i in range(B):
                if not done[i]:
                    out_ids[i].append(nl[i])
                    steps_taken[i] = t + 1
                    if nl[i] in eos:
                        done[i] = True
            if all(done):
                break
            picked = tracker.step(nl)
            session.picked[:, t + 1] = torch.tensor(picked, device=dev)
            tokens = nxt
    outputs = []
    flow = session.flow.cpu().numpy() if session.flow is not None else None
    for i, c in enumerate(conditions):
        ids = out_ids[i]
        text_ids = [x for x in ids if x not in eos]
        outputs.append(
            ConditionOutput(
                condition=c,
                token_ids=ids,
                text=adapter.decode(text_ids),
                flow=flow[: steps_taken[i], :, i].copy() if flow is not None else None,
                finished=done[i],
            )
        )
    bucket_flow = None
    if session.bucket_flow is not None:
        bucket_flow = session.bucket_flow[: steps_taken[base_row]].cpu().numpy()
    return RunResult(
        prompt_len=P,
        n_layers=L,
        roles=roles.cpu().numpy().astype(np.int8),
        outputs=outputs,
        bucket_labels=bucket_labels,
        bucket_flow=bucket_flow,
        lens=lens_result,
        logprobs=torch.stack(logprobs[: steps_taken[base_row]]) if logprobs else None,
        memory=session.memory_bytes(),
        topk=tuple(torch.stack(x, 1).cpu() for x in zip(*topk)) if topk else None,
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
