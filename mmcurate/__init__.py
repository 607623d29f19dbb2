"""mmcurate: score, select and distill image-text corpora."""

__version__ = "0.1.0"
