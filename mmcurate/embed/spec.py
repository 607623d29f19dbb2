"""Encoder spec strings (SPEC §3): `kind:name[/pretrained][@checkpoint]`."""

from __future__ import annotations

from dataclasses import dataclass

from mmcurate.errors import UsageError

KINDS = ("open_clip", "hf-clip", "timm", "hf-text")
TINY_NAMES = {"open_clip": "mmc-tiny", "timm": "mmc-tiny", "hf-text": "mmc-tiny-bert"}


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed encoder spec."""

    kind: str
    name: str
    pretrained: str | None = None
    checkpoint: str | None = None

    @property
    def is_tiny(self) -> bool:
        """True for the tiny built-in configs (random init unless a checkpoint is given)."""
        return TINY_NAMES.get(self.kind) == self.name


def parse_spec(spec: str) -> EncoderSpec:
    """Parse a spec string; a malformed one is refused in one line naming the problem."""
    if not isinstance(spec, str) or ":" not in spec:
        raise UsageError(
            f"bad encoder spec {spec!r}: expected KIND:NAME with KIND one of {', '.join(KINDS)}"
        )
    kind, rest = spec.split(":", 1)
    if kind not in KINDS:
        raise UsageError(
            f"bad encoder spec {spec!r}: unknown kind {kind!r} (use {', '.join(KINDS)})"
        )
    checkpoint = None
    if "@" in rest:
        rest, checkpoint = rest.split("@", 1)
        if not checkpoint:
            raise UsageError(f"bad encoder spec {spec!r}: empty checkpoint path after '@'")
    pretrained = None
    if kind == "open_clip" and "/" in rest:
        rest, pretrained = rest.split("/", 1)
        if checkpoint:
            raise UsageError(
                f"bad encoder spec {spec!r}: give a pretrained tag or @checkpoint, not both"
            )
    if not rest:
        raise UsageError(f"bad encoder spec {spec!r}: missing model name")
    return EncoderSpec(kind, rest, pretrained, checkpoint)
