"""The protocols avprobe's engine is measured against, each written the way its user would
(timed side by side by avprobe/bench/engine.py, `avprobe bench`).

- `naive_sweep`: the paper's released protocol. Eager attention; a forward pre-hook on every
  decoder layer's self-attention overwrites the additive mask with the dtype's minimum for
  the knocked-out keys of generated rows; one full `generate()` per condition (encoders and
  the whole prompt every time); `output_attentions` on the baseline run for the attention
  flow; a separate forward with `output_hidden_states` for the logit lens.
  `first_token=False` is the paper's variant (only decode steps masked, so the first
  generated token is not knocked out); `True` (default) also masks the last prompt row, as
  the engine does, so that their tokens can be compared.
- `careful_sweep`: a careful user's naive: sdpa, one `generate()` per condition with the
  knockout applied inside the attention (`ReferenceKnockout`), no eager attention.
- `floor_decode`: the floor: one prefill (HF's cache), then one batched decode of all
  conditions with the prompt's keys and values shared by every row; no recording, no lens.
- `nnsight_sweep`: the same sweep as an nnsight user writes it (the mask edited through
  nnsight's tracing API), when nnsight is importable (`pip install -e .[bench]`).

Every method decodes exactly `max_new_tokens` tokens (EOS suppressed, as HF's
`min_new_tokens` does), so all do equal work whatever the random weights emit.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avprobe.adapters.base import ModelAdapter, ModelInputs
from avprobe.conditions import Condition, Knockout
from avprobe.probes import attention as attn
from avprobe.probes.knockout import build_masks, reference_masks
from avprobe.probes.logit_lens import LensConfig, LensResult, decode_hidden
from avprobe.types import Role


@dataclass
class SweepResult:
    """Tokens per condition plus whatever the method records (flow of the baseline run)."""

    tokens: list[list[int]]
    flow: np.ndarray | None = None  # [T, L, R] attention mass per role of the baseline run
    lens: LensResult | None = None
    seconds: list[float] = field(default_factory=list)  # per condition, where run one by one


def _role_blocks(condition: Condition) -> None:
    if isinstance(condition, Knockout) and condition.rules:
        raise ValueError(f"{condition.label()}: the naive protocols implement role knockouts only")


def _on_device(adapter: ModelAdapter, mi: ModelInputs) -> dict:
    """The prompt's model inputs on the model's device (ModelInputs keep them on the CPU)."""
    return {k: v.to(adapter.device) if torch.is_tensor(v) else v for k, v in mi.inputs.items()}


def _generate(adapter: ModelAdapter, mi: ModelInputs, max_new_tokens: int, **kw) -> object:
    eos = sorted(adapter.eos_ids)
    return adapter.model.generate(
        **_on_device(adapter, mi),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0],
        **kw,
    )


def _flow_from_attentions(attentions, key_roles: torch.Tensor, prompt_len: int) -> np.ndarray:
    """generate()'s per-step eager attentions -> [T, L, R] mass per role of each generated row
    (mean over heads), the paper's attention-flow figure."""
    steps = []
    for step in attentions:  # per generated token: per layer [1, H, Q, K]
        per_layer = []
        for a in step:
            row = a[0, :, -1].float().mean(0)  # [K]
            onehot = attn.role_onehot(key_roles[: row.shape[0]]).to(row.device)
            per_layer.append((row @ onehot).cpu())
        steps.append(torch.stack(per_layer))
    return torch.stack(steps).numpy()


def _key_roles(mi: ModelInputs, max_new_tokens: int) -> torch.Tensor:
    return torch.cat([mi.roles[: mi.prompt_len], torch.full((max_new_tokens,), int(Role.GENERATED))])


def _lens_forward(adapter: ModelAdapter, mi: ModelInputs, lens: LensConfig) -> LensResult:
    """The separate forward the paper ran for its logit lens: every layer's hidden states
    for the whole prompt, then decode the audio positions."""
    out = adapter.model(**_on_device(adapter, mi), output_hidden_states=True, use_cache=False)
    pos = mi.role_positions(Role.AUDIO)
    # hidden_states[l + 1] is layer l's output (the last one already normed: the lens result
    # of the last layer differs by one norm; timing is what this forward is for).
    hidden = {layer: h[0, pos.to(h.device)] for layer, h in enumerate(out.hidden_states[1:])}
    return decode_hidden(adapter, hidden, pos, lens)


