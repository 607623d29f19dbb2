"""Damaged inputs derived from a good generated corpus, each with its expected outcome.

Shards: good pairs come from `mmcurate.demo.corpus.make_pairs`/`pair_files`; SAMPLE_FAULTS
damage single samples, the samples are written as a webdataset tar, and SHARD_FAULTS may then
damage the tar bytes. Every `Sample` records what SPEC §9 says must happen to it (its uid, its
caption, whether its image is present and decodable), worked out here from how it was built,
never by asking mmcurate.

Stores: `build_stem` writes stems the way `mmcurate embed` does (parquet, npz, done marker)
and applies STORE_FAULTS; every `Stem` records the rows the score stage must keep, the skips it
must count by reason, or that it must fail or be left out.

Sidecars and subset files for `select` are damaged the same way (SIDECAR_FAULTS,
SUBSET_FAULTS).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmcurate.demo.corpus import make_pairs, pair_files

# ------------------------------------------------------------------------------------ shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAYBE = "maybe"  # a randomly damaged image: it may or may not still decode

SAMPLE_FAULTS = (
    "flip_image",
    "truncated_image",
    "not_an_image",
    "zero_image",
    "no_image",
    "no_caption",
    "zero_caption",
    "blank_caption",
    "huge_caption",
    "non_utf8_caption",
    "json_caption",
    "zero_json",
    "bad_json",
    "deep_json",
    "duplicate_key_adjacent",
    "duplicate_key_later",
    "duplicate_json_uid",
    "non_utf8_key",
    "upper_ext",
    "exotic_image",
    "json_only",
    "extra_member",
    "symlink_image",
    "malformed_json_uid",
)
# Member names that could escape the directory a tar is unpacked to: reshard skips and counts
# them as unsafe_name (embed too, once embed/stage.py honours the reader's flag).
NAME_FAULTS = ("parent_key", "absolute_key", "nested_parent_key", "newline_key", "backslash_key")
SHARD_FAULTS = (
    "truncate",
    "empty_tar",
    "zero_bytes",
    "garbage",
    "flip_header",
    "trailing_garbage",
    "trailing_directory",
)
EMBED_REASONS = {
    "missing_image",
    "missing_caption",
    "undecodable_image",
    "duplicate_uid",
    "unsafe_name",
}


@dataclass
class Sample:
    """One sample as written to a tar, with its ground truth."""

    key: bytes
    members: list[tuple[str, bytes]]
    image: str  # "ok", "missing", "undecodable" or MAYBE
    uid_override: str | None = None  # the uid its json member carries
    json_caption: str | None = None  # the caption its json member carries
    faults: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)  # exts written as symlink members

    @property
    def unsafe(self) -> bool:
        """Its key could escape the directory the tar is unpacked to, or splits a name."""
        key = self.clean_key
        return key.startswith("/") or ".." in key.split("/") or "\n" in key or "\\" in key

    @property
    def copy_problem(self) -> str | None:
        """Why reshard must skip it (SPEC §9 plus safe names): an unsafe name, or a link in
        place of its image."""
        if self.unsafe:
            return "unsafe_name"
        return "missing_image" if self.links else None

    @property
    def caption(self) -> str | None:
        """SPEC §2: the txt member (decoded, bad bytes replaced), else the json caption."""
        txt = self.member("txt")
        return txt.decode("utf-8", "replace") if txt is not None else self.json_caption

    @property
    def clean_key(self) -> str:
        """The key as a reader must report it (undecodable bytes replaced)."""
        return self.key.decode("utf-8", "replace")

    def uid(self, stem: str) -> str:
        """SPEC §2: json["uid"] when the sample carries one, else md5("stem/key")."""
        if self.uid_override:
            return self.uid_override
        return hashlib.md5(f"{stem}/{self.clean_key}".encode()).hexdigest()

    def member(self, ext: str) -> bytes | None:
        """The data of the (case-insensitive) member `ext`, if present."""
        for name, data in self.members:
            if name.lower() == ext:
                return data
        return None

    def set_member(self, ext: str, data: bytes | None) -> None:
        """Replace (or with None remove) the member `ext`, keeping member order."""
        if ext == "json":
            self.uid_override = self.json_caption = None
        kept = [(n, d) for n, d in self.members if n.lower() != ext]
        if data is not None:
            at = next((i for i, (n, _) in enumerate(self.members) if n.lower() == ext), len(kept))
            kept.insert(min(at, len(kept)), (ext, data))
        self.members = kept

    def image_ext(self) -> str | None:
        """The ext of the sample's image member."""
        return next((n for n, _ in self.members if n.lower() in IMAGE_EXTS), None)


