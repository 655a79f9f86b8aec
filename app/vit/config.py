"""``CompressionConfig``: which blocks use static attention, where the token count shrinks
(GLAD aggregation) and how many tokens each block merges (ToMe).

A config is stored in a model's manifest and is all the builder needs (with the dense
architecture name) to rebuild the compressed network before loading its weights.
The compact text form used on the command line is ``;``-separated parts, each optional:

* ``static=0-2`` (or ``static=0,1,2``): blocks 0, 1, 2 get static attention.
* ``tokens=99@3,50@6,26@9``: before block 3 the sequence becomes 99 tokens (CLS + 98),
  before block 6 50 tokens, before block 9 26 tokens.
* ``merge=13``: every block merges 13 tokens; ``merge=8@0-5,16@6-11`` blocks 0-5 merge 8
  and blocks 6-11 merge 16; ``merge=16@2-`` blocks 2 to the last merge 16; ``4@3`` is
  block 3 alone. A block merges after its attention, so it still attends over all of its
  input tokens.

``static=0-1;merge=16@2-11`` is a hybrid: static attention early, merging later.
``proportional=off`` makes the blocks after a merge attend plainly instead of adding
``log(size)`` to their logits (ToMe's proportional attention, the default): with a few large
merges (``merge=98@1,49@4,24@7``, the token counts of the GLAD pyramid) plain attention
agreed better with the dense model, and only the merging blocks change.
``dense`` (or the empty text) is no compression. ``str(cfg)`` gives the canonical text
and ``CompressionConfig.parse(str(cfg)) == cfg``.

``family`` is derived from the content, never chosen: ``glad`` (static and/or tokens,
also the empty config, as in manifests written before merging existed), ``merge``
(merging only) or ``hybrid`` (static attention and merging). A stored family that
disagrees with the content is rejected, so a manifest cannot mislabel its model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import groupby
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Family = Literal["glad", "merge", "hybrid"]
_MERGE_ITEM = re.compile(r"^(\d+)(?:@(\d+)(?:(-)(\d*))?)?$")


def max_merge(num_tokens: int) -> int:
    """Most tokens one block can merge: bipartite matching pairs set A (even positions,
    CLS included) with set B (odd), and CLS is never merged, so half the non-CLS tokens."""
    return (num_tokens - 1) // 2


class TokenStage(BaseModel):
    """Before block ``layer`` the sequence is aggregated to ``tokens`` tokens (CLS included)."""

    model_config = ConfigDict(frozen=True)

    layer: int = Field(ge=1)
    tokens: int = Field(ge=2)


class MergeSpan(BaseModel):
    """Blocks ``first`` to ``last`` (inclusive; None: to the last block) each merge ``r``.

    Spans rather than one r per block, so ``merge=13`` means every block of any depth.
    A span of r = 0 merges nothing and is dropped from a config.
    """

    model_config = ConfigDict(frozen=True)

    r: int = Field(ge=0)
    first: int = Field(0, ge=0)
    last: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> MergeSpan:
        if self.last is not None and self.last < self.first:
            raise ValueError(f"merge span {self.first}-{self.last} ends before it starts")
        return self

    def __str__(self) -> str:
        if self.last is None:
            return f"{self.r}" if self.first == 0 else f"{self.r}@{self.first}-"
        if self.last == self.first:
            return f"{self.r}@{self.first}"
        return f"{self.r}@{self.first}-{self.last}"


def merge_spans(r_per_block: Sequence[int]) -> tuple[MergeSpan, ...]:
    """Spans for an explicit per-block schedule (e.g. :func:`decreasing_r`); zeros skipped."""
    spans, block = [], 0
    for r, run in groupby(r_per_block):
        length = len(list(run))
        if r:
            spans.append(MergeSpan(r=r, first=block, last=block + length - 1))
        block += length
    return tuple(spans)


def decreasing_r(r: int, depth: int) -> list[int]:
    """ToMe's decreasing schedule (inflection -1): from 2r in block 0 linearly down to 0,
    about ``r`` per block on average; early merges save the most compute."""
    if depth == 1:
        return [r]
    step = 2 * r / (depth - 1)
    return [int(2 * r - step * i) for i in range(depth)]


def r_for_token_targets(num_tokens: int, targets: Sequence[int]) -> list[int]:
    """Per-block r reaching ``targets[i]`` tokens after block i (non-increasing counts)."""
    counts = [num_tokens, *targets]
    r = [a - b for a, b in zip(counts, counts[1:], strict=False)]
    if any(x < 0 for x in r):
        raise ValueError(f"token targets {list(targets)} increase somewhere")
    return r


class CompressionConfig(BaseModel):
    """What to compress, by block; the text form is in the module docstring."""

    model_config = ConfigDict(frozen=True)

    family: Family = "glad"
    static_layers: tuple[int, ...] = ()
    token_schedule: tuple[TokenStage, ...] = ()
    merge_schedule: tuple[MergeSpan, ...] = ()
    proportional_attention: bool = True

    @field_validator("merge_schedule")
    @classmethod
    def _canonical_spans(cls, spans: tuple[MergeSpan, ...]) -> tuple[MergeSpan, ...]:
        """Ordered and disjoint; r = 0 dropped and touching spans of equal r joined, so that
        equal schedules compare equal and print the same."""
        out: list[MergeSpan] = []
        for span in (s for s in spans if s.r):
            if out and (out[-1].last is None or span.first <= out[-1].last):
                raise ValueError(f"merge spans {out[-1]} and {span} overlap or are out of order")
            if out and out[-1].r == span.r and out[-1].last == span.first - 1:
                span = MergeSpan(r=span.r, first=out.pop().first, last=span.last)
            out.append(span)
        return tuple(out)

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        if list(self.static_layers) != sorted(set(self.static_layers)):
            raise ValueError("static_layers must be strictly increasing")
        layers = [s.layer for s in self.token_schedule]
        tokens = [s.tokens for s in self.token_schedule]
        if layers != sorted(set(layers)):
            raise ValueError("token_schedule layers must be strictly increasing")
        if any(b >= a for a, b in zip(tokens, tokens[1:], strict=False)):
            raise ValueError("token_schedule token counts must strictly decrease")
        if not self.proportional_attention and not self.merge_schedule:
            raise ValueError("proportional=off applies to merging only: add merge=...")
        if self.token_schedule and self.merge_schedule:
            raise ValueError(
                "tokens=... and merge=... cannot be combined: aggregation maps assume the "
                "patch grid and equal token sizes, which merging does not keep"
            )
        first = self._first_reduction()
        if first is not None and any(i >= first for i in self.static_layers):
            # A static matrix is sized for one token count, and has no keys to merge by.
            raise ValueError(
                f"static layers must come before the first token reduction (block {first})"
            )
        family = self._derived_family()
        if "family" in self.model_fields_set and self.family != family:
            raise ValueError(f"family {self.family!r} does not match the config ({family!r})")
        object.__setattr__(self, "family", family)  # frozen: set once, while validating
        return self

    @property
    def training_free(self) -> bool:
        """Nothing to calibrate or train: the dense weights alone make the model (merging)."""
        return not self.static_layers and not self.token_schedule

    def _derived_family(self) -> Family:
        if not self.merge_schedule:
            return "glad"
        return "hybrid" if self.static_layers else "merge"

    def _first_reduction(self) -> int | None:
        """Index of the first block that sees (token pyramid) or makes (merging) fewer tokens."""
        starts = [s.layer for s in self.token_schedule[:1]] + [
            s.first for s in self.merge_schedule[:1]
        ]
        return min(starts, default=None)

    @classmethod
    def parse(cls, text: str) -> CompressionConfig:
        """Parse the text form (module docstring), e.g. ``static=0-1;merge=8@2-5,16@6-11``."""
        if text.strip() == "dense":
            return cls()
        static: list[int] = []
        stages: list[TokenStage] = []
        spans: list[MergeSpan] = []
        proportional = True
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, _, value = part.partition("=")
            key = key.strip()
            items = [item.strip() for item in value.split(",") if item.strip()]
            if key == "static":
                for item in items:
                    lo, _, hi = item.partition("-")
                    static.extend(range(int(lo), int(hi or lo) + 1))
            elif key == "tokens":
                for item in items:
                    n, _, layer = item.partition("@")
                    stages.append(TokenStage(layer=int(layer), tokens=int(n)))
            elif key == "merge":
                spans.extend(map(_parse_span, items))
            elif key == "proportional":
                flag = value.strip()
                if flag not in ("on", "off"):
                    raise ValueError(f"proportional={flag!r}: use on or off")
                proportional = flag == "on"
            else:
                raise ValueError(
                    f"unknown compression key {key!r} "
                    "(use static=..., tokens=..., merge=..., proportional=...)"
                )
        return cls(
            static_layers=tuple(static),
            token_schedule=tuple(stages),
            merge_schedule=tuple(spans),
            proportional_attention=proportional,
        )

    def __str__(self) -> str:
        parts = []
        if self.static_layers:
            parts.append("static=" + ",".join(map(str, self.static_layers)))
        if self.token_schedule:
            parts.append("tokens=" + ",".join(f"{s.tokens}@{s.layer}" for s in self.token_schedule))
        if self.merge_schedule:
            parts.append("merge=" + ",".join(map(str, self.merge_schedule)))
        if not self.proportional_attention:
            parts.append("proportional=off")
        return ";".join(parts) or "dense"

    def merge_r(self, depth: int) -> list[int]:
        """Tokens merged in each block of a ``depth``-block model (0: none)."""
        r = [0] * depth
        for span in self.merge_schedule:
            last = depth - 1 if span.last is None else span.last
            if last >= depth:
                raise ValueError(f"{self}: merge span {span} goes past the last block {depth - 1}")
            r[span.first : last + 1] = [span.r] * (last + 1 - span.first)
        return r

    def tokens_per_block(self, depth: int, num_tokens: int) -> list[int]:
        """Sequence length each block takes in, e.g. [197, 197, 197, 99, ...]; a merging
        block gives ``r`` fewer to the next. Raises when a block cannot merge its ``r``."""
        return self._token_counts(depth, num_tokens)[:-1]

    def output_tokens(self, depth: int, num_tokens: int) -> int:
        """Sequence length after the last block (the final norm's and the head's input)."""
        return self._token_counts(depth, num_tokens)[-1]

    def _token_counts(self, depth: int, num_tokens: int) -> list[int]:
        """Input length of every block, then the output length of the last one."""
        counts, current = [], num_tokens
        stages = {s.layer: s.tokens for s in self.token_schedule}
        for i, r in enumerate(self.merge_r(depth)):
            current = stages.get(i, current)
            counts.append(current)
            if r > max_merge(current):
                raise ValueError(
                    f"{self}: block {i} cannot merge {r} of its {current} tokens; at most "
                    f"{max_merge(current)} (half the non-CLS tokens), which leaves CLS + 1 "
                    f"or more"
                )
            current -= r
        return [*counts, current]


def _parse_span(item: str) -> MergeSpan:
    """``R`` (all blocks), ``R@A`` (block A), ``R@A-B`` (A to B), ``R@A-`` (A to the last)."""
    match = _MERGE_ITEM.match(item)
    if match is None:
        raise ValueError(f"bad merge item {item!r} (use R, R@A, R@A-B or R@A-)")
    r, first, dash, last = match.groups()
    if first is None:
        return MergeSpan(r=int(r))
    if dash is None:
        return MergeSpan(r=int(r), first=int(first), last=int(first))
    return MergeSpan(r=int(r), first=int(first), last=int(last) if last else None)
