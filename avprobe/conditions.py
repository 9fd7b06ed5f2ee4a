"""Experimental conditions: frozen, hashable, printable; they double as cache keys and labels.

A `Knockout` blocks attention from every generated row (including the last prompt row, which
predicts the first token) to a set of keys, in a set of layers. Keys are a prompt role
(video, audio, image, query, special) or earlier generated positions picked by a rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from avprobe.types import Role


@dataclass(frozen=True)
class Baseline:
    """No intervention."""

    def label(self) -> str:
        return "baseline"

    def key(self) -> str:
        return "baseline"


@dataclass(frozen=True)
class SpanRule:
    """Generated positions inside a span of the model's own caption.

    A span opens after a token whose id is in `start_ids` and closes at a token in `end_ids`
    (the closing token is not blocked). E.g. start = {"see"}, end = {"."} picks the words of
    "i see a dog ." that name what is seen. For token-level rules leave `end_ids` empty and
    use `token_ids`: every generated position whose token is in the set is picked.
    """

    name: str
    start_ids: frozenset[int] = frozenset()
    end_ids: frozenset[int] = frozenset()
    token_ids: frozenset[int] = frozenset()

    def step(self, open_: bool, token_id: int) -> tuple[bool, bool]:
        """Advance the rule over one generated token: returns (span open after, token picked)."""
        if token_id in self.token_ids:
            return open_, True
        if open_:
            if token_id in self.end_ids:
                return False, False
            return True, True
        return token_id in self.start_ids, False

    @property
    def label(self) -> str:
        return self.name


Blocked = Role | SpanRule


@dataclass(frozen=True)
class Knockout:
    """Block generated rows -> `blocked` keys in `layers` (a sorted tuple of layer indices)."""

    blocked: tuple[Blocked, ...]
    layers: tuple[int, ...]

    def __post_init__(self) -> None:
        blocked = self.blocked if isinstance(self.blocked, tuple) else (self.blocked,)
        blocked = tuple(Role.parse(b) if isinstance(b, str) else b for b in blocked)
        for b in blocked:
            if b == Role.GENERATED:
                raise ValueError("block generated positions with a SpanRule, not the generated role")
        object.__setattr__(self, "blocked", blocked)
        object.__setattr__(self, "layers", tuple(sorted(set(int(i) for i in self.layers))))

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(b for b in self.blocked if isinstance(b, Role))

    @property
    def rules(self) -> tuple[SpanRule, ...]:
        return tuple(b for b in self.blocked if isinstance(b, SpanRule))

    def label(self) -> str:
        what = "+".join(b.label for b in self.blocked)
        if not self.layers:
            return f"G-/->{what}@none"
        lo, hi = self.layers[0], self.layers[-1]
        span = f"{lo}-{hi}" if self.layers == tuple(range(lo, hi + 1)) else ",".join(map(str, self.layers))
        return f"G-/->{what}@L{span}"

    def key(self) -> str:
        parts = []
        for b in self.blocked:
            if isinstance(b, Role):
                parts.append(b.label)
            else:
                parts.append(
                    f"{b.name}[{sorted(b.start_ids)}|{sorted(b.end_ids)}|{sorted(b.token_ids)}]"
                )
        return f"ko:{'+'.join(parts)}:{','.join(map(str, self.layers))}"


Condition = Baseline | Knockout


def window(center: int, k: int, n_layers: int) -> tuple[int, ...]:
    """Geva et al. (2023) window of k layers centred on `center`, clipped to the model."""
    lo = max(0, center - k // 2)
    hi = min(n_layers, center - (-k // 2))
    return tuple(range(lo, hi))


def sweep(blocked: Blocked | tuple[Blocked, ...], n_layers: int, k: int) -> list[Knockout]:
    """One knockout per layer centre, each over a window of k layers (the figure's x axis)."""
    blocked = blocked if isinstance(blocked, tuple) else (blocked,)
    return [Knockout(blocked=blocked, layers=window(c, k, n_layers)) for c in range(n_layers)]


def band(lo_frac: float, hi_frac: float, n_layers: int) -> tuple[int, ...]:
    """Layers in a depth band given as fractions of depth, e.g. (0.42, 0.83) of 36 = 15..29."""
    lo = int(round(lo_frac * n_layers))
    hi = max(lo + 1, int(round(hi_frac * n_layers)))
    return tuple(range(lo, min(hi, n_layers)))