@dataclass
class Shard:
    """A shard on disk, its samples and what must happen to it: complete, fail or either."""

    stem: str
    path: Path
    samples: list[Sample]
    faults: list[str]
    expect: str  # "complete", "fail" or "either"


def _good_sample(image: np.ndarray, caption: str, index: int, stem: str, fmt: str) -> Sample:
    files = pair_files(image, caption, {"i": index, "url": f"synthetic://{stem}/{index}"}, fmt)
    return Sample(key=f"{index:06d}".encode(), members=list(files.items()), image="ok")


def _twin(spare: list[Sample], key: bytes, fault: str) -> Sample:
    """A spare good sample under `key`, json member first: whatever precedes it in the tar
    also has a json member, so a reader sees where the repeated key starts a new sample."""
    twin = spare.pop()
    twin.key = key
    twin.members.sort(key=lambda member: member[0] != "json")
    twin.faults.append(fault)
    return twin


def _flip(data: bytes, rng: np.random.Generator, count: int, lo: int = 0) -> bytes:
    buf = bytearray(data)
    for pos in rng.integers(lo, len(buf), size=count):
        buf[int(pos)] ^= int(rng.integers(1, 256))
    return bytes(buf)


def _exotic_image(rng: np.random.Generator) -> tuple[str, bytes]:
    """A valid image in an unusual mode, size or format."""
    kind = str(rng.choice(["L", "RGBA", "P", "I;16", "1", "LA", "CMYK", "webp", "1x1", "wide"]))
    buf = io.BytesIO()
    if kind == "CMYK":
        Image.new("CMYK", (8, 8), (10, 200, 30, 0)).save(buf, format="JPEG")
        return "jpg", buf.getvalue()
    if kind == "webp":
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="WEBP")
        return "webp", buf.getvalue()
    size = {"1x1": (1, 1), "wide": (300, 2)}.get(kind, (8, 8))
    mode = "RGB" if kind in ("1x1", "wide") else kind
    Image.new(mode, size).save(buf, format="PNG")
    return "png", buf.getvalue()


def _huge_text(rng: np.random.Generator) -> str:
    words = ["red", "circle", "blue", "square", "on", "the", "left", "large", "small"]
    n = int(rng.integers(8_000, 40_000))
    return " ".join(words[int(i)] for i in rng.integers(0, len(words), size=n))


