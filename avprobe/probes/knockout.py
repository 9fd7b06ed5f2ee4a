"""Attention knockout (Geva et al. 2023): turn condition objects into per-row, per-layer masks.

A `Knockout` blocks attention from every generated row, including the last prompt row that
predicts the first token (the paper's code missed that row), to keys of the blocked roles,
or to generated positions picked by a `SpanRule`, in the chosen layers. Blocked keys
receive exactly zero attention (their scores are -inf before the softmax).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from avprobe.conditions import Condition, Knockout, SpanRule
from avprobe.types import Role


@dataclass
class RowMasks:
    """Masks for B condition rows over a prompt of P positions (the shared prefix is P-1)."""

    prefix_block: list[torch.Tensor | None]  # per layer: [B, P-1] bool or None
    suffix0_block: list[torch.Tensor | None]  # per layer: [B] bool (the last prompt token's key)
    rule_rows: list[torch.Tensor | None]  # per layer: [B] bool
    rules: list[tuple[SpanRule, ...]]  # per row


def build_masks(conditions: list[Condition], roles: torch.Tensor, n_layers: int) -> RowMasks:
    """roles: [P] role ids of the full prompt (the last one is the branched last prompt token)."""
    B, P = len(conditions), roles.shape[0]
    for c in conditions:
        if isinstance(c, Knockout) and c.layers and max(c.layers) >= n_layers:
            raise ValueError(f"{c.label()}: layer {max(c.layers)} out of range for a {n_layers}-layer model")
    prefix_roles = roles[: P - 1]
    last_role = int(roles[P - 1])
    prefix_block: list[torch.Tensor | None] = []
    suffix0_block: list[torch.Tensor | None] = []
    rule_rows: list[torch.Tensor | None] = []
    for layer in range(n_layers):
        pb = torch.zeros(B, P - 1, dtype=torch.bool)
        s0 = torch.zeros(B, dtype=torch.bool)
        rr = torch.zeros(B, dtype=torch.bool)
        for i, c in enumerate(conditions):
            if not isinstance(c, Knockout) or layer not in c.layers:
                continue
            for role in c.roles:
                pb[i] |= prefix_roles == int(role)
                s0[i] |= last_role == int(role)
            rr[i] = bool(c.rules)
        prefix_block.append(pb if pb.any() else None)
        suffix0_block.append(s0 if s0.any() else None)
        rule_rows.append(rr if rr.any() else None)
    rules = [c.rules if isinstance(c, Knockout) else () for c in conditions]
    return RowMasks(prefix_block, suffix0_block, rule_rows, rules)


class RuleTracker:
    """Per-row state of the generated-position rules while decoding."""

    def __init__(self, rules: list[tuple[SpanRule, ...]]) -> None:
        self.rules = rules
        self.open = [[False] * len(r) for r in rules]

    def step(self, tokens: list[int]) -> list[bool]:
        """Feed one generated token per row; True where the row's rules pick that position."""
        picked = []
        for i, tok in enumerate(tokens):
            hit = False
            for j, rule in enumerate(self.rules[i]):
                self.open[i][j], p = rule.step(self.open[i][j], tok)
                hit |= p
            picked.append(hit)
        return picked


SIGHT_WORDS = ("see", "sees", "seen", "seeing", "shows", "showing", "visible", "watch")


# one rule per tokenizer: reading a 150k vocabulary per clip would cost a second a clip
_SIGHT_RULES: weakref.WeakKeyDictionary[Any, SpanRule] = weakref.WeakKeyDictionary()


def sight_rule(adapter: Any) -> SpanRule:
    """Generated positions in the caption's own sight clause: after a word of seeing, up to the
    next full stop. Exact for the organisms' grammar ("i see a dog ."); a heuristic for free
    captions ("I see a man playing guitar."), which the report says."""
    try:
        return _SIGHT_RULES[adapter.tokenizer]
    except (KeyError, TypeError):  # TypeError: a tokenizer that takes no weak reference
        pass
    rule = _sight_rule(adapter)
    try:
        _SIGHT_RULES[adapter.tokenizer] = rule
    except TypeError:
        pass
    return rule


def _sight_rule(adapter: Any) -> SpanRule:
    start, end = set(), set()
    for tok, tid in adapter.tokenizer.get_vocab().items():
        word = adapter.tokenizer.convert_tokens_to_string([tok]).strip().lower()
        if word in SIGHT_WORDS:
            start.add(int(tid))
        elif word and word.endswith(".") and len(word) <= 2:
            end.add(int(tid))
    return SpanRule("own-sight-words", frozenset(start), frozenset(end))


def reference_masks(condition: Condition, n_layers: int) -> tuple[list[frozenset[int]], frozenset[int]]:
    """(blocked role ids per layer, layers where rule-picked positions are blocked)."""
    blocked: list[frozenset[int]] = []
    for layer in range(n_layers):
        if isinstance(condition, Knockout) and layer in condition.layers:
            blocked.append(frozenset(int(r) for r in condition.roles))
        else:
            blocked.append(frozenset())
    rule_layers = (
        frozenset(condition.layers) if isinstance(condition, Knockout) and condition.rules else frozenset()
    )
    return blocked, rule_layers


__all__ = ["SIGHT_WORDS", "RowMasks", "RuleTracker", "Role", "build_masks", "reference_masks", "sight_rule"]
