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
- `GroupedPrefixDecode`: the rows of several clips in one decode step, each clip's block of
  rows attending through that clip's own `SharedPrefixDecode` (its own prefix, held once);
  neighbouring clips of one layout (`stackable`) attend as one `StackedPrefixDecode`, every
  product and reduction of the step batched over a leading clip dimension.
- `ReferenceKnockout`: the straightforward protocol, used by the reference decode and the
  benchmarks' "careful naive": full keys from HF's cache, a boolean mask per layer, sdpa.

Conventions: a row always attends to its own position (the diagonal is never blocked), so
a knockout can never leave a row with nothing to attend to.

Sliding-window layers (the model passes `sliding_window` W to its attention function) let a
row at sequence index i see keys j with i - W < j <= i, as transformers' masks do: the
shared-prefix decode drops the older prefix and suffix keys of those layers at every step;
the reference decode takes the window from the model's own mask and places the keys (a
sliding cache returns only the last W) at their sequence indices. Layers that reuse another
layer's keys and values (Gemma 4's shared layers) receive them as their own and need nothing.
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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return session.attend(module, query, key, value, attention_mask, scale, kwargs), None


def install(model: torch.nn.Module) -> str | None:
    """Register the function once and use it for the text model of `model` only; returns the
    implementation it replaced (None if it was already installed). Prefer `installed`."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, avprobe_attention)
        # Without a registered mask function the attention gets mask=None and padding is lost.
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _REGISTERED = True
    text_cfg = model.config.get_text_config()
    previous = getattr(text_cfg, "_attn_implementation", None)
    if previous == ATTN_NAME:
        return None
    model.set_attn_implementation(text_request(model.config, ATTN_NAME))
    return previous or "sdpa"


def text_request(config: Any, implementation: str) -> dict[str, Any]:
    """`set_attn_implementation`'s request that sets the text model's attention only, wherever
    its config sits: the top-level config itself (`{"": impl}`, e.g. Phi-4-multimodal) or a
    sub-config at any depth (`{"text_config": impl}`, nested under its parents' keys); every
    other sub-config (vision and audio encoders) keeps its own."""
    text = config.get_text_config()
    if text is config:
        return {"": implementation}
    todo: list[tuple[Any, tuple[str, ...]]] = [(config, ())]
    while todo:
        cfg, path = todo.pop(0)
        for key in getattr(cfg, "sub_configs", {}):
            sub = getattr(cfg, key, None)
            if sub is None:
                continue
            if sub is text:
                request: dict[str, Any] = {key: implementation}
                for parent in reversed(path):
                    request = {parent: request}
                return request
            todo.append((sub, (*path, key)))
    raise ValueError(f"{type(config).__name__}: its text config is not among its sub-configs")


@contextmanager
def installed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`install` for the block, then the model's own attention implementation again: a run
    leaves the model as it found it (nested blocks restore once, at the outermost)."""
    previous = install(model)
    try:
        yield model
    finally:
        if previous is not None:
            model.set_attn_implementation(text_request(model.config, previous))


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


# How SharedPrefixDecode attends to the prompt prefix: "fused" (the CPU fused kernel per role
# segment), "dense" (matrix products over the whole prefix) or "auto": fused on CPU once the
# step's scores ([kv heads, rows, prefix]) outnumber DENSE_MAX_SCORES, dense otherwise. The
# fused kernel's per-call cost loses to a few products on short prompts (organism: 17
# conditions over 130 tokens, 0.56 s dense against 0.65 s fused per sweep) and wins on long
# ones (cpu shape: 25 conditions over 2,224 tokens, 5.5 s against 9.5 s); the crossover
# measured between 1.4e5 and 6e5 scores. "dense" also turns the floor's fused call off.
# The setting is configuration (`EngineConfig.prefix_path`), passed to each session.
PREFIX_PATHS = ("auto", "fused", "dense")
DENSE_MAX_SCORES = 1 << 18


def check_prefix_path(setting: str) -> str:
    if setting not in PREFIX_PATHS:
        raise ValueError(f"prefix_path must be 'auto', 'fused' or 'dense', not {setting!r}")
    return setting


def choose_prefix_path(device: torch.device, n_scores: int, setting: str = "auto") -> str:
    """'fused' or 'dense' for one decode session under `setting` (see PREFIX_PATHS)."""
    check_prefix_path(setting)
    if setting == "dense" or device.type != "cpu" or not _fused_cpu_available():
        return "dense"
    if setting == "fused":
        return "fused"
    return "fused" if n_scores > DENSE_MAX_SCORES else "dense"


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [1, kvh, M, d] over one block of keys k/v [1, kvh, N, d], returning the
    output [1, kvh, M, d] and the log-sum-exp of the scaled scores [1, kvh, M] (float32, or
    float64 for float64 inputs), so that blocks can be merged exactly afterwards.

    `mask`: additive [1, 1, M, N] in q's dtype, or None. Rows whose keys are all masked have
    an undefined lse here; the caller marks them dead. On CPU this is one fused kernel that
    never materialises the [M, N] scores (the shared prompt prefix is the long axis); other
    devices (and fused=False) use matrix products.
    """
    if fused and q.device.type == "cpu" and _fused_cpu_available():
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

    The prefix keys are reordered once so that each role is one contiguous segment
    (attention does not depend on key order); the segments are views of one tensor per
    layer. The prefix part of a step takes one of two paths, with the same result:

    - fused (CPU, long prompts; see PREFIX_PATHS): every segment is one fused attention call for all rows,
      returning its output and log-sum-exp; a knocked-out role is a segment whose
      log-sum-exp is set to -inf for the blocked rows, so no mask touches the long prefix
      axis. The kernel never materialises the [rows, P] scores.
    - dense (other devices, short prompts): one score product over the whole
      prefix, the knockout as a masked fill, and the per-segment sums of the exponentiated
      scores as one product with the [P, segments] one-hot: a fixed dozen kernels per layer
      whatever the number of segments (on a GPU the launches, not the arithmetic, cost).

    Either way the prefix and the rows' own suffixes are merged exactly by log-sum-exp, and
    the attention mass per role falls out of the same numbers (exp(lse_segment -
    lse_total)): recording costs no extra pass over the prefix. The per-second buckets of
    one row (the baseline's) take one more product of that row's queries with the prefix.
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
        prefix_path: str = "auto",
    ) -> None:
        self.B, self.S = n_rows, max_steps + 1
        self.prefix_path = check_prefix_path(prefix_path)
        self.suffix0_block, self.rule_rows = suffix0_block, rule_rows
        n_layers = len(prefix_block)
        dev = next(iter(prefix_k.values())).device
        self.path: str | None = None  # "fused" or "dense", chosen at the first step (rows known)
        roles = prefix_roles.to(dev).long()
        order = torch.argsort(roles, stable=True)
        # sequence index of each role-sorted prefix key (a sliding window cuts by index; the
        # stable sort keeps each segment in index order, so the cut is a segment's head)
        self.order = order
        sorted_roles = roles[order]
        # segments: (start, end, role) over the role-sorted prefix
        self.segments: list[tuple[int, int, int]] = []
        ids, counts = torch.unique_consecutive(sorted_roles, return_counts=True)
        start = 0
        for r, n in zip(ids.tolist(), counts.tolist()):
            self.segments.append((start, start + n, int(r)))
            start += n
        self.P = start
        # per layer: the role-sorted [1, kvh, P, d] keys and values (segments are views)
        self.k_sorted: dict[int, torch.Tensor] = {}
        self.v_sorted: dict[int, torch.Tensor] = {}
        for layer, k in prefix_k.items():
            self.k_sorted[layer] = k.index_select(2, order)
            self.v_sorted[layer] = prefix_v[layer].index_select(2, order)
        # per layer: the block pattern in sorted order ([B, P] bool, None if nothing is
        # blocked), and per segment the rows blocked from all of it ([B] bool) and, if only
        # part of a segment is blocked for some row, that segment's pattern ([B, n] bool)
        self.block: list[torch.Tensor | None] = []
        self.dead: list[list[torch.Tensor | None]] = []
        self.partial: list[list[torch.Tensor | None]] = []
        for layer in range(n_layers):
            pb = prefix_block[layer]
            blk_all = pb.to(dev)[:, order] if pb is not None else None
            self.block.append(blk_all)
            dl, pl = [], []
            for a, b, _ in self.segments:
                if blk_all is None:
                    dl.append(None)
                    pl.append(None)
                    continue
                blk = blk_all[:, a:b]
                full, some = blk.all(1), blk.any(1)
                dl.append(full if full.any() else None)
                pl.append(blk if (some & ~full).any() else None)
            self.dead.append(dl)
            self.partial.append(pl)
        seg_roles = torch.tensor([r for _, _, r in self.segments])
        self.seg_onehot = role_onehot(seg_roles).to(dev)  # [nseg, R]
        # [P, nseg]: which segment each sorted prefix position belongs to (dense path)
        self.pos_seg = F.one_hot(
            torch.repeat_interleave(torch.arange(len(self.segments)), torch.tensor([b - a for a, b, _ in self.segments])),
            len(self.segments),
        ).to(dev)
        self.picked = torch.zeros(n_rows, self.S, dtype=torch.bool, device=dev)
        self.t = 0
        self.ks: dict[int, torch.Tensor] = {}
        self.vs: dict[int, torch.Tensor] = {}
        self.record = record
        self.suffix0_role = suffix0_role
        self._rows: dict[tuple[int, int], tuple[list, list]] = {}  # (layer, g) -> expanded masks
        self._typed: dict[torch.dtype, torch.Tensor] = {}  # pos_seg in the accumulation dtype
        self._window: tuple[tuple[int, int], tuple[torch.Tensor, list[int]] | None] | None = None
        self._memory: dict[str, int] | None = None  # what `memory_bytes` said at `release`
        # [steps, layers, rows, roles] attention mass per role, mean over heads
        self.flow = torch.zeros(max_steps, n_layers, n_rows, N_ROLES, device=dev) if record else None
        self.buckets = buckets.to(dev)[order] if buckets is not None else None  # [P, NB] one-hot, sorted
        self.bucket_row = bucket_row
        self.bucket_flow = (
            torch.zeros(max_steps, n_layers, buckets.shape[1], device=dev) if (record and buckets is not None) else None
        )

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the shared prefix (independent of the row count) and the rows' suffixes
        (after `release`, what was held until then)."""
        if self._memory is not None:
            return dict(self._memory)
        prefix = sum(t.numel() * t.element_size() for d in (self.k_sorted, self.v_sorted) for t in d.values())
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

    def _out_of_window(self, window: int | None, t: int) -> tuple[torch.Tensor, list[int]] | None:
        """For a sliding layer at step t: (the role-sorted prefix keys out of its window [P]
        bool, per segment how many of its first keys that is), or None if all are in view.
        The row is at sequence index P + t; it sees keys j > P + t - window."""
        if window is None:
            return None
        key = (int(window), t)
        if self._window is None or self._window[0] != key:
            cutoff = self.P + t - int(window)
            val = None
            if cutoff >= 0:
                out = self.order <= cutoff
                counts = [int(c) for c in torch.stack([out[a:b].sum() for a, b, _ in self.segments]).tolist()]
                val = (out, counts) if any(counts) else None
            self._window = (key, val)
        return self._window[1]

    # One decode step is computed for a stack of C clips that share this session's layout:
    # `st` is this session itself (C = 1, the one-clip engine) or a StackedPrefixDecode of
    # sessions like it. Every tensor of the step has the clips as its leading dimension
    # ([C, kvh, ...] or [C*B, ...] rows, clip-major), so a clip's numbers come out of the
    # same kernels, batched over that dimension, as they do alone.

    C = 1  # clips in the stack (this session alone)

    def _suffix_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' own generated keys and values of `layer` ([B, kvh, S, d]), made at its first step."""
        if layer not in self.ks:
            B, kvh, _, d = k.shape
            self.ks[layer] = k.new_zeros(B, kvh, self.S, d)
            self.vs[layer] = v.new_zeros(B, kvh, self.S, d)
        return self.ks[layer], self.vs[layer]

    @property
    def bucket_parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buckets [P, NB], bucket_flow [steps, layers, NB]) of each clip in the stack."""
        return [(self.buckets, self.bucket_flow)] if self.bucket_flow is not None else []

    def release(self) -> None:
        """Drop the keys and values (the clip's decode is over; its flows stay): a stack of
        clips holds them in one tensor per layer, which a finished clip's views would keep."""
        self._memory = self.memory_bytes()
        for d in (self.k_sorted, self.v_sorted, self.ks, self.vs):
            d.clear()

    def _prefix_fused(self, st, layer, qh, scale, g, acc, cut=None):
        """Fused path: (per-segment outputs [nseg, C, kvh, Bg, d], lses [nseg, C, kvh, Bg]).
        `cut`: per segment, how many of its first keys lie outside a sliding window."""
        dead, masks = self._row_masks(layer, g, qh.dtype)
        kk, vv = st.k_sorted[layer], st.v_sorted[layer]
        outs, lses = [], []
        for i, (a, b, _) in enumerate(self.segments):
            c = cut[i] if cut is not None else 0
            if c == 0:
                o, lse = block_attention(qh, kk[:, :, a:b], vv[:, :, a:b], scale, masks[i])
                lse = lse.to(acc)
                if dead[i] is not None:
                    lse = lse.masked_fill(dead[i], float("-inf"))
            elif a + c >= b:  # the whole segment is out of the window
                o = qh.new_zeros(qh.shape[:-1] + (vv.shape[-1],))
                lse = torch.full(qh.shape[:-1], float("-inf"), dtype=acc, device=qh.device)
            else:
                o, lse = self._segment_part(layer, qh, kk[:, :, a + c : b], vv[:, :, a + c : b], a + c, b, scale, g)
                lse = lse.to(acc)
            outs.append(o)
            lses.append(lse)
        return torch.stack(outs).to(acc), torch.stack(lses)

    def _segment_part(self, layer, qh, kk, vv, a, b, scale, g):
        """One segment's keys [a, b) (the rest out of a window), with the knockout's pattern
        there: rows blocked from all of them are computed unmasked and marked dead (-inf)."""
        blk_all = self.block[layer]
        if blk_all is None:
            return block_attention(qh, kk, vv, scale, None)
        blk = blk_all[:, a:b]
        full = blk.all(1)
        part = blk & ~full[:, None]
        mask = None
        if part.any():
            m = torch.zeros(blk.shape, dtype=qh.dtype, device=qh.device).masked_fill_(part, float("-inf"))
            mask = m.repeat_interleave(g, dim=0)[None, None]
        o, lse = block_attention(qh, kk, vv, scale, mask)
        if full.any():
            lse = lse.masked_fill(full.repeat_interleave(g).view(1, 1, -1), float("-inf"))
        return o, lse

    def _prefix_dense(self, st, layer, qh, scale, kvh, g, acc, out_of_window=None):
        """Dense path: (the unnormalised prefix output [C, kvh, Bg, d], per-segment sums of
        exp(score - m) [C, kvh, Bg, nseg], the row maxima m [C, kvh, Bg, 1], and
        exp(score - m) itself [C, kvh, Bg, P])."""
        B, C = self.B, qh.shape[0]
        s = torch.matmul(qh, st.k_sorted[layer].transpose(-1, -2)).to(acc) * scale  # [C, kvh, Bg, P]
        blk = self.block[layer]
        if blk is not None:
            s.view(C, kvh, B, g, self.P).masked_fill_(blk[None, None, :, None, :], float("-inf"))
        if out_of_window is not None:
            s.masked_fill_(out_of_window[None, None, None, :], float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row blocked from the whole prefix
        e = torch.exp(s - m)
        if acc not in self._typed:
            self._typed[acc] = self.pos_seg.to(acc)
        seg_sum = torch.matmul(e, self._typed[acc])  # [C, kvh, Bg, nseg]
        vv = st.v_sorted[layer]
        out = torch.matmul(e.to(vv.dtype), vv).to(acc)
        return out, seg_sum, m, e

    def attend(self, module, q, k, v, mask, scale, kwargs):
        return self._attend(self, module, q, k, v, scale, kwargs)

    def _attend(self, st, module, q, k, v, scale, kwargs):
        layer = module.layer_idx
        C, B = st.C, self.B
        rows, H, Q, d = q.shape
        if Q != 1 or rows != C * B:
            raise RuntimeError(f"SharedPrefixDecode expects [{C} x B={B}, H, 1, d] queries, got {tuple(q.shape)}")
        kvh = k.shape[1]
        g = H // kvh
        t = st.t
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        if self.path is None:
            self.path = choose_prefix_path(q.device, kvh * B * g * self.P, self.prefix_path)
        ks, vs = st._suffix_kv(layer, k, v)
        ks[:, :, t] = k[:, :, 0]
        vs[:, :, t] = v[:, :, 0]
        # Rows in kv-head-major order per clip: one [kvh, B*g, d] query block shares each kv head.
        qh = q.reshape(C, B, kvh, g, d).transpose(1, 2).reshape(C, kvh, B * g, d)
        # The rows' own suffixes (short): explicit scores with the suffix knockouts.
        qg = q.reshape(C * B, kvh, g, d)
        s_suf = torch.matmul(qg, ks[:, :, : t + 1].transpose(-1, -2)).to(acc) * scale  # [C*B, kvh, g, t+1]
        blocked = None
        s0 = self.suffix0_block[layer]
        if s0 is not None and t > 0:
            blocked = torch.zeros(C * B, t + 1, dtype=torch.bool, device=q.device)
            blocked.view(C, B, t + 1)[:, :, 0] = s0
        rr = self.rule_rows[layer]
        if rr is not None and t > 0:
            rb = (rr[None, :, None] & st.picked[:, : t + 1].view(C, B, t + 1)).view(C * B, t + 1)
            blocked = rb if blocked is None else blocked | rb
        window = kwargs.get("sliding_window")
        if window is not None and t - int(window) >= 0:  # suffix keys s <= t - W are out of view
            wb = torch.zeros(C * B, t + 1, dtype=torch.bool, device=q.device)
            wb[:, : t - int(window) + 1] = True
            blocked = wb if blocked is None else blocked | wb
        if blocked is not None:
            blocked[:, t] = False  # the diagonal: a row always sees itself
            s_suf.masked_fill_(blocked[:, None, None, :], float("-inf"))
        lse_suf = torch.logsumexp(s_suf, dim=-1).view(C, B, kvh, g).transpose(1, 2).reshape(C, kvh, B * g)  # finite
        oow = self._out_of_window(window, t)
        if self.path == "fused":
            outs, lse_seg = self._prefix_fused(st, layer, qh, scale, g, acc, oow[1] if oow is not None else None)
            lse_tot = _logaddexp(torch.logsumexp(lse_seg, dim=0), lse_suf)  # [C, kvh, B*g]
            w = torch.exp(lse_seg - lse_tot)  # [nseg, C, kvh, B*g]: each segment's share of the mass
            out_pre = (w[..., None] * outs).sum(0)  # [C, kvh, B*g, d]
            p_b = None
        else:
            o_un, seg_sum, m, e = self._prefix_dense(st, layer, qh, scale, kvh, g, acc,
                                                     oow[0] if oow is not None else None)
            lse_tot = _logaddexp(torch.log(seg_sum.sum(-1)) + m[..., 0], lse_suf)
            norm = torch.exp(m[..., 0] - lse_tot)  # [C, kvh, B*g]
            out_pre = o_un * norm[..., None]
            w = (seg_sum * norm[..., None]).permute(3, 0, 1, 2)  # [nseg, C, kvh, B*g]
            br = slice(self.bucket_row * g, (self.bucket_row + 1) * g)
            p_b = e[:, :, br] * norm[:, :, br, None] if self.bucket_flow is not None else None
        lse_tot_b = lse_tot.view(C, kvh, B, g).transpose(1, 2)  # [C, B, kvh, g]
        p_suf = torch.exp(s_suf.view(C, B, kvh, g, t + 1) - lse_tot_b[..., None]).view(C * B, kvh, g, t + 1)
        o_suf = torch.matmul(p_suf.to(vs.dtype), vs[:, :, : t + 1]).to(acc)  # [C*B, kvh, g, d]
        out = out_pre.view(C, kvh, B, g, d).transpose(1, 2) + o_suf.view(C, B, kvh, g, d)
        if self.record:
            wm = w.view(-1, C, kvh, B, g).mean(dim=(2, 4))  # [nseg, C, B]
            # one segment per role, so the product with the one-hot only places each
            # segment's share in its role's column: exact whatever the kernel
            f = (wm.permute(1, 2, 0).to(self.seg_onehot.dtype) @ self.seg_onehot).view(C * B, -1)  # [C*B, R]
            ps = p_suf.mean(dim=(1, 2))  # [C*B, t+1]
            f[:, self.suffix0_role] += ps[:, 0].to(f.dtype)
            f[:, int(Role.GENERATED)] += ps[:, 1:].sum(-1).to(f.dtype)
            st.flow[t, layer] = f
            if self.bucket_flow is not None:
                self._bucket_mass(st, layer, q, scale, lse_tot, p_b, kvh, g, oow[0] if oow is not None else None)
        return out.reshape(C * B, H, d).unsqueeze(1).to(q.dtype)

    def _bucket_mass(self, st, layer, q, scale, lse_tot, p_dense, kvh, g, out_of_window=None) -> None:
        """Each clip's bucket row's attention over the prefix, mean over heads, summed per
        bucket, into its bucket flow. `p_dense`: on the dense path, those rows'
        probabilities [C, kvh, g, P], already at hand; None on the fused path, where they
        take one product of the rows' queries here."""
        b, C, t = self.bucket_row, st.C, st.t
        if p_dense is None:
            lse_b = lse_tot[:, :, b * g : (b + 1) * g]  # [C, kvh, g]
            qb = q[:, :, 0].reshape(C, self.B, kvh, g, -1)[:, b]  # [C, kvh, g, d]
            s = torch.matmul(qb, st.k_sorted[layer].transpose(-1, -2)).to(lse_b.dtype) * scale  # [C, kvh, g, P]
            blk = self.block[layer]
            if blk is not None:
                s = s.masked_fill(blk[b], float("-inf"))
            if out_of_window is not None:
                s = s.masked_fill(out_of_window, float("-inf"))
            p_dense = torch.exp(s - lse_b[..., None])
        pm = p_dense.mean(dim=(1, 2))  # [C, P]
        # clip by clip: a one-row product takes another kernel than a C-row one
        for c, (buckets, flow) in enumerate(st.bucket_parts):
            flow[t, layer] = pm[c].to(buckets.dtype) @ buckets


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.logaddexp over [C, ...], clip by clip on CPU. Its CPU kernel computes a tensor's
    last elements (past a multiple of twice its vector width) with scalar code that rounds
    differently (1,340 of 4 million random pairs on this AVX-512 CPU), so one call over all clips would round some
    of a clip's elements unlike the clip alone. exp and log agree with their scalar code; the
    tests of stacked clips hold every step to the one-clip engine bit for bit. A GPU kernel
    runs one code for every element: one call."""
    if a.shape[0] == 1 or a.device.type != "cpu":
        return torch.logaddexp(a, b)
    out = torch.empty_like(a)
    for c in range(a.shape[0]):
        torch.logaddexp(a[c], b[c], out=out[c])
    return out


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))


def stackable(a: SharedPrefixDecode, b: SharedPrefixDecode) -> bool:
    """Whether two clips' sessions can decode as one stack: the same rows, steps, prompt
    length and role layout (the role-sorted order, so sliding windows cut alike), the same
    knockout patterns in every layer and the same recording; only the keys, values, picked
    positions and time buckets are the clips' own."""
    if (a.B, a.S, a.P, a.segments, a.suffix0_role, a.record, a.prefix_path, a.path, a.t, a.bucket_row,
            a.bucket_flow is None, len(a.block)) != \
            (b.B, b.S, b.P, b.segments, b.suffix0_role, b.record, b.prefix_path, b.path, b.t, b.bucket_row,
             b.bucket_flow is None, len(b.block)):
        return False
    if a.k_sorted.keys() != b.k_sorted.keys() or a.ks.keys() != b.ks.keys():
        return False
    for layer, k in a.k_sorted.items():
        o = b.k_sorted[layer]
        if (k.shape, k.dtype, k.device) != (o.shape, o.dtype, o.device):
            return False
    if not torch.equal(a.order, b.order):
        return False
    return all(_same(x, y) for xs, ys in ((a.block, b.block), (a.suffix0_block, b.suffix0_block),
                                           (a.rule_rows, b.rule_rows)) for x, y in zip(xs, ys))


def stack_order(sessions: list[SharedPrefixDecode]) -> list[int]:
    """An order of the sessions in which stackable ones are neighbours (first come first)."""
    groups: list[list[int]] = []
    for i, s in enumerate(sessions):
        for grp in groups:
            if stackable(sessions[grp[0]], s):
                grp.append(i)
                break
        else:
            groups.append([i])
    return [i for grp in groups for i in grp]


class StackedPrefixDecode:
    """C clips with one layout (see `stackable`) decoded as one stack: their prefix keys and
    values in one [C, kvh, P, d] tensor per layer, their rows' suffixes in one [C*B, ...]
    tensor, so every product and reduction of a step runs once over all of them (batched over
    the clip dimension) instead of once per clip. The step itself is the first session's
    (`SharedPrefixDecode._attend`). Each clip's session keeps views of its part of the stacked
    tensors (the keys and values are stored once per clip: the stacked copies replace the
    session's own), its flows and its picked positions, so it reads its results as alone."""

    def __init__(self, sessions: list[SharedPrefixDecode]) -> None:
        if len(sessions) < 2:
            raise ValueError("a stack needs at least two sessions")
        lay = sessions[0]
        for s in sessions[1:]:
            if not stackable(lay, s):
                raise ValueError("sessions of different layouts cannot be stacked")
        self.sessions, self.layout, self.C, self.B = sessions, lay, len(sessions), len(sessions) * lay.B
        self.k_sorted = self._stack([s.k_sorted for s in sessions], "k_sorted")
        self.v_sorted = self._stack([s.v_sorted for s in sessions], "v_sorted")
        self.ks = self._stack([s.ks for s in sessions], "ks")
        self.vs = self._stack([s.vs for s in sessions], "vs")
        self.picked = self._rebind(torch.cat([s.picked for s in sessions]), "picked", 0)
        self.flow = self._rebind(torch.cat([s.flow for s in sessions], 2), "flow", 2) if lay.record else None

    def _rebind(self, stacked: torch.Tensor, name: str, dim: int) -> torch.Tensor:
        """Give each session its part of `stacked` (along `dim`) in place of its own tensor."""
        n = stacked.shape[dim] // self.C
        for c, s in enumerate(self.sessions):
            setattr(s, name, stacked.narrow(dim, c * n, n))
        return stacked

    def _stack(self, parts: list[dict[int, torch.Tensor]], name: str) -> dict[int, torch.Tensor]:
        """Per layer, the sessions' tensors in one (layer by layer, so that the sessions' own
        copies are freed as the stacked ones replace them)."""
        out = {}
        for layer in list(parts[0]):
            out[layer] = torch.cat([p[layer] for p in parts])
            n = out[layer].shape[0] // self.C
            for c, p in enumerate(parts):
                p[layer] = out[layer][c * n : (c + 1) * n]
        return out

    @property
    def t(self) -> int:
        return self.layout.t

    @property
    def bucket_parts(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [part for s in self.sessions for part in s.bucket_parts]

    def _suffix_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.ks:
            rows, kvh, _, d = k.shape
            for name in ("ks", "vs"):
                stacked = k.new_zeros(rows, kvh, self.layout.S, d)
                getattr(self, name)[layer] = stacked
                n = rows // self.C
                for c, s in enumerate(self.sessions):
                    getattr(s, name)[layer] = stacked[c * n : (c + 1) * n]
        return self.ks[layer], self.vs[layer]

    def memory_bytes(self) -> dict[str, int]:
        parts = [s.memory_bytes() for s in self.sessions]
        return {k: sum(p[k] for p in parts) for k in ("prefix", "suffix")}

    def attend(self, module, q, k, v, mask, scale, kwargs):
        out = self.layout._attend(self, module, q, k, v, scale, kwargs)
        for s in self.sessions:
            s.path = self.layout.path
        return out


class GroupedPrefixDecode:
    """One decode step of several clips' rows: a grouped shared prefix.

    `sessions`: one `SharedPrefixDecode` per clip, in the order of the clips' row blocks in the
    batch (clip c's rows are a contiguous block of `sessions[c].B` rows). The model's layers
    run once over all rows; the attention of each block is its own clip's, over its own
    prompt keys and values (held once per clip) and its rows' suffixes, exactly as that clip
    decoded alone would compute it. Neighbouring clips of one layout (`stackable`: in the
    organism world, most clips of a batch) attend as one `StackedPrefixDecode`, a dozen
    kernels per layer for all of them; a clip of its own layout attends through its session,
    a dozen kernels of its own (`stack_order` puts the clips of a layout together).
    """

    def __init__(self, sessions: list[SharedPrefixDecode]) -> None:
        if not sessions:
            raise ValueError("no sessions to group")
        self.sessions = sessions
        bounds = [0]
        for s in sessions:
            bounds.append(bounds[-1] + s.B)
        self.spans = list(zip(bounds[:-1], bounds[1:]))
        self.B = bounds[-1]
        # consecutive runs of stackable sessions: (the session or the stack, first row, end row)
        self.parts: list[tuple[SharedPrefixDecode | StackedPrefixDecode, int, int]] = []
        i = 0
        while i < len(sessions):
            j = i + 1
            while j < len(sessions) and stackable(sessions[i], sessions[j]):
                j += 1
            part = sessions[i] if j == i + 1 else StackedPrefixDecode(sessions[i:j])
            self.parts.append((part, bounds[i], bounds[j]))
            i = j

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held for the clips' prefixes (one per clip) and all rows' suffixes."""
        parts = [s.memory_bytes() for s in self.sessions]
        return {k: sum(p[k] for p in parts) for k in ("prefix", "suffix")}

    def attend(self, module, q, k, v, mask, scale, kwargs):
        if q.shape[0] != self.B:
            raise RuntimeError(f"GroupedPrefixDecode expects {self.B} rows, got {tuple(q.shape)}")
        if len(self.parts) == 1:
            return self.parts[0][0].attend(module, q, k, v, mask, scale, kwargs)
        outs = []
        for s, a, b in self.parts:
            m = mask[a:b] if torch.is_tensor(mask) and mask.shape[0] == self.B else mask
            outs.append(s.attend(module, q[a:b], k[a:b], v[a:b], m, scale, kwargs))
        return torch.cat(outs, 0)


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
        self.ends: dict[int, int] = {}  # per layer: sequence index after its last query row

    def _end(self, layer: int, q_len: int, k_len: int) -> int:
        """Sequence index after this call's last query row. A prefill (the first call, or
        more than one row) ends with its keys; a decode step advances the layer's count, as a
        sliding cache returns only the last W keys and a shared layer's prefill keeps only
        the last rows."""
        prev = self.ends.get(layer)
        end = k_len if prev is None or q_len > 1 else max(k_len, prev + q_len)
        self.ends[layer] = end
        return end

    def attend(self, module, q, k, v, mask, scale, kwargs):
        layer = module.layer_idx
        B, H, Q, d = q.shape
        K = k.shape[2]
        dev = q.device
        end = self._end(layer, Q, K)
        qpos = torch.arange(end - Q, end, device=dev)  # sequence indices of the rows and keys
        kpos = torch.arange(end - K, end, device=dev)
        # The model's mask when it gives one (causal, its sliding window, Gemma 4's
        # bidirectional frames in the prompt); causal only where it leaves the mask out.
        if mask is not None and mask.dtype == torch.bool:
            allow = mask[0, 0, -Q:, :K]
        elif mask is not None:
            allow = mask[0, 0, -Q:, :K] > float("-inf")
        else:
            allow = kpos[None, :] <= qpos[:, None]
        gen_rows = qpos >= self.P - 1
        key_roles = torch.full((K,), int(Role.GENERATED), device=dev)
        in_prompt = kpos < self.P
        key_roles[in_prompt] = self.roles.to(dev)[kpos[in_prompt]].to(key_roles.dtype)
        block = torch.zeros(K, dtype=torch.bool, device=dev)
        for r in self.blocked_roles[layer]:
            block |= key_roles == r
        if layer in self.rule_layers and self.picked:
            picked = torch.tensor(sorted(self.picked), dtype=torch.long, device=dev)
            block |= torch.isin(kpos, picked)
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