@contextmanager
def paper_knockout_hooks(
    adapter: ModelAdapter, mi: ModelInputs, condition: Condition, first_token: bool = True
) -> Iterator[None]:
    """Pre-hooks on every layer's self-attention that write the dtype's minimum into the
    additive mask for (generated row -> blocked-role key), as the paper's code did."""
    _role_blocks(condition)
    blocked, _ = reference_masks(condition, adapter.n_layers)
    P = mi.prompt_len
    roles = mi.roles[:P].to(adapter.device)
    handles = []

    def make(layer: int):
        block_roles = blocked[layer]
        key_block = torch.zeros(P, dtype=torch.bool, device=adapter.device)
        for r in block_roles:
            key_block |= roles == r

        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None or not block_roles:
                return None
            Q, K = mask.shape[-2], mask.shape[-1]
            if Q > 1 and not first_token:
                return None  # the paper: prefill untouched, first generated token not knocked out
            mask = mask.clone()  # one mask tensor is shared by all layers
            rows = slice(Q - 1, Q) if Q > 1 else slice(0, 1)
            cols = key_block[: min(K, P)].clone()
            qpos = K - 1 if Q == 1 else P - 1
            if qpos < len(cols):
                cols[qpos] = False  # a row always sees itself (the engine's convention)
            mask[..., rows, : len(cols)] = mask[..., rows, : len(cols)].masked_fill(
                cols, torch.finfo(mask.dtype).min
            )
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    for layer, module in enumerate(adapter.layers):
        handles.append(module.self_attn.register_forward_pre_hook(make(layer), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eager_model(adapter: ModelAdapter) -> Iterator[None]:
    """The whole model on eager attention (as the paper loaded it); sdpa towers and the
    text model's previous implementation afterwards."""
    previous = getattr(adapter.model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
    adapter.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        adapter.model.set_attn_implementation("sdpa")
        if previous != "sdpa":
            adapter.model.set_attn_implementation({"text_config": previous})


def _avprobe_attention(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn(adapter, ...)` with avprobe's attention installed, the model's own restored after."""

    @functools.wraps(fn)
    def wrapper(adapter: ModelAdapter, *args: Any, **kwargs: Any) -> Any:
        with attn.installed(adapter.model):
            return fn(adapter, *args, **kwargs)

    return wrapper


@torch.no_grad()
def naive_sweep(
    adapter: ModelAdapter,
    mi: ModelInputs,
    conditions: list[Condition],
    max_new_tokens: int,
    lens: LensConfig | None = LensConfig(),
    first_token: bool = True,
) -> SweepResult:
    """The paper's protocol: eager attention, one full generate() per condition."""
    P = mi.prompt_len
    tokens: list[list[int]] = []
    seconds: list[float] = []
    flow = None
    with eager_model(adapter):
        for i, c in enumerate(conditions):
            t0 = time.perf_counter()
            with paper_knockout_hooks(adapter, mi, c, first_token=first_token):
                record = i == 0
                out = _generate(
                    adapter, mi, max_new_tokens,
                    output_attentions=record, return_dict_in_generate=True,
                )
            tokens.append(out.sequences[0, P:].tolist())
            if record:
                flow = _flow_from_attentions(out.attentions, _key_roles(mi, max_new_tokens), P)
            del out
            seconds.append(time.perf_counter() - t0)
        lens_result = _lens_forward(adapter, mi, lens) if lens is not None else None
    return SweepResult(tokens=tokens, flow=flow, lens=lens_result, seconds=seconds)


@torch.no_grad()
@_avprobe_attention
def careful_sweep(
    adapter: ModelAdapter,
    mi: ModelInputs,
    conditions: list[Condition],
    max_new_tokens: int,
    lens: LensConfig | None = LensConfig(),
) -> SweepResult:
    """sdpa, one generate() per condition, the knockout applied inside the attention."""
    P, L = mi.prompt_len, adapter.n_layers
    tokens: list[list[int]] = []
    seconds: list[float] = []
    flow = None
    for i, c in enumerate(conditions):
        t0 = time.perf_counter()
        _role_blocks(c)
        blocked, rule_layers = reference_masks(c, L)
        session = attn.ReferenceKnockout(P, mi.roles[:P], blocked, rule_layers, record=i == 0)
        with attn.using(session):
            out = _generate(adapter, mi, max_new_tokens)
        tokens.append(out[0, P:].tolist())
        if i == 0:
            # per layer: list of [Q_gen, R] per call -> [T, L, R]
            flow = np.stack(
                [torch.cat(session.flow[layer]).cpu().numpy() for layer in range(L)], axis=1
            )
        seconds.append(time.perf_counter() - t0)
    lens_result = _lens_forward(adapter, mi, lens) if lens is not None else None
    return SweepResult(tokens=tokens, flow=flow, lens=lens_result, seconds=seconds)


class _FloorDecode:
    """The least a shared-prefix batched decode must do: per layer and step, one fused
    attention call of all rows over the prompt's keys (additive knockout mask only where a
    layer has one), the rows' own suffixes, and an exact log-sum-exp merge of the two."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], masks, n_rows: int, steps: int,
                 fused: bool = True):
        self.k, self.v = keys, values
        self.fused = fused
        self.prefix_block = masks.prefix_block
        self.B, self.S = n_rows, steps
        self.t = 0
        self.ks: dict[int, torch.Tensor] = {}
        self.vs: dict[int, torch.Tensor] = {}
        self.add: dict[int, torch.Tensor | None] = {}

    def attend(self, module, q, k, v, mask, scale, kwargs):
        layer = module.layer_idx
        B, H, _, d = q.shape
        kvh = k.shape[1]
        g = H // kvh
        if layer not in self.ks:
            self.ks[layer] = k.new_zeros(B, kvh, self.S, d)
            self.vs[layer] = v.new_zeros(B, kvh, self.S, d)
            pb = self.prefix_block[layer]
            self.add[layer] = (
                torch.zeros(pb.shape, dtype=q.dtype, device=q.device)
                .masked_fill_(pb.to(q.device), float("-inf"))
                .repeat_interleave(g, dim=0)[None, None]
                if pb is not None
                else None
            )
        t = self.t
        self.ks[layer][:, :, t] = k[:, :, 0]
        self.vs[layer][:, :, t] = v[:, :, 0]
        qh = q.reshape(B, kvh, g, d).transpose(0, 1).reshape(1, kvh, B * g, d)
        o_pre, lse_pre = attn.block_attention(qh, self.k[layer], self.v[layer], scale, self.add[layer], fused=self.fused)
        s = torch.matmul(q.reshape(B, kvh, g, d), self.ks[layer][:, :, : t + 1].transpose(-1, -2)).float() * scale
        lse_suf = torch.logsumexp(s, -1)  # [B, kvh, g]
        lse_pre = lse_pre.float().view(kvh, B, g).transpose(0, 1)
        lse = torch.logaddexp(lse_pre, lse_suf)
        o_pre = o_pre.view(kvh, B, g, d).transpose(0, 1).float() * torch.exp(lse_pre - lse)[..., None]
        o_suf = torch.matmul(torch.exp(s - lse[..., None]).to(q.dtype), self.vs[layer][:, :, : t + 1])
        return (o_pre + o_suf.float()).reshape(B, H, d).unsqueeze(1).to(q.dtype)


@torch.no_grad()
@_avprobe_attention
def floor_decode(
    adapter: ModelAdapter, mi: ModelInputs, conditions: list[Condition], max_new_tokens: int,
    prefix_path: str = "auto",
) -> SweepResult:
    """One prefill (HF cache) and one batched decode of all conditions; nothing recorded.
    `prefix_path` "dense" turns its fused CPU call off (as the engine's)."""
    from transformers import DynamicCache

    for c in conditions:
        _role_blocks(c)
    model, dev = adapter.model, adapter.device
    P, B = mi.prompt_len, len(conditions)
    cache = DynamicCache(config=adapter.text_config)
    model(**adapter.forward_kwargs(mi, upto=P - 1), cache=cache, use_cache=True, logits_to_keep=1)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    masks = build_masks(conditions, mi.roles[:P], adapter.n_layers)
    session = _FloorDecode(keys, values, masks, B, max_new_tokens, fused=attn.check_prefix_path(prefix_path) != "dense")
    eos = torch.tensor(sorted(adapter.eos_ids), dtype=torch.long, device=dev)
    last_pos = mi.positions[:, 0, P - 1].to(dev)
    tok = torch.full((B,), int(mi.input_ids[0, P - 1]), dtype=torch.long, device=dev)
    out = []
    with attn.using(session):
        for t in range(max_new_tokens):
            session.t = t
            pos = (last_pos + t).view(3, 1, 1).expand(3, B, 1)
            h = adapter.text_model(inputs_embeds=adapter.embed(tok)[:, None], position_ids=pos, use_cache=False)
            logits = adapter.unembed(h.last_hidden_state[:, -1]).float()
            logits.index_fill_(1, eos, float("-inf"))
            tok = logits.argmax(-1)
            out.append(tok)
    ids = torch.stack(out, 1).tolist()
    return SweepResult(tokens=ids)


def nnsight_available() -> bool:
    try:
        import nnsight  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def nnsight_sweep(
    adapter: ModelAdapter,
    mi: ModelInputs,
    conditions: list[Condition],
    max_new_tokens: int,
    lens: LensConfig | None = LensConfig(),
    first_token: bool = True,
) -> SweepResult:
    """The sweep as an nnsight user writes it: wrap the HF model, and for each condition
    run a generation whose traced intervention edits the attention mask that each knocked-out
    layer's self-attention receives; attention weights from eager attention, hidden states
    for the lens from a traced forward."""
    from nnsight import NNsight

    P, L = mi.prompt_len, adapter.n_layers
    roles = mi.roles[:P].to(adapter.device)
    tokens: list[list[int]] = []
    seconds: list[float] = []
    flow = None
    with eager_model(adapter):
        wrapped = NNsight(adapter.model)
        layers = _envoy_of(wrapped, adapter.model, adapter.layers)
        for i, c in enumerate(conditions):
            t0 = time.perf_counter()
            _role_blocks(c)
            blocked, _ = reference_masks(c, L)
            key_block = {
                layer: torch.isin(roles, torch.tensor(sorted(b), device=roles.device))
                for layer, b in enumerate(blocked) if b
            }
            record = i == 0
            with _nnsight_generate(wrapped, adapter, mi, max_new_tokens, record) as tracer:
                # one bounded loop over the decode steps (an open tracer.all() loop would cut off
                # what follows it); the body runs on the step's real values
                for _ in tracer.iter[:max_new_tokens] if key_block else ():
                    for layer, cols in key_block.items():
                        args, kwargs = layers[layer].self_attn.inputs
                        mask = kwargs["attention_mask"]
                        Q, K = mask.shape[-2], mask.shape[-1]
                        if Q > 1 and not first_token:
                            continue
                        cols = cols.clone()
                        qpos = K - 1 if Q == 1 else P - 1
                        if qpos < len(cols):
                            cols[qpos] = False  # a row always sees itself (the engine's convention)
                        mask = mask.clone()
                        mask[..., -1:, :P] = mask[..., -1:, :P].masked_fill(cols, torch.finfo(mask.dtype).min)
                        kwargs["attention_mask"] = mask
                        layers[layer].self_attn.inputs = (args, kwargs)
                out = tracer.result.save()
            tokens.append(out.sequences[0, P:].tolist())
            if record:
                flow = _flow_from_attentions(out.attentions, _key_roles(mi, max_new_tokens), P)
            del out
            seconds.append(time.perf_counter() - t0)
        lens_result = _lens_forward(adapter, mi, lens) if lens is not None else None
    return SweepResult(tokens=tokens, flow=flow, lens=lens_result, seconds=seconds)


def _envoy_of(wrapped, model: torch.nn.Module, module: torch.nn.Module):
    """nnsight's envoy for `module` (a submodule of `model`), found by identity so that no
    raw HF module path is named outside the adapters."""
    path = next(name for name, m in model.named_modules() if m is module)
    envoy = wrapped
    for part in path.split(".") if path else ():
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def _nnsight_generate(wrapped, adapter: ModelAdapter, mi: ModelInputs, max_new_tokens: int, record: bool):
    """A trace of the HF model's generate() (nnsight >= 0.5: `trace(fn=...)`; the output is
    `tracer.result`)."""
    eos = sorted(adapter.eos_ids)
    return wrapped.trace(
        **_on_device(adapter, mi), fn=adapter.model.generate, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, eos_token_id=eos, pad_token_id=eos[0], output_attentions=record,
        return_dict_in_generate=True,
    )
