"""The shared embedding layer: one spec string gives a ready, normalised encoder."""

from mmcurate.embed.encoders import (
    DEFAULT_DEVICE,
    Encoder,
    check_device_name,
    load_encoder,
    resolve_device,
)
from mmcurate.embed.spec import EncoderSpec, parse_spec

__all__ = [
    "DEFAULT_DEVICE",
    "Encoder",
    "EncoderSpec",
    "check_device_name",
    "load_encoder",
    "parse_spec",
    "resolve_device",
]
