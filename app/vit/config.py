"""``CompressionConfig``: which blocks use static attention and where the token count shrinks.

A config is stored in a model's manifest and is all the builder needs (with the dense
architecture name) to rebuild the compressed network before loading its weights.
The compact text form used on the command line is ``static=0-2;tokens=99@3,50@6,26@9``:
blocks 0, 1, 2 get static attention; before block 3 the sequence becomes 99 tokens
(CLS + 98), before block 6 50 tokens, before block 9 26 tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TokenStage(BaseModel):
    """Before block ``layer`` the sequence is aggregated to ``tokens`` tokens (CLS included)."""

    model_config = ConfigDict(frozen=True)

    layer: int = Field(ge=1)
    tokens: int = Field(ge=2)


class CompressionConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    family: Literal["glad"] = "glad"
    static_layers: tuple[int, ...] = ()
    token_schedule: tuple[TokenStage, ...] = ()

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
        if (
            self.token_schedule
            and self.static_layers
            and max(self.static_layers) >= self.token_schedule[0].layer
        ):
            raise ValueError("static layers must come before the first token reduction")
        return self

    @classmethod
    def parse(cls, text: str) -> CompressionConfig:
        """Parse ``static=0-2;tokens=99@3,50@6`` (either part optional, ``static=0,1`` too)."""
        static: list[int] = []
        stages: list[TokenStage] = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, _, value = part.partition("=")
            key = key.strip()
            if key == "static":
                for item in filter(None, value.split(",")):
                    lo, _, hi = item.partition("-")
                    static.extend(range(int(lo), int(hi or lo) + 1))
            elif key == "tokens":
                for item in filter(None, value.split(",")):
                    n, _, layer = item.partition("@")
                    stages.append(TokenStage(layer=int(layer), tokens=int(n)))
            else:
                raise ValueError(f"unknown compression key {key!r} (use static=..., tokens=...)")
        return cls(static_layers=tuple(static), token_schedule=tuple(stages))

    def __str__(self) -> str:
        parts = []
        if self.static_layers:
            parts.append("static=" + ",".join(map(str, self.static_layers)))
        if self.token_schedule:
            parts.append("tokens=" + ",".join(f"{s.tokens}@{s.layer}" for s in self.token_schedule))
        return ";".join(parts) or "dense"

    def tokens_per_block(self, depth: int, num_tokens: int) -> list[int]:
        """Sequence length each block sees, e.g. [197, 197, 197, 99, ...]."""
        out, current = [], num_tokens
        stages = {s.layer: s.tokens for s in self.token_schedule}
        for i in range(depth):
            current = stages.get(i, current)
            out.append(current)
        return out
