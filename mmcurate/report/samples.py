"""The shown rows' details: uid and every score from the score files, captions from the
DataComp metadata or the scored store, and thumbnails fetched by uid from the shards, each
image decoded and re-encoded (never passed through), without extracting anything to disk."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmcurate.curate.pool import Pool, is_metadata
from mmcurate.data.atomic import read_json_dict
from mmcurate.data.shards import iter_samples, shard_items
from mmcurate.errors import ShardError

CAPTION_COLUMNS = ("caption", "text")
URL_COLUMN = "url"


def row_details(pool: Pool, rows: np.ndarray, columns: Sequence[str]) -> dict[int, dict]:
    """For each row: its stem, uid, the shown columns' scores and (metadata files) caption and URL;
    only the files holding a row are read, each once."""
    import pyarrow.parquet as pq

    rows = np.unique(rows)
    out: dict[int, dict] = {}
    files = np.searchsorted(pool.offsets, rows, side="right") - 1
    for i in np.unique(files):
        names = pq.read_schema(pool.paths[i]).names
        caption = next((c for c in CAPTION_COLUMNS if c in names), None)
        url = URL_COLUMN if URL_COLUMN in names else None
        wanted = ["uid", *columns] + [c for c in (caption, url) if c]
        local = rows[files == i] - int(pool.offsets[i])
        table = pool._table(int(i), wanted).take(local).to_pydict()
        for j, row in enumerate(local):
            out[int(row) + int(pool.offsets[i])] = {
                "stem": pool.stems[i],
                "uid": table["uid"][j],
                "scores": {c: table[c][j] for c in columns},
                "caption": table[caption][j] if caption else None,
                "url": table[url][j] if url else None,
            }
    return out


def store_of(scores_dir: str | Path, stem: str) -> Path | None:
    """The store a stem was scored from, as its done marker records it (None: unknown)."""
    marker = read_json_dict(Path(scores_dir) / f"{stem}.done.json") or {}
    store = (marker.get("config") or {}).get("store")
    return Path(store) if isinstance(store, str) and Path(store).is_dir() else None


def store_captions(scores_dir: str | Path, pool: Pool, details: dict[int, dict]) -> int:
    """Fill missing captions from the scored store's metadata; returns how many were found."""
    import pyarrow.parquet as pq

    found = 0
    by_stem: dict[str, list[dict]] = {}
    for d in details.values():
        if d["caption"] is None and not is_metadata(pool.paths[0]):
            by_stem.setdefault(d["stem"], []).append(d)
    for stem, entries in by_stem.items():
        store = store_of(scores_dir, stem)
        path = store / f"{stem}.parquet" if store else None
        if path is None or not path.is_file():
            continue
        try:
            names = pq.read_schema(path).names
            column = next((c for c in CAPTION_COLUMNS if c in names), None)
            if column is None:
                continue
            table = pq.read_table(path, columns=["uid", column]).to_pydict()
        except Exception as exc:
            warnings.warn(f"captions of {stem} not read from {path}: {exc}", stacklevel=2)
            continue
        captions = dict(zip(table["uid"], table[column]))
        for d in entries:
            if captions.get(d["uid"]) is not None:
                d["caption"] = captions[d["uid"]]
                found += 1
    return found


def thumbnail(data: bytes | None, size: int) -> tuple[bytes, str] | None:
    """An image re-encoded as a small PNG (small sources) or JPEG, with its MIME type; None
    when it does not decode (or would decompress to an unreasonable size)."""
    from PIL import Image

    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (size, size))
                small = im.convert("RGB")
        small.thumbnail((size, size))
        buf = io.BytesIO()
        if max(small.size) <= 64:
            small.save(buf, "PNG")
            return buf.getvalue(), "image/png"
        small.save(buf, "JPEG", quality=85)
        return buf.getvalue(), "image/jpeg"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning):
        return None


def fetch_from_shards(
    sources: Sequence[str], wanted: dict[str, set[str]], size: int
) -> tuple[dict[str, dict], list[str]]:
    """Thumbnails and captions of the wanted uids ({stem: uids}): the shards named like a
    wanted stem are read first, the others only while uids are still missing; one pass per
    shard at most, stopping once it has given what it holds. Returns (by uid, problems)."""
    items = shard_items(sources)
    missing = {u for uids in wanted.values() for u in uids}
    items.sort(key=lambda item: item.name not in wanted)
    found: dict[str, dict] = {}
    problems: list[str] = []
    for item in items:
        if not missing:
            break
        own = wanted.get(item.name, set()) & missing
        if item.name in wanted and not own:
            continue
        try:
            for sample in iter_samples(item.url):
                uid = sample["uid"]
                if uid in missing:
                    missing.discard(uid)
                    own.discard(uid)
                    found[uid] = {
                        "caption": sample["caption"],
                        "thumb": thumbnail(sample["image"], size),
                        "url": sample["url"],
                        "key": sample["key"],
                    }
                if not missing or (item.name in wanted and not own):
                    break
        except ShardError as exc:
            problems.append(str(exc))
    return found, problems
