"""DataComp's text-based filter: does a caption hold a word whose first WordNet synset is an
ImageNet-21k class? (`does_contain_text_entity` of DataComp's baselines.)

- The wnids are the list timm ships (`timm/data/_info/imagenet21k_goog_synsets.txt`, the same
  bytes as DataComp's `imagenet21k_wordnet_ids.txt` asset), compared as `int(wnid[1:])`.
- WordNet is NLTK's reader on data found offline: `--wordnet DIR` (an nltk_data root holding
  `corpora/wordnet`), else NLTK's own search path. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmcurate.errors import UsageError

WNIDS = ("data", "_info", "imagenet21k_goog_synsets.txt")
CACHE_WORDS = 1_000_000  # distinct words remembered (web captions have tens of millions)
# DataComp's imagenet21k_wordnet_ids.txt asset (baselines/utils.py), byte for byte.
WNIDS_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
HOW_TO_GET = (
    "datacomp:text_based needs NLTK's WordNet: run `python -m nltk.downloader wordnet` "
    "or give --wordnet DIR (an nltk_data root holding corpora/wordnet)"
)


def in21k_offsets() -> frozenset[int]:
    """The ImageNet-21k synset offsets (`int(wnid[1:])`) from timm's list."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("datacomp:text_based needs timm's ImageNet-21k list: pip install timm")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*WNIDS)
    if not path.is_file():
        raise UsageError(f"timm holds no ImageNet-21k list at {path}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != WNIDS_SHA256:
        warnings.warn(f"{path} differs from DataComp's ImageNet-21k list", stacklevel=2)
    return frozenset(int(w[1:]) for w in data.decode().split() if w)


def _find_root(directory: str | None):
    """WordNet in `directory` (an nltk_data root, as `nltk.downloader -d DIR wordnet` lays it
    out), else on NLTK's search path; the directory joins that path, as NLTK's reader needs."""
    import nltk.data

    if directory is not None:
        base = Path(directory).resolve()
        if not base.is_dir():
            raise UsageError(f"--wordnet directory not found: {directory}")
        if str(base) not in nltk.data.path:
            nltk.data.path.insert(0, str(base))
    for name in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):
        try:
            return nltk.data.find(name, paths=None if directory is None else [str(base)])
        except LookupError:
            continue
    raise UsageError(HOW_TO_GET + ("" if directory is None else f"; none under {directory}"))


def wordnet_reader(directory: str | None = None):
    """NLTK's WordNet reader over offline data, or one UsageError line saying how to get it."""
    try:
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise UsageError("datacomp:text_based needs NLTK: pip install nltk") from None
    root = _find_root(directory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return WordNetCorpusReader(root, None)
    except (OSError, PermissionError, ValueError) as exc:
        raise UsageError(f"unreadable WordNet at {root}: {exc}") from None


class EntityMatcher:
    """`any(wordnet.synsets(w)[0].offset() in offsets for w in text.split())`, each distinct
    word looked up once."""

    def __init__(self, reader, offsets: frozenset[int]) -> None:
        self.reader = reader
        self.offsets = offsets
        self.seen: dict[str, bool] = {}

    def word(self, word: str) -> bool:
        """Whether the word's first synset is an ImageNet-21k class."""
        hit = self.seen.get(word)
        if hit is None:
            if len(self.seen) >= CACHE_WORDS:
                self.seen.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                synsets = self.reader.synsets(word)
            hit = bool(synsets) and synsets[0] is not None and synsets[0].offset() in self.offsets
            self.seen[word] = hit
        return hit

    def __call__(self, texts: Sequence[str | None]) -> np.ndarray:
        """One bool per caption."""
        return np.array([bool(t) and any(self.word(w) for w in t.split()) for t in texts], bool)
