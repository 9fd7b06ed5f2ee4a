"""avprobe's attention function: capture, knockout and attention-flow recording.

One function is registered with transformers' `AttentionInterface` under the name
"avprobe" and installed on the text model only (the audio and vision towers keep theirs).
With no active session it is exactly sdpa. A session, set with `using(session)` for the
duration of one forward, decides what it does:

- `PrefixCapture`: sdpa, and keep each layer's keys and values (the shared prompt prefix).
- `SharedPrefixDecode`: one decode step of B condition rows. The prompt's keys and values
  are held once ([1, kv_heads, P, d]) and every row attends to them through one matrix
  product per layer; each row keeps only its own generated suffix. Knockout masks are
  per row and per layer; the attention mass per role is recorded for every row.
- `ReferenceKnockout`: the straightforward protocol, used by the reference decode and the
  benchmarks' "careful naive": full keys from HF's cache, a boolean mask per layer, sdpa.

Conventions: a row always attends to its own position (the diagonal is never blocked), so
a knockout can never leave a row with nothing to attend to.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from avprobe.types import N_ROLES, Role

ATTN_NAME = "avprobe"
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("avprobe_attention_session", default=None)
_REGISTERED = False


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def avprobe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, Q, d], key/value [B, kv_heads, K, d] -> (out [B, Q, H, d], None)."""
    session = _ACTIVE.get()
    if session is None:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("sliding-window attention layers are not supported by avprobe sessions")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return session.attend(module, query, key, value, attention_mask, scale, kwargs), None


def install(model: torch.nn.Module) -> None:
    """Register the function once and use it for the text model of `model` only."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, avprobe_attention)
        # Without a registered mask function the attention gets mask=None and padding is lost.
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _REGISTERED = True
    text_cfg = model.config.get_text_config()
    if getattr(text_cfg, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation({"text_config": ATTN_NAME})


@contextmanager
def using(session: Any) -> Iterator[Any]:
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def role_onehot(roles: torch.Tensor, n: int = N_ROLES) -> torch.Tensor:
    """[P] role ids -> [P, n] float one-hot, for summing attention mass per role."""
    return F.one_hot(roles.long(), n).float()


class PrefixCapture:
    """Plain sdpa; keeps every layer's (post-rotary) keys and values."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def attend(self, module, q, k, v, mask, scale, kwargs):
        self.keys[module.layer_idx] = k.detach()
        self.values[module.layer_idx] = v.detach()
        out, _ = _sdpa(module, q, k, v, mask, scaling=scale, **kwargs)
        return out


