"""Stage hashes and markers: what decides whether a pipeline stage is done or must run again.

A stage's hash covers its effective settings, the global seed, the hashes of the stages it
reads from, and the size and mtime of every outside file it reads. A finished stage writes
`<out>/<stage>.stage.json` with that hash; a running one `<out>/<stage>.running.json`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from mmcurate.data.atomic import read_json_dict
from mmcurate.data.shards import expand_sources
from mmcurate.pipeline.config import Plan, as_list

MARKER_SUFFIX = ".stage.json"
RUNNING_SUFFIX = ".running.json"


def _file_print(path: str) -> list:
    if "://" in path:
        return [path]
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        digest = hashlib.sha256()
        for f in files:
            st = f.stat()
            digest.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return [str(p.resolve()), len(files), digest.hexdigest()]
    return [str(p), "missing"]


def _sources_print(sources: Sequence[str]) -> list:
    return [_file_print(u) for u in expand_sources(list(sources))]


def _data_print(path: str) -> list:
    """A dataset: a Karpathy JSON file, or shards."""
    return [_file_print(path)] if str(path).endswith(".json") else _sources_print([path])


def _spec_files(*specs: str | None) -> list[str]:
    return [s.split("@", 1)[1] for s in specs if s and "@" in s and "/" in s.split("@", 1)[1]]


def external_inputs(plan: Plan, stage: str) -> list:
    """Size and mtime of every file a stage reads from outside the pipeline's own outputs."""
    c = plan.stages[stage]
    prints: list = []
    if stage == "embed":
        prints += _sources_print(as_list(c["src"]))
        if c["target_src"]:
            prints += _sources_print(as_list(c["target_src"]))
        prints += [_file_print(f) for f in _spec_files(c["model"], c["text_model"])]
    elif stage == "score":
        for key in ("store", "target"):
            prints += [_file_print(p) for p in as_list(c[key])]
    elif stage == "select":
        for key in ("scores", "union", "intersect"):
            prints += [_file_print(p) for p in as_list(c[key])]
    elif stage == "reshard":
        if c["src"]:
            prints += _sources_print(as_list(c["src"]))
        if c["subset"]:
            prints.append(_file_print(c["subset"]))
    elif stage in ("buffer", "distill"):
        for key in ("data", "buffers"):
            if c.get(key):
                prints += _data_print(c[key])
        prints += [_file_print(f) for f in _spec_files(c.get("image_encoder"))]
    elif stage == "evaluate":
        for key in ("artifact", "train", "test"):
            if c[key]:
                prints += _data_print(c[key])
    return prints


def stage_hash(plan: Plan, stage: str, upstream_hashes: dict[str, str]) -> str:
    """sha256 over the stage's settings, the seed, its producers' hashes and outside inputs."""
    doc = {
        "stage": stage,
        "config": plan.stages[stage],
        "seed": plan.seed,
        "upstream": upstream_hashes,
        "inputs": external_inputs(plan, stage),
    }
    blob = json.dumps(doc, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def marker_path(out: Path, stage: str, suffix: str = MARKER_SUFFIX) -> Path:
    """The done (or running) marker of a stage."""
    return out / f"{stage}{suffix}"


def read_marker(out: Path, stage: str, suffix: str = MARKER_SUFFIX) -> dict | None:
    """A stage's done (or running) marker, or None when absent or unreadable."""
    return read_json_dict(marker_path(out, stage, suffix))
