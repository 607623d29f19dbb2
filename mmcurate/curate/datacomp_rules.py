"""DataComp's baseline filters as `select` rules (`baselines/apply_filter.py`, SPEC §5), and the
caption and image-size columns they read, which need no score run.

Derived columns (usable in any threshold rule, e.g. `--keep caption_words>2`):
- `caption_words` = `len(text.split())`, `caption_chars` = `len(text)` (code points);
- `min_side` = min(original_width, original_height), `aspect_ratio` = max / min (float64).

Named rules (`--keep datacomp:NAME`), each a mask over the rows still alive:
- `basic`: lang == en, caption_words > 2, caption_chars > 5, min_side >= 200, aspect_ratio <= 3;
- `text_based`: lang == en and a word whose first WordNet synset is an ImageNet-21k class;
- `laion2b`: lang_cld3 == en and clip_b32_similarity_score >= 0.28;
- `image_based`: `curate.image_based` (caption filter, then shared nearest centroids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mmcurate.curate.lang import decode_captions
from mmcurate.errors import UsageError

TEXT = ("text", "caption")
WIDTH = ("original_width", "width")
HEIGHT = ("original_height", "height")
B32 = "clip_b32_similarity_score"
LAION_THRESHOLD = 0.28
MIN_SIDE = 200
MAX_ASPECT = 3.0
LANG_HINT = "run `mmcurate score STORE --out SCORES --metric {metric}` first"
SIZE_HINT = "DataComp's metadata has it; give the metadata directory as --store"
# fastText's tokenizer splits on these bytes, and counts each newline as one more token (</s>).
_FASTTEXT_SPACE = str.maketrans({c: " " for c in "\n\r\t\v\f\0"})


@dataclass(frozen=True)
class Need:
    """A column a rule reads: the first of `names` present, and how to get it when none is."""

    names: tuple[str, ...]
    hint: str


LANG_NEED = Need(("lang",), LANG_HINT.format(metric="lang"))
CLD3_NEED = Need(("lang_cld3",), LANG_HINT.format(metric="lang_cld3"))
TEXT_NEED = Need(TEXT, "captions are read from the store's parquet: give --store")
SIZE_NEEDS = (Need(WIDTH, SIZE_HINT), Need(HEIGHT, SIZE_HINT))
DERIVED = {
    "caption_words": (TEXT_NEED,),
    "caption_chars": (TEXT_NEED,),
    "min_side": SIZE_NEEDS,
    "aspect_ratio": SIZE_NEEDS,
}
NAMED_NEEDS = {
    "datacomp:basic": (LANG_NEED, TEXT_NEED, *SIZE_NEEDS),
    "datacomp:text_based": (LANG_NEED, TEXT_NEED),
    "datacomp:laion2b": (CLD3_NEED, Need((B32,), "DataComp's metadata has it: give --store")),
    "datacomp:image_based": (LANG_NEED, TEXT_NEED),
}
Columns = dict[str, str]  # logical name (first of a Need's names) -> the column found


def is_string(kind) -> bool:
    """Whether an Arrow type is a string type."""
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def equals(column, value: str) -> np.ndarray:
    """column == value per row (a null is False); a column of non-strings is a UsageError."""
    import pyarrow.compute as pc

    if not is_string(column.type):
        raise UsageError(f"=={value} compares strings, but the column holds {column.type}")
    return pc.equal(column, value).fill_null(False).to_numpy(zero_copy_only=False)


def word_counts(texts: Sequence[str | None]) -> np.ndarray:
    """`len(text.split())` per caption (0 when missing)."""
    return np.array([len(t.split()) if t else 0 for t in texts], dtype=np.int64)


def char_counts(texts: Sequence[str | None]) -> np.ndarray:
    """`len(text)` per caption, in code points (0 when missing)."""
    return np.array([len(t) if t else 0 for t in texts], dtype=np.int64)


def _fasttext_tokens(text: str) -> int:
    return sum(1 for w in text.translate(_FASTTEXT_SPACE).split(" ") if w) + text.count("\n")


def fasttext_token_counts(texts: Sequence[str | None]) -> np.ndarray:
    """`len(fasttext.tokenize(text))`: words split on space, newline, CR, tab, VT, FF and NUL,
    plus one end-of-line token per newline."""
    return np.array([_fasttext_tokens(t) if t else 0 for t in texts], dtype=np.int64)


def sides(width, height) -> tuple[np.ndarray, np.ndarray]:
    """(shorter side, longer / shorter) per row, float64; a null size gives NaN (never kept)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    w, h = (
        pc.cast(c, pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        for c in (width, height)
    )
    low, high = np.minimum(w, h), np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        return low, high / low


def derived_values(name: str, table, cols: Columns) -> np.ndarray:
    """A derived column (DERIVED) of one file's table."""
    if name in ("caption_words", "caption_chars"):
        texts = decode_captions(table.column(cols[TEXT[0]]))
        counts = word_counts if name == "caption_words" else char_counts
        return counts(texts).astype(np.float64)
    low, ratio = sides(table.column(cols[WIDTH[0]]), table.column(cols[HEIGHT[0]]))
    return low if name == "min_side" else ratio


def basic_mask(table, cols: Columns) -> np.ndarray:
    """DataComp's basic filter on one file's rows."""
    texts = decode_captions(table.column(cols[TEXT[0]]))
    low, ratio = sides(table.column(cols[WIDTH[0]]), table.column(cols[HEIGHT[0]]))
    return (
        equals(table.column(cols["lang"]), "en")
        & (word_counts(texts) > 2)
        & (char_counts(texts) > 5)
        & (low >= MIN_SIDE)
        & (ratio <= MAX_ASPECT)
    )


def text_based_mask(table, cols: Columns, matcher: Callable) -> np.ndarray:
    """DataComp's text-based filter on one file's rows (`matcher`: `in21k.EntityMatcher`)."""
    english = equals(table.column(cols["lang"]), "en")
    texts = decode_captions(table.column(cols[TEXT[0]]))
    hits = np.zeros(len(texts), dtype=bool)
    rows = np.flatnonzero(english)
    hits[rows] = matcher([texts[r] for r in rows])
    return english & hits


def laion2b_mask(table, cols: Columns) -> np.ndarray:
    """DataComp's LAION-2B reproduction on one file's rows, compared at the column's dtype."""
    score = table.column(cols[B32]).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        above = score >= score.dtype.type(LAION_THRESHOLD)
    return equals(table.column(cols["lang_cld3"]), "en") & above


def caption_filter_mask(table, cols: Columns) -> np.ndarray:
    """The image-based baseline's caption filter: fastText en, more than one fastText token,
    more than 5 characters."""
    texts = decode_captions(table.column(cols[TEXT[0]]))
    return (
        equals(table.column(cols["lang"]), "en")
        & (fasttext_token_counts(texts) > 1)
        & (char_counts(texts) > 5)
    )