def apply_sample_fault(
    samples: list[Sample], fault: str, rng: np.random.Generator, spare: list[Sample]
) -> None:
    """Damage one randomly chosen sample (or insert a damaged one) in place."""
    if not samples:
        return
    i = int(rng.integers(len(samples)))
    s = samples[i]
    s.faults.append(fault)
    ext = s.image_ext()
    if fault == "flip_image" and ext:
        data = s.member(ext.lower())
        if data:
            s.set_member(ext.lower(), _flip(data, rng, int(rng.integers(1, 9))))
            s.image = MAYBE
    elif fault == "truncated_image" and ext and s.image in ("ok", MAYBE):
        data = s.member(ext.lower())
        s.set_member(ext.lower(), data[: len(data) // 2])
        s.image = "undecodable" if s.image == "ok" else MAYBE
    elif fault == "not_an_image" and ext and s.image != "missing":
        s.set_member(ext.lower(), b"<html><body>404 not found</body></html>")
        s.image = "undecodable"
    elif fault == "zero_image" and ext:
        s.set_member(ext.lower(), b"")
        s.image = "missing"
    elif fault == "no_image" and ext:
        s.set_member(ext.lower(), None)
        s.image = "missing"
    elif fault == "no_caption":
        s.set_member("txt", None)
    elif fault == "zero_caption":
        s.set_member("txt", b"")
    elif fault == "blank_caption":
        s.set_member("txt", b" \t\n  ")
    elif fault == "huge_caption":
        s.set_member("txt", _huge_text(rng).encode())
    elif fault == "non_utf8_caption":
        s.set_member("txt", b"\xff\xfe caf\xe9 " + (s.caption or "").encode() + b" \x80\xc3")
    elif fault == "json_caption":
        text = f"json caption {i}"
        s.set_member("txt", None)
        s.set_member("json", json.dumps({"caption": text}).encode())
        s.json_caption = text
    elif fault == "zero_json":
        s.set_member("json", b"")
    elif fault == "bad_json":
        s.set_member("json", b"{not json \xff")
    elif fault == "deep_json":
        s.set_member("json", b"[" * 60_000 + b"]" * 60_000)
    elif fault in ("duplicate_key_adjacent", "duplicate_key_later") and spare:
        twin = _twin(spare, s.key, fault)
        samples.insert(i + 1 if fault == "duplicate_key_adjacent" else len(samples), twin)
    elif fault == "duplicate_json_uid" and spare:
        uid = rng.bytes(16).hex()
        twin = _twin(spare, b"twin" + s.key, fault)
        for sample in (s, twin):
            sample.set_member("json", json.dumps({"uid": uid.upper()}).encode())
            sample.uid_override = uid
        samples.insert(int(rng.integers(i + 1, len(samples) + 1)), twin)
    elif fault == "non_utf8_key":
        s.key = b"k\xff\xfe" + s.key + bytes([0x80 + int(rng.integers(0, 64))])
    elif fault == "upper_ext":
        s.members = [(n.upper(), d) for n, d in s.members]
    elif fault == "exotic_image" and ext and s.image != "missing":
        new_ext, data = _exotic_image(rng)
        s.members = [(new_ext, data) if n == ext else (n, d) for n, d in s.members]
        s.image = "ok"
    elif fault == "json_only" and spare:
        twin = _twin(spare, b"jsononly" + s.key, fault)
        twin.members = [("json", json.dumps({"note": "metadata only"}).encode())]
        twin.image = "missing"
        samples.insert(i + 1, twin)
    elif fault == "extra_member" and s.member("cls") is None:
        s.members.append(("cls", b"3"))
    elif fault == "symlink_image" and ext and not s.links:
        s.set_member(ext.lower(), None)
        s.links.append(ext.lower())
        s.image = "missing"
    elif fault == "malformed_json_uid":
        s.set_member("json", json.dumps({"uid": "not-32-hex-" + rng.bytes(4).hex()}).encode())
    elif fault in NAME_FAULTS:
        prefix = {
            "parent_key": b"../../",
            "absolute_key": b"/abs/",
            "nested_parent_key": b"a/../../",
            "newline_key": b"new\n",
            "backslash_key": b"dir\\",
        }[fault]
        s.key = prefix + s.key


def tar_bytes(samples: list[Sample], trailing_directory: bool = False) -> bytes:
    """The samples as a tar (mtime 0, names with raw key bytes, like a web crawler's writer),
    optionally followed by a directory entry, as `tar cf` writes for an empty folder."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format=tarfile.USTAR_FORMAT,
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        for s in samples:
            key = s.key.decode("utf-8", "surrogateescape")
            for ext, data in s.members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            for ext in s.links:
                link = tarfile.TarInfo(f"{key}.{ext}")
                link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "/etc/passwd", 0
                tar.addfile(link)
        if trailing_directory:
            info = tarfile.TarInfo("empty-folder")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
    return buf.getvalue()


def _layout(data: bytes) -> tuple[list[int], int]:
    """Header offsets of the members and the end of the end-of-archive marker."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
    if not members:
        return [], 1024
    last = members[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    return [m.offset for m in members], end + 1024


def build_shard(
    root: Path,
    stem: str,
    seed: int,
    n: int,
    sample_faults: list[str],
    shard_fault: str | None = None,
    fmt: str = "jpg",
) -> Shard:
    """Write `<root>/<stem>.tar`: n good pairs, then the faults, with the expected outcome."""
    rng = np.random.default_rng(seed)
    spare_n = len(sample_faults)
    pairs = make_pairs(n + spare_n, seed=seed, image_size=16)
    good = [_good_sample(pairs["images"][i], pairs["captions"][i], i, stem, fmt) for i in range(n)]
    spare = [
        _good_sample(pairs["images"][i], pairs["captions"][i], i, stem, fmt)
        for i in range(n, n + spare_n)
    ]
    for fault in sample_faults:
        apply_sample_fault(good, fault, rng, spare)
    faults = list(sample_faults)
    expect = "complete"
    if shard_fault == "empty_tar":
        good = []
    data = tar_bytes(good, trailing_directory=shard_fault == "trailing_directory")
    if shard_fault == "truncate":
        _, marker_end = _layout(data)
        cut = int(rng.integers(0, len(data)))
        data = data[:cut]
        expect = "fail" if cut < marker_end else "complete"
    elif shard_fault == "zero_bytes":
        data, expect = b"", "fail"
    elif shard_fault == "garbage":
        data, expect = b"\x01" + rng.bytes(4095), "fail"
    elif shard_fault == "flip_header":
        offsets, _ = _layout(data)
        if offsets:
            at = offsets[int(rng.integers(len(offsets)))]
            data = data[:at] + _flip(data[at : at + 512], rng, 1) + data[at + 512 :]
            expect = "either"
    elif shard_fault == "trailing_garbage":
        data = data + b"\x01junk after the archive" * 40
    if shard_fault:
        faults.append(shard_fault)
    path = root / f"{stem}.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Shard(stem, path, good, faults, expect)


def expected_problem(sample: Sample, modality: str = "both") -> str | None:
    """What `embed` must do with a sample (SPEC §9); MAYBE when its image may not decode."""
    needs_image = modality in ("both", "image")
    needs_text = modality in ("both", "text")
    if sample.unsafe:
        return "unsafe_name"
    if needs_image and sample.image == "missing":
        return "missing_image"
    if needs_text and not (sample.caption or "").strip():
        return "missing_caption"
    if needs_image and sample.image == "undecodable":
        return "undecodable_image"
    if needs_image and sample.image == MAYBE:
        return MAYBE
    return None


# ------------------------------------------------------------------------------------ stores

STORE_FAULTS = (
    "nan_rows",
    "inf_rows",
    "zero_norm_rows",
    "null_uid",
    "empty_uid",
    "duplicate_uid",
    "npz_short",
    "npz_long",
    "parquet_short",
    "int_dtype",
    "bool_dtype",
    "complex_dtype",
    "str_dtype",
    "object_dtype",
    "float64_dtype",
    "float32_dtype",
    "bigendian_dtype",
    "fortran_order",
    "compressed_npz",
    "one_dim",
    "three_dim",
    "txt_dim_differs",
    "other_dim",
    "missing_txt",
    "truncated_npz",
    "garbage_npz",
    "truncated_parquet",
    "missing_npz",
    "no_uid_column",
    "int_uid_column",
    "corrupt_done",
    "bad_logit_scale",
    "no_done",
    "empty_stem",
)
# Faults whose stem must fail: always, or only when the stage reads the array involved.
FAILING = {
    "npz_short",
    "npz_long",
    "parquet_short",
    "int_dtype",
    "bool_dtype",
    "complex_dtype",
    "str_dtype",
    "object_dtype",
    "one_dim",
    "three_dim",
    "truncated_npz",
    "garbage_npz",
    "truncated_parquet",
    "missing_npz",
    "no_uid_column",
    "int_uid_column",
}
TXT_ONLY_FAILING = {"txt_dim_differs", "missing_txt"}
# Valid array layouts; applied before the damaging faults so they never undo one.
HARMLESS_LAYOUTS = {"float64_dtype", "float32_dtype", "bigendian_dtype", "fortran_order"}
SCORE_REASONS = {"missing_uid", "nonfinite_embedding", "duplicate_uid"}
CORRUPT_DONE = (
    b"\x00\xff\xfe garbage",
    b'{"rows": 3, "read"',
    b"[1, 2, 3]",
    b"{}",
    b'{"rows": "ten"}',
    b'{"rows": -1}',
    b"[" * 50_000 + b"]" * 50_000,
    b"",
)
BAD_LOGIT_SCALES = ('"abc"', "-5", "0", "NaN", "Infinity", "[1]", "null", "true")


@dataclass
class Stem:
    """A store stem and its truth for `score`: rows, uids, arrays and the expected outcome."""

    stem: str
    uids: list[str | None]
    img: np.ndarray
    txt: np.ndarray
    faults: list[str] = field(default_factory=list)
    has_done: bool = True
    parquet_rows: int = 0  # what a parquet reader finds (0 when unreadable)

    def outcome(self, needs_txt: bool, target_dim: int | None, all_without_done: bool) -> str:
        """ "excluded" (left out with a warning), "fail" or "complete"."""
        if not self.has_done and not all_without_done:
            return "excluded"
        failing = FAILING | (TXT_ONLY_FAILING if needs_txt else set())
        if failing & set(self.faults):
            return "fail"
        if target_dim is not None and self.img.shape[1] != target_dim:
            return "fail"
        return "complete"

    def valid(self, needs_txt: bool) -> tuple[list[int], dict[str, int]]:
        """Rows the sidecar must hold, and skips by reason (one reason per row, in this order:
        missing uid, non-finite embedding, repeated uid)."""
        arrays = [self.img] + ([self.txt] if needs_txt else [])
        finite = np.all([np.isfinite(a.astype(np.float64)).all(axis=1) for a in arrays], axis=0)
        seen: set[str] = set()
        keep: list[int] = []
        skipped = {"missing_uid": 0, "nonfinite_embedding": 0, "duplicate_uid": 0}
        for i, uid in enumerate(self.uids):
            if not uid:
                skipped["missing_uid"] += 1
            elif not finite[i]:
                skipped["nonfinite_embedding"] += 1
            elif uid in seen:
                skipped["duplicate_uid"] += 1
            else:
                seen.add(uid)
                keep.append(i)
        return keep, {k: v for k, v in skipped.items() if v}


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n random L2-normalised rows, float16 like the store."""
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _uid(stem: str, i: int) -> str:
    return hashlib.md5(f"{stem}/{i:06d}".encode()).hexdigest()


def _write_npz(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> None:
    with open(path, "wb") as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)


def _write_meta(path: Path, stem: str, uids: list[str | None]) -> None:
    n = len(uids)
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "key": pa.array([f"{i:06d}" for i in range(n)], pa.string()),
            "caption": pa.array([f"caption {i}" for i in range(n)], pa.string()),
            "url": pa.array([None] * n, pa.string()),
            "shard": pa.array([stem] * n, pa.string()),
        }
    )
    pq.write_table(table, path)


def build_stem(root: Path, stem: str, n: int, dim: int, faults: list[str], seed: int) -> Stem:
    """Write one stem the way `embed` does, then damage it; returns its truth."""
    faults = list(dict.fromkeys(faults))
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    if "empty_stem" in faults:
        n = 0
    img, txt = unit_rows(rng, n, dim), unit_rows(rng, n, dim)
    if "other_dim" in faults:
        img, txt = unit_rows(rng, n, dim + 3), unit_rows(rng, n, dim + 3)
    uids: list[str | None] = [_uid(stem, i) for i in range(n)]
    s = Stem(stem, uids, img, txt, list(faults))
    rows = rng.integers(0, max(n, 1), size=max(1, n // 4)) if n else np.empty(0, np.int64)
    for fault in faults:
        if n == 0:
            continue
        if fault == "nan_rows":
            target = s.img if rng.random() < 0.5 else s.txt
            target[rows, int(rng.integers(dim))] = np.nan
        elif fault == "inf_rows":
            target = s.img if rng.random() < 0.5 else s.txt
            target[rows, int(rng.integers(dim))] = np.float16(np.inf) * rng.choice([-1, 1])
        elif fault == "zero_norm_rows":
            s.img[rows] = 0
        elif fault == "null_uid":
            for r in rows:
                s.uids[int(r)] = None
        elif fault == "empty_uid":
            for r in rows:
                s.uids[int(r)] = ""
        elif fault == "duplicate_uid" and n > 1:
            s.uids[int(rng.integers(1, n))] = s.uids[0]
    _write_meta(root / f"{stem}.parquet", stem, s.uids)
    arrays: dict[str, np.ndarray] = {"img": s.img, "txt": s.txt}
    for fault in sorted(faults, key=lambda f: f not in HARMLESS_LAYOUTS):
        if fault == "npz_short":
            arrays = {k: v[:-1] if len(v) else v[:0] for k, v in arrays.items()}
            if n == 0:
                arrays = {k: np.zeros((1, dim), np.float16) for k in arrays}
        elif fault == "npz_long":
            arrays = {
                k: np.concatenate([v, unit_rows(rng, 2, v.shape[1])]) for k, v in arrays.items()
            }
        elif fault == "int_dtype":
            arrays["img"] = (arrays["img"] * 100).astype(np.int32)
        elif fault == "bool_dtype":
            arrays["img"] = arrays["img"] > 0
        elif fault == "complex_dtype":
            arrays["img"] = arrays["img"].astype(np.complex64)
        elif fault == "str_dtype":
            arrays["img"] = arrays["img"].astype(str)
        elif fault == "object_dtype":
            arrays["img"] = arrays["img"].astype(object)
        elif fault == "float64_dtype":
            arrays = {k: v.astype(np.float64) for k, v in arrays.items()}
        elif fault == "float32_dtype":
            arrays["img"] = arrays["img"].astype(np.float32)
        elif fault == "bigendian_dtype":
            arrays = {k: v.astype(">f4") for k, v in arrays.items()}
        elif fault == "fortran_order":
            arrays = {k: np.asfortranarray(v) for k, v in arrays.items()}
        elif fault == "one_dim":
            arrays["img"] = arrays["img"][:, 0].copy()
        elif fault == "three_dim":
            arrays["img"] = arrays["img"][:, :, None].copy()
        elif fault == "txt_dim_differs":
            arrays["txt"] = unit_rows(rng, len(arrays["txt"]), dim + 1)
        elif fault == "missing_txt":
            arrays.pop("txt", None)
    npz = root / f"{stem}.npz"
    pickled = any(a.dtype.hasobject for a in arrays.values())
    if pickled:
        with open(npz, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        _write_npz(npz, arrays, compressed="compressed_npz" in faults)
    if "parquet_short" in faults:
        _write_meta(root / f"{stem}.parquet", stem, s.uids[:-1] if n else [None])
    if "truncated_npz" in faults:
        data = npz.read_bytes()
        npz.write_bytes(data[: int(rng.integers(0, len(data)))])
    if "garbage_npz" in faults:
        npz.write_bytes(rng.bytes(300))
    if "missing_npz" in faults:
        npz.unlink()
    if "truncated_parquet" in faults:
        path = root / f"{stem}.parquet"
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, len(data) - 1))])
    if "no_uid_column" in faults:
        pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(n)]}), root / f"{stem}.parquet")
    if "int_uid_column" in faults:
        pq.write_table(pa.table({"uid": pa.array(range(n), pa.int64())}), root / f"{stem}.parquet")
    try:
        s.parquet_rows = pq.ParquetFile(root / f"{stem}.parquet").metadata.num_rows
    except Exception:
        s.parquet_rows = 0
    done = root / f"{stem}.done.json"
    marker = {"rows": n, "read": n, "skipped": {}, "logit_scale": 100.0, "seconds": 0.1}
    text = json.dumps(marker)
    if "bad_logit_scale" in faults:
        text = text.replace("100.0", str(rng.choice(BAD_LOGIT_SCALES)))
    done.write_text(text)
    if "corrupt_done" in faults:
        done.write_bytes(CORRUPT_DONE[int(rng.integers(len(CORRUPT_DONE)))])
        s.has_done = False
    if "no_done" in faults:
        done.unlink()
        s.has_done = False
    return s


TARGET_FAULTS = ("missing", "nan", "zero_row", "pickle_pt", "truncated", "wrong_dim")


def write_target(
    root: Path, rng: np.random.Generator, n: int, dim: int, fault: str | None
) -> tuple[Path, str]:
    """A NormSim target file and what `score` must do with it: "ok", "refuse" or "fail"."""
    path = root / ("target.pt" if fault == "pickle_pt" else "target.npy")
    if fault == "missing":
        return path, "refuse"
    rows = unit_rows(rng, n, dim + 2 if fault == "wrong_dim" else dim).astype(np.float32)
    if fault == "nan":
        rows[0, 0] = np.nan
    elif fault == "zero_row":
        rows[-1] = 0
    elif fault == "pickle_pt":
        path.write_bytes(pickle.dumps({"image_features": rows, "evil": Evil()}))
        return path, "refuse"
    np.save(path, rows)
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    expect = {"nan": "refuse", "zero_row": "refuse", "truncated": "refuse", "wrong_dim": "fail"}
    return path, expect.get(fault or "", "ok")


class Evil:
    """Unpickling this writes a marker file: proof that a loader executed a pickle payload."""

    marker: str = "/tmp/mmcurate-fault-suite-unpickled"

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


# ------------------------------------------------------------------------------------ select

SIDECAR_FAULTS = (
    "nan_scores",
    "inf_scores",
    "null_scores",
    "float64_scores",
    "int_scores",
    "string_scores",
    "missing_column",
    "truncated",
    "non_hex_uid",
    "null_uid",
    "int_uid",
    "uppercase_uid",
    "duplicate_uids",
    "empty",
)
# What `select` must do with a sidecar fault: "ok", "refuse" (exit 2) or "fail" (exit 1).
SIDECAR_EXPECT = {
    "nan_scores": "ok",
    "inf_scores": "ok",
    "null_scores": "ok",
    "float64_scores": "ok",
    "int_scores": "ok",
    "string_scores": "fail",
    "missing_column": "refuse",
    "truncated": "refuse",
    "non_hex_uid": "fail",
    "null_uid": "fail",
    "int_uid": "fail",
    "uppercase_uid": "ok",
    "duplicate_uids": "ok",
    "empty": "ok",
}
SUBSET_FAULTS = (
    "pickled",
    "truncated",
    "two_dim",
    "signed",
    "zero_bytes",
    "npz",
    "garbage",
    "scalar",
    "big_endian",
    "unsorted_duplicates",
    "empty",
)
SUBSET_EXPECT = {
    "pickled": "refuse",
    "truncated": "refuse",
    "two_dim": "refuse",
    "signed": "refuse",
    "zero_bytes": "refuse",
    "npz": "refuse",
    "garbage": "refuse",
    "scalar": "refuse",
    "big_endian": "ok",
    "unsorted_duplicates": "ok",
    "empty": "ok",
}
METRIC_COLUMNS = ("clipscore", "negclip", "normsim_inf")
# Faults that change rows, so do nothing to an empty sidecar.
ROW_FAULTS = {
    "nan_scores",
    "inf_scores",
    "null_scores",
    "string_scores",
    "non_hex_uid",
    "null_uid",
    "duplicate_uids",
}


@dataclass
class Sidecar:
    """A score sidecar's truth: uids (lowercase) and float32 score columns, or its fault."""

    stem: str
    uids: list[str]
    scores: dict[str, np.ndarray]
    faults: list[str]
    metric: str  # the column the score faults touch
    path: Path | None = None

    def expect(self, metrics: set[str]) -> str:
        """What `select` using `metrics` must do: "ok", "refuse" (exit 2) or "fail" (exit 1)."""
        outcomes = set()
        for fault in self.faults:
            if not self.uids and fault in ROW_FAULTS:
                continue
            touches_column = fault.endswith("_scores") or fault == "missing_column"
            if touches_column and self.metric not in metrics:
                continue
            outcomes.add(SIDECAR_EXPECT[fault])
        return "refuse" if "refuse" in outcomes else "fail" if "fail" in outcomes else "ok"


def build_sidecar(
    root: Path, stem: str, n: int, faults: list[str], seed: int, shared: list[str]
) -> Sidecar:
    """Write `<stem>.scores.parquet` with the faults; `shared` offers uids to repeat."""
    faults = list(dict.fromkeys(faults))
    rng = np.random.default_rng(seed)
    if "empty" in faults:
        n = 0
    uids = [hashlib.md5(f"{stem}/{i}".encode()).hexdigest() for i in range(n)]
    if "duplicate_uids" in faults and shared and n:
        for j in rng.integers(0, n, size=max(1, n // 3)):
            uids[int(j)] = shared[int(rng.integers(len(shared)))]
    scores = {m: rng.standard_normal(n).astype(np.float32) for m in METRIC_COLUMNS}
    if n and rng.random() < 0.5:
        scores["negclip"][: max(1, n // 3)] = scores["negclip"][0]  # ties
    columns: dict[str, pa.Array] = {}
    written_uids: list = list(uids)
    if "uppercase_uid" in faults:
        written_uids = [u.upper() for u in uids]
    if "non_hex_uid" in faults and n:
        written_uids[0] = "z" * 32
    if "null_uid" in faults and n:
        written_uids[0] = None
    columns["uid"] = (
        pa.array(list(range(n)), pa.int64())
        if "int_uid" in faults
        else pa.array(written_uids, pa.string())
    )
    m = METRIC_COLUMNS[int(rng.integers(len(METRIC_COLUMNS)))]
    if "nan_scores" in faults and n:
        scores[m][rng.integers(0, n, size=max(1, n // 3))] = np.nan
    if "inf_scores" in faults and n:
        scores[m][rng.integers(0, n, size=max(1, n // 3))] = rng.choice([-np.inf, np.inf])
    for name, values in scores.items():
        columns[name] = pa.array(values, pa.float32())
    if "null_scores" in faults and n:
        mask = np.zeros(n, dtype=bool)
        mask[rng.integers(0, n, size=max(1, n // 3))] = True
        columns[m] = pa.array(scores[m], pa.float32(), mask=mask)
        scores[m] = np.where(mask, np.float32(np.nan), scores[m])
    if "float64_scores" in faults:
        columns[m] = pa.array(scores[m].astype(np.float64), pa.float64())
    if "int_scores" in faults:
        scores[m] = np.round(scores[m] * 3).astype(np.float32)
        scores[m][~np.isfinite(scores[m])] = 0
        columns[m] = pa.array(scores[m].astype(np.int64), pa.int64())
    if "string_scores" in faults:
        text = [str(v) for v in scores[m]]
        columns[m] = pa.array(["n/a", *text[1:]] if n else text, pa.string())
    if "missing_column" in faults:
        columns.pop(m)
    path = root / f"{stem}.scores.parquet"
    pq.write_table(pa.table(columns), path)
    if "truncated" in faults:
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(0, len(data) - 1))])
    return Sidecar(stem, uids, scores, list(faults), m, path)


def subset_pairs(uids: list[str]) -> np.ndarray:
    """uids as the (u8, u8) pair form of subset files (SPEC §2), in the given order."""
    out = np.empty(len(uids), dtype=np.dtype("u8,u8"))
    out["f0"] = [int(u[:16], 16) for u in uids]
    out["f1"] = [int(u[16:32], 16) for u in uids]
    return out


def build_subset(path: Path, uids: list[str], fault: str | None, seed: int) -> list[str]:
    """Write a subset file holding `uids` with a fault; returns the uids it validly holds."""
    rng = np.random.default_rng(seed)
    pairs = np.sort(subset_pairs(uids))
    if fault == "pickled":
        np.save(path, np.array([{"uid": u} for u in uids] + [Evil()], dtype=object), True)
    elif fault == "truncated":
        np.save(path, pairs)
        data = path.read_bytes()
        path.write_bytes(data[: max(0, len(data) - 1 - int(rng.integers(0, 40)))])
    elif fault == "two_dim":
        np.save(path, np.zeros((len(uids) + 1, 2), np.uint64))
    elif fault == "signed":
        np.save(path, pairs.astype(np.dtype("i8,i8")))
    elif fault == "zero_bytes":
        path.write_bytes(b"")
    elif fault == "npz":
        with open(path, "wb") as fh:
            np.savez(fh, subset=pairs)
    elif fault == "garbage":
        path.write_bytes(b"\x93NUMPY" + rng.bytes(100))
    elif fault == "scalar":
        np.save(path, np.zeros((), np.dtype("u8,u8")))
    elif fault == "big_endian":
        np.save(path, pairs.astype(np.dtype(">u8,>u8")))
    elif fault == "unsorted_duplicates":
        np.save(path, np.concatenate([pairs[::-1], pairs[: max(1, len(pairs) // 2)]]))
    elif fault == "empty":
        np.save(path, pairs[:0])
        return []
    else:
        np.save(path, pairs)
    return list(uids) if SUBSET_EXPECT.get(fault or "", "ok") == "ok" else []
