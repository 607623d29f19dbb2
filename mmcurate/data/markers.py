"""What a done marker vouches for: the size and xxh3-64 checksum of each file it finished.

A marker (a stem's `done.json`, a manifest) holds `"files": {name: {"size": n, "xxh3": hex}}`,
names relative to the marker's directory. Readers check sizes on every open (a `stat`, so
cheap); `is_done` checks sizes too, so a truncated, grown or deleted file is redone by the
next run. Checksums are read only by `verify_dir` (`mmcurate verify`), which reads every byte:
with `invalidate`, it removes the markers of the items that fail, so a re-run of the stage
redoes exactly those items.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import xxhash

from mmcurate.data.atomic import read_json_dict, write_json_atomic
from mmcurate.errors import ShardError

FILES = "files"
CHUNK = 1 << 22


def checksum(path: str | os.PathLike) -> str:
    """The xxh3-64 checksum of a file, as hex."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def vouch(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> dict[str, dict]:
    """The `files` entry of a marker in `root`: each file's size and checksum."""
    out: dict[str, dict] = {}
    for path in map(Path, paths):
        name = os.path.relpath(path, root)
        out[name] = {"size": path.stat().st_size, "xxh3": checksum(path)}
    return out


def size_problem(root: str | os.PathLike, name: str, record: dict) -> str | None:
    """Why a vouched file is not as its marker says (missing, or its size), or None."""
    path = Path(root) / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    if size != record.get("size"):
        return f"{path}: size {size} bytes, its marker says {record.get('size')}"
    return None


def sizes_ok(marker: dict | None, root: str | os.PathLike) -> bool:
    """True when every file the marker vouches for has its recorded size (a marker without
    records, from an older version, vouches for nothing and passes)."""
    files = (marker or {}).get(FILES) or {}
    return isinstance(files, dict) and not any(
        not isinstance(r, dict) or size_problem(root, n, r) for n, r in files.items()
    )


def check_size(marker: dict | None, root: str | os.PathLike, name: str) -> None:
    """Refuse (ShardError, one line naming the file) a file whose size differs from its marker."""
    record = ((marker or {}).get(FILES) or {}).get(name)
    if isinstance(record, dict):
        problem = size_problem(root, name, record)
        if problem:
            raise ShardError(f"{problem}; run `mmcurate verify` and re-run the stage")


def check_stem_file(root: str | os.PathLike, stem: str, name: str) -> None:
    """Refuse, naming it, a file of `stem` whose size differs from its `<stem>.done.json`."""
    check_size(read_json_dict(Path(root) / f"{stem}.done.json"), root, name)


def problems(marker_path: Path, marker: dict) -> list[str]:
    """Every file a marker vouches for that is missing, resized or has another checksum."""
    root = marker_path.parent
    found = []
    for name, record in sorted((marker.get(FILES) or {}).items()):
        if not isinstance(record, dict):
            found.append(f"{root / name}: unreadable record in {marker_path.name}")
            continue
        problem = size_problem(root, name, record)
        if problem is None and checksum(root / name) != record.get("xxh3"):
            problem = f"{root / name}: checksum differs from its marker"
        if problem:
            found.append(problem)
    return found


def markers_in(root: str | os.PathLike) -> list[Path]:
    """Every JSON file under `root` that vouches for files (done markers, manifests)."""
    found = []
    for path in sorted(Path(root).rglob("*.json")):
        data = read_json_dict(path)
        if data is not None and isinstance(data.get(FILES), dict):
            found.append(path)
    return found


def verify_dir(root: str | os.PathLike, invalidate: bool = False) -> tuple[int, int, list[str]]:
    """Check every marker under `root`: (markers, files checked, problems). With `invalidate`,
    remove each marker with a problem, so the stage redoes its item."""
    checked, found, markers = 0, [], markers_in(root)
    for path in markers:
        marker = read_json_dict(path) or {}
        bad = problems(path, marker)
        checked += len(marker.get(FILES) or {})
        found.extend(bad)
        if bad and invalidate:
            path.unlink(missing_ok=True)
    return len(markers), checked, found


def read_checked(marker_path: Path) -> dict | None:
    """A marker, or None when it is unreadable or a file it vouches for has another size."""
    marker = read_json_dict(marker_path)
    return marker if marker is not None and sizes_ok(marker, marker_path.parent) else None


def marker_of(path: str | os.PathLike) -> Path:
    """The done marker of a single-file item: `expert_000.pt` -> `expert_000.done.json`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.done.json")


def mark_file(path: str | os.PathLike, stats: dict | None = None) -> None:
    """Write the done marker of a single-file item, vouching for the file."""
    path = Path(path)
    write_json_atomic(marker_of(path), {**(stats or {}), FILES: vouch([path], path.parent)})


def file_is_done(path: str | os.PathLike) -> bool:
    """True when a single-file item has its marker and the file its recorded size."""
    marker = read_json_dict(marker_of(path))
    return marker is not None and bool(marker.get(FILES)) and sizes_ok(marker, Path(path).parent)


def check_file(path: str | os.PathLike) -> None:
    """Refuse a single-file item's file whose size differs from its marker (when it has one)."""
    path = Path(path)
    check_size(read_json_dict(marker_of(path)), path.parent, path.name)