class SharedPrefixDecode:
    """Batched decode of B condition rows over one shared prompt prefix.

    prefix_k/prefix_v: per layer [1, kv_heads, P, d]. Per layer l:
    - prefix_block[l]: [B, P] bool (True = row may not attend to that prompt key) or None;
    - rule_rows[l]: [B] bool, rows whose generated-position rule applies in layer l, or None.
    `picked` [B, S] marks suffix positions chosen by a row's rule (set by the engine).
    Suffix position 0 is the last prompt token (its role `suffix0_role`); its key is blocked
    for a row when `suffix0_block[l][row]`.
    """

    def __init__(
        self,
        prefix_k: dict[int, torch.Tensor],
        prefix_v: dict[int, torch.Tensor],
        n_rows: int,
        max_steps: int,
        prefix_block: list[torch.Tensor | None],
        suffix0_block: list[torch.Tensor | None],
        rule_rows: list[torch.Tensor | None],
        prefix_roles: torch.Tensor,
        suffix0_role: int,
        record: bool = True,
        buckets: torch.Tensor | None = None,
        bucket_row: int = 0,
    ) -> None:
        self.pk, self.pv = prefix_k, prefix_v
        self.B, self.S = n_rows, max_steps + 1
        self.prefix_block, self.suffix0_block, self.rule_rows = prefix_block, suffix0_block, rule_rows
        n_layers = len(prefix_block)
        dev = next(iter(prefix_k.values())).device
        self.picked = torch.zeros(n_rows, self.S, dtype=torch.bool, device=dev)
        self.t = 0
        self.ks: dict[int, torch.Tensor] = {}
        self.vs: dict[int, torch.Tensor] = {}
        self.record = record
        self.onehot = role_onehot(prefix_roles).to(dev)  # [P, R]
        self.suffix0_role = suffix0_role
        # [steps, layers, rows, roles] attention mass per role, mean over heads
        self.flow = torch.zeros(max_steps, n_layers, n_rows, N_ROLES, device=dev) if record else None
        self.buckets = buckets.to(dev) if buckets is not None else None  # [P, NB] one-hot
        self.bucket_row = bucket_row
        self.bucket_flow = (
            torch.zeros(max_steps, n_layers, buckets.shape[1], device=dev) if (record and buckets is not None) else None
        )

    def attend(self, module, q, k, v, mask, scale, kwargs):
        layer = module.layer_idx
        B, H, Q, d = q.shape
        if Q != 1 or B != self.B:
            raise RuntimeError(f"SharedPrefixDecode expects [B={self.B}, H, 1, d] queries, got {tuple(q.shape)}")
        kvh = k.shape[1]
        g = H // kvh
        t = self.t
        if layer not in self.ks:
            self.ks[layer] = k.new_zeros(B, kvh, self.S, d)
            self.vs[layer] = v.new_zeros(B, kvh, self.S, d)
        ks, vs = self.ks[layer], self.vs[layer]
        ks[:, :, t] = k[:, :, 0]
        vs[:, :, t] = v[:, :, 0]
        pk, pv = self.pk[layer][0], self.pv[layer][0]  # [kvh, P, d]
        P = pk.shape[1]
        qg = q.reshape(B, kvh, g, d)
        # Shared prefix: one [kvh, B*g, d] x [kvh, d, P] product for all rows.
        qh = qg.permute(1, 0, 2, 3).reshape(kvh, B * g, d)
        s_pre = torch.matmul(qh, pk.transpose(1, 2)).view(kvh, B, g, P).permute(1, 0, 2, 3)
        s_suf = torch.matmul(qg, ks[:, :, : t + 1].transpose(-1, -2))  # [B, kvh, g, t+1]
        scores = torch.cat([s_pre, s_suf], dim=-1).float() * scale
        pb = self.prefix_block[layer]
        if pb is not None:
            scores[..., :P].masked_fill_(pb[:, None, None, :], float("-inf"))
        blocked = None
        s0 = self.suffix0_block[layer]
        if s0 is not None and t > 0:
            blocked = torch.zeros(B, t + 1, dtype=torch.bool, device=q.device)
            blocked[:, 0] = s0
        rr = self.rule_rows[layer]
        if rr is not None and t > 0:
            rb = rr[:, None] & self.picked[:, : t + 1]
            blocked = rb if blocked is None else blocked | rb
        if blocked is not None:
            blocked[:, t] = False  # the diagonal: a row always sees itself
            scores[..., P:].masked_fill_(blocked[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        p_pre = probs[..., :P].to(pv.dtype)
        p_suf = probs[..., P:].to(vs.dtype)
        out_pre = torch.matmul(p_pre.permute(1, 0, 2, 3).reshape(kvh, B * g, P), pv)  # [kvh, B*g, d]
        out = out_pre.view(kvh, B, g, d).permute(1, 0, 2, 3) + torch.matmul(p_suf, vs[:, :, : t + 1])
        if self.record:
            ph = probs.mean(dim=(1, 2))  # [B, P + t + 1]
            f = ph[:, :P] @ self.onehot
            f[:, self.suffix0_role] += ph[:, P]
            f[:, int(Role.GENERATED)] += ph[:, P + 1 :].sum(-1)
            self.flow[t, layer] = f
            if self.bucket_flow is not None:
                self.bucket_flow[t, layer] = ph[self.bucket_row, :P] @ self.buckets
        return out.reshape(B, H, d).unsqueeze(1).to(q.dtype)


class ReferenceKnockout:
    """The straightforward protocol: full keys every step, one boolean mask per layer.

    `prompt_len` P: rows at absolute positions >= P-1 are generated rows. `blocked_roles[l]`:
    set of role ids blocked in layer l; `rule_layers`: layers where `picked` generated
    positions (absolute, set by the decode loop) are blocked. With `record=True` the
    per-role mass of generated rows is kept (`flow[layer]` list of [Q_gen, R] per call).
    """

    def __init__(
        self,
        prompt_len: int,
        roles: torch.Tensor,
        blocked_roles: list[frozenset[int]],
        rule_layers: frozenset[int] = frozenset(),
        record: bool = False,
    ) -> None:
        self.P = prompt_len
        self.roles = roles
        self.blocked_roles = blocked_roles
        self.rule_layers = rule_layers
        self.picked: set[int] = set()
        self.record = record
        self.flow: dict[int, list[torch.Tensor]] = {}

    def attend(self, module, q, k, v, mask, scale, kwargs):
        layer = module.layer_idx
        B, H, Q, d = q.shape
        K = k.shape[2]
        dev = q.device
        qpos = torch.arange(K - Q, K, device=dev)
        kpos = torch.arange(K, device=dev)
        allow = kpos[None, :] <= qpos[:, None]  # causal
        if mask is not None and mask.dtype == torch.bool:
            allow = allow & mask[0, 0, -Q:, :K]
        elif mask is not None:
            allow = allow & (mask[0, 0, -Q:, :K] > float("-inf"))
        gen_rows = qpos >= self.P - 1
        key_roles = torch.full((K,), int(Role.GENERATED), device=dev)
        n_prompt = min(K, self.P)
        key_roles[:n_prompt] = self.roles[:n_prompt].to(dev)
        block = torch.zeros(K, dtype=torch.bool, device=dev)
        for r in self.blocked_roles[layer]:
            block |= key_roles == r
        if layer in self.rule_layers and self.picked:
            idx = torch.tensor(sorted(p for p in self.picked if p < K), dtype=torch.long, device=dev)
            block[idx] = True
        if block.any():
            rowblock = gen_rows[:, None] & block[None, :] & (kpos[None, :] != qpos[:, None])
            allow = allow & ~rowblock
        kv_groups = H // k.shape[1]
        if self.record:
            ke = k.repeat_interleave(kv_groups, dim=1)
            scores = torch.matmul(q, ke.transpose(-1, -2)).float() * scale
            scores = scores.masked_fill(~allow[None, None], float("-inf"))
            probs = torch.softmax(scores, -1)
            ph = probs.mean(1)[0][gen_rows]  # [Qg, K]
            self.flow.setdefault(layer, []).append(ph @ role_onehot(key_roles).to(ph.dtype))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allow[None, None], scale=scale, enable_gqa=kv_groups > 1
        )
        return out.transpose(1, 2).contiguous()
