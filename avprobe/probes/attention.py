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


def _fused_cpu_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


# Set False to force the explicit path everywhere (tests compare the two).
USE_FUSED = True


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, kvh, M, d] over one block of keys k/v [1, kvh, N, d], returning the
    output [1, kvh, M, d] and the log-sum-exp of the scaled scores [1, kvh, M] (float32, or
    float64 for float64 inputs), so that blocks can be merged exactly afterwards.

    `mask`: additive [1, 1, M, N] in q's dtype, or None. Rows whose keys are all masked have
    an undefined lse here; the caller marks them dead. On CPU this is one fused kernel that
    never materialises the [M, N] scores (the shared prompt prefix is the long axis); other
    devices use matrix products.
    """
    if USE_FUSED and q.device.type == "cpu" and _fused_cpu_available():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
        return out, lse
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.matmul(p.to(v.dtype), v), lse


class SharedPrefixDecode:
    """Batched decode of B condition rows over one shared prompt prefix.

    prefix_k/prefix_v: per layer [1, kv_heads, P, d]. Per layer l:
    - prefix_block[l]: [B, P] bool (True = row may not attend to that prompt key) or None;
    - rule_rows[l]: [B] bool, rows whose generated-position rule applies in layer l, or None.
    `picked` [B, S] marks suffix positions chosen by a row's rule (set by the engine).
    Suffix position 0 is the last prompt token (its role `suffix0_role`); its key is blocked
    for a row when `suffix0_block[l][row]`.

    How: the prefix keys are reordered once so that each role is one contiguous segment
    (attention does not depend on key order). Each step, every segment is one fused
    attention call for all rows, returning its output and log-sum-exp; a knocked-out role
    is a segment whose log-sum-exp is set to -inf for the blocked rows, so no mask is
    applied to the long prefix axis. The segments and the rows' own suffixes are merged
    exactly by their log-sum-exps, and the attention mass per role falls out of the same
    numbers (exp(lse_segment - lse_total)): recording costs no extra pass over the prefix.
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
        self.B, self.S = n_rows, max_steps + 1
        self.suffix0_block, self.rule_rows = suffix0_block, rule_rows
        n_layers = len(prefix_block)
        dev = next(iter(prefix_k.values())).device
        roles = prefix_roles.to(dev).long()
        order = torch.argsort(roles, stable=True)
        sorted_roles = roles[order]
        # segments: (start, end, role) over the role-sorted prefix
        self.segments: list[tuple[int, int, int]] = []
        ids, counts = torch.unique_consecutive(sorted_roles, return_counts=True)
        start = 0
        for r, n in zip(ids.tolist(), counts.tolist()):
            self.segments.append((start, start + n, int(r)))
            start += n
        self.P = start
        # per layer, per segment: contiguous [1, kvh, n, d] keys and values
        self.seg_k: dict[int, list[torch.Tensor]] = {}
        self.seg_v: dict[int, list[torch.Tensor]] = {}
        for layer, k in prefix_k.items():
            ks = k.index_select(2, order)
            vs = prefix_v[layer].index_select(2, order)
            self.seg_k[layer] = [ks[:, :, a:b].contiguous() for a, b, _ in self.segments]
            self.seg_v[layer] = [vs[:, :, a:b].contiguous() for a, b, _ in self.segments]
        # per layer, per segment: rows blocked from the whole segment ([B] bool) and, if
        # only part of a segment is blocked for some row, the block pattern ([B, n] bool)
        self.dead: list[list[torch.Tensor | None]] = []
        self.partial: list[list[torch.Tensor | None]] = []
        for layer in range(n_layers):
            pb = prefix_block[layer]
            dl, pl = [], []
            for a, b, _ in self.segments:
                if pb is None:
                    dl.append(None)
                    pl.append(None)
                    continue
                blk = pb.to(dev)[:, order[a:b]]
                full, some = blk.all(1), blk.any(1)
                dl.append(full if full.any() else None)
                pl.append(blk if (some & ~full).any() else None)
            self.dead.append(dl)
            self.partial.append(pl)
        self.seg_onehot = role_onehot(torch.tensor([r for _, _, r in self.segments])).to(dev)  # [nseg, R]
        self.picked = torch.zeros(n_rows, self.S, dtype=torch.bool, device=dev)
        self.t = 0
        self.ks: dict[int, torch.Tensor] = {}
        self.vs: dict[int, torch.Tensor] = {}
        self.record = record
        self.suffix0_role = suffix0_role
        self._rows: dict[tuple[int, int], tuple[list, list]] = {}  # (layer, g) -> expanded masks
        # [steps, layers, rows, roles] attention mass per role, mean over heads
        self.flow = torch.zeros(max_steps, n_layers, n_rows, N_ROLES, device=dev) if record else None
        self.buckets = buckets.to(dev)[order] if buckets is not None else None  # [P, NB] one-hot, sorted
        self.bucket_row = bucket_row
        self.bucket_flow = (
            torch.zeros(max_steps, n_layers, buckets.shape[1], device=dev) if (record and buckets is not None) else None
        )

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the shared prefix (independent of the row count) and the rows' suffixes."""
        prefix = sum(t.numel() * t.element_size() for d in (self.seg_k, self.seg_v) for ts in d.values() for t in ts)
        suffix = sum(t.numel() * t.element_size() for d in (self.ks, self.vs) for t in d.values())
        return {"prefix": prefix, "suffix": suffix}

    def _row_masks(self, layer: int, g: int, dtype: torch.dtype) -> tuple[list, list]:
        """Per segment: dead rows as [1, 1, B*g] bool and partial masks as additive
        [1, 1, B*g, n] in `dtype` (rows in the kv-head-major layout b*g + j)."""
        key = (layer, g)
        if key not in self._rows:
            dead = [d.repeat_interleave(g).view(1, 1, -1) if d is not None else None for d in self.dead[layer]]
            masks = []
            for p in self.partial[layer]:
                if p is None:
                    masks.append(None)
                    continue
                m = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill_(p, float("-inf"))
                masks.append(m.repeat_interleave(g, dim=0)[None, None])
            self._rows[key] = (dead, masks)
        return self._rows[key]

    def attend(self, module, q, k, v, mask, scale, kwargs):
        layer = module.layer_idx
        B, H, Q, d = q.shape
        if Q != 1 or B != self.B:
            raise RuntimeError(f"SharedPrefixDecode expects [B={self.B}, H, 1, d] queries, got {tuple(q.shape)}")
        kvh = k.shape[1]
        g = H // kvh
        t = self.t
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if layer not in self.ks:
            self.ks[layer] = k.new_zeros(B, kvh, self.S, d)
            self.vs[layer] = v.new_zeros(B, kvh, self.S, d)
        ks, vs = self.ks[layer], self.vs[layer]
        ks[:, :, t] = k[:, :, 0]
        vs[:, :, t] = v[:, :, 0]
        dead, masks = self._row_masks(layer, g, q.dtype)
        # Rows in kv-head-major order: one [kvh, B*g, d] query block shares each kv head.
        qh = q.reshape(B, kvh, g, d).transpose(0, 1).reshape(1, kvh, B * g, d)
        outs, lses = [], []
        for i, (kk, vv) in enumerate(zip(self.seg_k[layer], self.seg_v[layer])):
            o, lse = block_attention(qh, kk, vv, scale, masks[i])
            lse = lse.to(acc)
            if dead[i] is not None:
                lse = lse.masked_fill(dead[i], float("-inf"))
            outs.append(o)
            lses.append(lse)
        # The rows' own suffixes (short): explicit scores with the suffix knockouts.
        qg = q.reshape(B, kvh, g, d)
        s_suf = torch.matmul(qg, ks[:, :, : t + 1].transpose(-1, -2)).to(acc) * scale  # [B, kvh, g, t+1]
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
            s_suf.masked_fill_(blocked[:, None, None, :], float("-inf"))
        lse_suf = torch.logsumexp(s_suf, dim=-1).transpose(0, 1).reshape(1, kvh, B * g)  # finite: diagonal
        lse_seg = torch.stack(lses)  # [nseg, 1, kvh, B*g]
        lse_tot = torch.logaddexp(torch.logsumexp(lse_seg, dim=0), lse_suf)  # [1, kvh, B*g]
        w = torch.exp(lse_seg - lse_tot)  # [nseg, 1, kvh, B*g]: each segment's share of the mass
        out_pre = (w[..., None] * torch.stack(outs).to(acc)).sum(0)  # [1, kvh, B*g, d]
        lse_tot_b = lse_tot.view(kvh, B, g).transpose(0, 1)  # [B, kvh, g]
        p_suf = torch.exp(s_suf - lse_tot_b[..., None])  # [B, kvh, g, t+1]
        out = out_pre.view(kvh, B, g, d).transpose(0, 1) + torch.matmul(p_suf.to(vs.dtype), vs[:, :, : t + 1]).to(acc)
        if self.record:
            wm = w.view(-1, kvh, B, g).mean(dim=(1, 3))  # [nseg, B]
            f = wm.transpose(0, 1).to(self.seg_onehot.dtype) @ self.seg_onehot  # [B, R]
            ps = p_suf.mean(dim=(1, 2))  # [B, t+1]
            f[:, self.suffix0_role] += ps[:, 0].to(f.dtype)
            f[:, int(Role.GENERATED)] += ps[:, 1:].sum(-1).to(f.dtype)
            self.flow[t, layer] = f
            if self.bucket_flow is not None:
                self.bucket_flow[t, layer] = self._bucket_mass(layer, q, scale, lse_tot_b, dead, masks, g)
        return out.reshape(B, H, d).unsqueeze(1).to(q.dtype)

    def _bucket_mass(self, layer, q, scale, lse_tot_b, dead, masks, g) -> torch.Tensor:
        """The bucket row's attention over the prefix, mean over heads, summed per bucket."""
        b = self.bucket_row
        kvh = lse_tot_b.shape[1]
        qb = q[b, :, 0].reshape(kvh, g, -1)
        parts = []
        for i, kk in enumerate(self.seg_k[layer]):
            s = torch.matmul(qb, kk[0].transpose(-1, -2)).to(lse_tot_b.dtype) * scale  # [kvh, g, n]
            if masks[i] is not None:
                s = s + masks[i][0, 0, b * g : (b + 1) * g].to(s.dtype)
            p = torch.exp(s - lse_tot_b[b][..., None]).mean(dim=(0, 1))
            if dead[i] is not None and bool(dead[i][0, 0, b * g]):
                p = torch.zeros_like(p)
            parts.append(p)
        return torch.cat(parts).to(self.buckets.dtype) @ self.buckets


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
