"""`mmcurate report` (issue 25): the rows each section shows, checked against the sidecars and
the selection's own result; SemDeDup groups against planted duplicates; thumbnails re-encoded;
the same inputs give the same bytes; bad input."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from test_semdedup import planted, write_store

from mmcurate.cli.main import cli
from mmcurate.data.shard_writer import write_shard
from mmcurate.data.subset import load_subset
from mmcurate.data.uid import pair_to_uid
from mmcurate.report.pool_view import _contains

HOSTILE = (
    "<script>document.title='pwned';window.pwned=1</script>",
    "<img src=x onerror=\"window.pwned=2;document.title='pwned'\">",
    "</table></div></td><tr><td>broken",
    "a \"quoted\" 'caption' & <b>bold</b>",
)
KEEP = ("semdedup<=0.95", "negclip:0.6", "normsim_inf:0.3")


def run(*args) -> object:
    """The real command line in this process (the click group that maps errors to exit 2)."""
    return CliRunner().invoke(cli, list(map(str, args)))


def _png(colour: tuple[int, int, int]) -> bytes:
    """A 24 px PNG carrying a text chunk, so a passed-through file would be told apart."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "<script>window.pwned=3</script>")
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def colour_of(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 53 % 256)


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """A scored pool of about 240 rows in two stems (planted near-duplicate groups), its shards with
    hostile captions and a subset selected by three rules."""
    root = tmp_path_factory.mktemp("report")
    x, group = planted(np.random.default_rng(5), 200, 16, 12, sigma=0.05)
    sizes = [130, len(x) - 130]
    txt = x + 0.6 * np.random.default_rng(6).standard_normal(x.shape) / 4
    stems = write_store(root / "store", x, sizes, txt)
    np.save(root / "target.npy", x[:5].astype(np.float32))
    shards, start = [], 0
    for stem, size in zip(stems, sizes):
        samples = [
            (f"{k:06d}", {"png": _png(colour_of(start + k)), "txt": HOSTILE[k % 4].encode()})
            for k in range(size)
        ]
        shards.append(write_shard(root / "shards" / f"{stem}.tar", samples))
        start += size
    score = run(
        "score", root / "store", "--out", root / "scores", "--metric", "clipscore",
        "--metric", "negclip", "--metric", "semdedup", "--metric", "normsim", "--p", "inf",
        "--target", root / "target.npy", "--batch-size", 64, "--clusters", 4,
    )  # fmt: skip
    assert score.exit_code == 0, score.output
    keep = [a for rule in KEEP for a in ("--keep", rule)]
    selected = run("select", root / "scores", "--out", root / "subset.npy", *keep)
    assert selected.exit_code == 0, selected.output
    tables = [pq.read_table(root / "scores" / f"{s}.scores.parquet") for s in stems]
    table = pa.concat_tables(tables).to_pydict()
    uids = table.pop("uid")
    subset = {pair_to_uid(p["f0"], p["f1"]) for p in load_subset(root / "subset.npy")}
    return {
        "root": root,
        "stems": stems,
        "shards": [str(s) for s in shards],
        "uids": uids,
        "scores": {k: np.array(v, dtype=np.float64) for k, v in table.items()},
        "group": {u: int(g) for u, g in zip(uids, group)},
        "colour": {u: colour_of(i) for i, u in enumerate(uids)},
        "subset": subset,
    }


def write(scored: dict, out: Path, *extra) -> Path:
    root = scored["root"]
    result = run(
        "report", root / "scores", "--subset", root / "subset.npy",
        "--shards", root / "shards" / "*.tar", "--out", out, *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


class Sections(HTMLParser):
    """The uids of the example cards under each h4 heading, and every <img> source."""

    def __init__(self):
        super().__init__()
        self.cards: dict[str, list[str]] = {}
        self.images: list[str] = []
        self.heading: str | None = None
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("h2", "h3", "h4"):
            self._in = tag
            self.heading = ""
        elif tag == "div" and attrs.get("class") == "uid":
            self._in = "uid"

    def handle_endtag(self, tag):
        if tag in ("h2", "h3", "h4") or (tag == "div" and self._in == "uid"):
            self._in = None

    def handle_data(self, data):
        if self._in in ("h2", "h3", "h4"):
            self.heading += data
        elif self._in == "uid":
            self.cards.setdefault(self.heading, []).append(data)


def parse(path: Path) -> Sections:
    parser = Sections()
    parser.feed(path.read_text())
    parser.close()
    return parser


def nearest(scored: dict, name: str, rows: np.ndarray | None, high: bool, m: int) -> set[str]:
    """uids of the m rows (default all) with the highest or lowest scores, NaN left out, ties
    to the smaller row."""
    values = scored["scores"][name]
    rows = np.arange(len(values)) if rows is None else rows
    rows = rows[~np.isnan(values[rows])]
    order = np.lexsort((rows, -values[rows] if high else values[rows]))
    return {scored["uids"][i] for i in rows[order[:m]]}


def test_sections_show_the_rows_they_name(scored, tmp_path):
    parser = parse(write(scored, tmp_path / "report.html"))
    cards, band = parser.cards, 4 * 8
    for name in ("clipscore", "negclip", "normsim_inf", "semdedup"):
        best, worst = ("most like the target", "least like the target")
        if not name.startswith("normsim"):
            best, worst = "top", "bottom"
        top, bottom = cards[f"{best} ({name})"], cards[f"{worst} ({name})"]
        assert len(top) == len(bottom) == 8
        assert set(top) <= nearest(scored, name, None, True, band)
        assert set(bottom) <= nearest(scored, name, None, False, band)
    # the cut-off bands, from the selection's own stages replayed on the sidecars
    alive = np.ones(len(scored["uids"]), dtype=bool)
    for rule in KEEP:
        name = re.split(r"[:<>=]", rule)[0]
        values = scored["scores"][name]
        low = "<" in rule
        if ":" in rule:
            k = int(float(rule.split(":")[1]) * len(values))
            rows = np.flatnonzero(alive)  # ties to the smaller uid, as SPEC §5 says
            uids = np.array(scored["uids"])[rows]
            kept_uids = set(uids[np.lexsort((uids, -values[rows]))][:k])
            after = alive & np.array([u in kept_uids for u in scored["uids"]])
        else:
            after = alive & (values <= float(rule.split("=")[1]))
        just_kept = cards[f"just kept by {rule} (the {'highest' if low else 'lowest'} kept scores)"]
        just_dropped = cards[f"just dropped by {rule}"]
        near_kept = nearest(scored, name, np.flatnonzero(after), low, band)
        near_dropped = nearest(scored, name, np.flatnonzero(alive & ~after), not low, band)
        assert just_kept and set(just_kept) <= set(near_kept), rule
        assert just_dropped and set(just_dropped) <= set(near_dropped), rule
        alive = after
    assert {scored["uids"][i] for i in np.flatnonzero(alive)} == scored["subset"]


def test_dedup_groups_are_planted_copies(scored, tmp_path):
    parser = parse(write(scored, tmp_path / "report.html"))
    groups = [h for h in parser.cards if h.startswith("group ")]
    assert len(groups) >= 4
    group_of, subset = scored["group"], scored["subset"]
    semdedup = dict(zip(scored["uids"], scored["scores"]["semdedup"]))
    for heading in groups:
        kept, *removed = parser.cards[heading]
        assert removed and semdedup[kept] <= 0.95 and group_of[kept] >= 0
        assert all(semdedup[u] > 0.95 for u in removed)
        assert [group_of[u] for u in removed] == [group_of[kept]] * len(removed), heading
        assert all(u not in subset for u in removed)


def test_thumbnails_are_re_encoded_and_match_the_shards(scored, tmp_path):
    from PIL import Image

    text = write(scored, tmp_path / "report.html").read_text()
    parser = parse(tmp_path / "report.html")
    import base64

    thumbs = [s for s in parser.images if s.startswith("data:image/png;base64,")]
    cards = re.findall(r"<img src='(data:[^']+)' alt='thumbnail of ([0-9a-f]{32})'>", text)
    assert len(cards) >= 40 and len(thumbs) == len(cards) + 4  # one histogram per column
    for src, uid in cards:
        data = base64.b64decode(src.split(",", 1)[1])
        assert b"tEXt" not in data and b"script" not in data
        image = Image.open(io.BytesIO(data))
        assert image.size == (24, 24) and image.getpixel((3, 3)) == scored["colour"][uid]
    for caption in HOSTILE:
        assert caption not in text
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;" in text


def test_same_inputs_same_bytes_and_the_seed_matters(scored, tmp_path):
    first = write(scored, tmp_path / "a.html").read_bytes()
    assert write(scored, tmp_path / "b.html").read_bytes() == first
    assert write(scored, tmp_path / "c.html", "--seed", 1).read_bytes() != first


def test_without_subset_or_shards_the_sidecars_suffice(scored, tmp_path):
    out = tmp_path / "plain.html"
    result = run("report", scored["root"] / "scores", "--out", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "Selection funnel" not in text and "give --shards" in text
    assert "caption 000" in text  # captions from the scored store's metadata
    parser = parse(out)
    assert len(parser.images) == 4
    assert all(len(v) == 8 for k, v in parser.cards.items() if k.startswith(("top", "bottom")))


def test_shards_without_the_shown_uids_give_a_note(scored, tmp_path):
    other = write_shard(tmp_path / "other.tar", [("000000", {"png": _png((1, 2, 3)), "txt": b"x"})])
    out = tmp_path / "report.html"
    result = run("report", scored["root"] / "scores", "--shards", other, "--out", out)
    assert result.exit_code == 0, result.output
    assert "none of the shown rows is in the given shards" in out.read_text()
    assert "0 thumbnails" in result.output


def test_funnel_counts_are_subset_json(scored, tmp_path):
    import json

    record = json.loads((scored["root"] / "subset.json").read_text())
    text = write(scored, tmp_path / "r.html").read_text()
    funnel = text.split("<table class='funnel'>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>[^<]*</td><td>([0-9,]+)</td>", funnel)
    expected = [("pool", f"{record['pool']:,}")]
    expected += [(s["rule"].replace("<", "&lt;"), f"{s['count']:,}") for s in record["stages"]]
    assert rows == [*expected, ("subset", f"{record['count']:,}")]


def _one_line_exit_2(result, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_bad_input_exits_2_with_one_line_and_writes_nothing(scored, tmp_path):
    root = scored["root"]
    out = tmp_path / "report.html"
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(run("report", tmp_path / "empty", "--out", out), out)
    foreign = np.array([(1, 2), (3, 4)], dtype="u8,u8")
    np.save(tmp_path / "foreign.npy", foreign)
    bad = run("report", root / "scores", "--subset", tmp_path / "foreign.npy", "--out", out)
    _one_line_exit_2(bad, out)
    assert "none of the 2 uids" in bad.output
    missing_dir = tmp_path / "nowhere" / "report.html"
    _one_line_exit_2(run("report", root / "scores", "--out", missing_dir), missing_dir)
    (tmp_path / "file").write_text("x")
    under_file = tmp_path / "file" / "report.html"
    _one_line_exit_2(run("report", root / "scores", "--out", under_file), under_file)
    proc = Path("/proc/report.html")
    _one_line_exit_2(run("report", root / "scores", "--out", proc), proc)


def test_datacomp_metadata_directory_reports_its_own_columns(tmp_path):
    rng = np.random.default_rng(0)
    uids = [f"{i:032x}" for i in range(40)]
    table = pa.table(
        {
            "uid": uids,
            "url": ["http://x/<script>"] * 40,
            "text": [f"{HOSTILE[i % 4]} {i}" for i in range(40)],
            "original_width": [256] * 40,
            "clip_l14_similarity_score": rng.random(40),
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    out = tmp_path / "r.html"
    result = run("report", tmp_path, "--out", out, "--examples", 3)
    assert result.exit_code == 0, result.output
    parser = parse(out)
    assert set(parser.cards) == {
        "top (clip_l14_similarity_score)",
        "bottom (clip_l14_similarity_score)",
    }
    assert parser.cards["top (clip_l14_similarity_score)"][0] in uids
    assert "original_width" not in out.read_text().split("score columns")[1].split("</tr>")[0]
    assert "&lt;script&gt;document.title" in out.read_text()
    assert "<div class='url'>http://x/&lt;script&gt;</div>" in out.read_text()


def test_contains_matches_a_set_even_when_high_halves_repeat():
    rng = np.random.default_rng(1)
    hi = rng.integers(0, 4, 400).astype(np.uint64)  # many uids share their high half
    lo = rng.integers(0, 50, 400).astype(np.uint64)
    pool = np.array(list(zip(hi, lo)), dtype="u8,u8")
    chosen = np.unique(pool[rng.random(400) < 0.3])
    expected = {(int(a), int(b)) for a, b in chosen.tolist()}
    got = _contains(chosen, pool)
    assert got.tolist() == [(int(a), int(b)) in expected for a, b in pool.tolist()]


def test_the_demo_report_is_this_report_plus_its_ground_truth(scored, tmp_path):
    import json
    import shutil

    from test_metrics_report import _synthetic_report

    from mmcurate.demo.report import render_report

    root = scored["root"]
    shutil.copytree(root / "scores", tmp_path / "run" / "score")
    (tmp_path / "run" / "select").mkdir()
    for name in ("subset.npy", "subset.json"):
        shutil.copy(root / name, tmp_path / "run" / "select" / name)
    (tmp_path / "pipeline.toml").write_text(f'[embed]\nsrc = ["{root / "shards" / "*.tar"}"]\n')
    samples = [{"uid": u, "fault": "clean", "target_relevant": False} for u in scored["uids"]]
    (tmp_path / "data" / "corpus").mkdir(parents=True)
    (tmp_path / "data" / "corpus" / "ground_truth.json").write_text(
        json.dumps({"samples": samples})
    )
    report = {**_synthetic_report(np.random.default_rng(0)), "regime": "scratch"}
    text = render_report(report, tmp_path).read_text()
    assert text.index("Noise detection") < text.index("Selection funnel")
    assert "Retrieval on the test split (scratch regime)" in text
    parser = parse(tmp_path / "report.html")
    files = [s for s in parser.images if not s.startswith("data:")]
    assert len(files) == 6 and all((tmp_path / f).is_file() for f in files)
    thumbs = [s for s in parser.images if s.startswith("data:image/png")]
    assert len(thumbs) >= 40  # the pool's thumbnails, from the shards pipeline.toml names
    alone = parse(write(scored, tmp_path / "alone.html"))
    assert parser.cards == alone.cards  # the same rows as `mmcurate report` on that run
    n = sum(len(v) for v in parser.cards.values())
    assert text.count("<div class='tag'>ground truth: clean</div>") == n


def test_images_that_do_not_decode_or_are_too_large_give_no_thumbnail(monkeypatch):
    from PIL import Image

    from mmcurate.report.samples import thumbnail

    assert thumbnail(b"not an image", 96) is None and thumbnail(None, 96) is None
    assert thumbnail(_png((1, 2, 3))[:40], 96) is None  # truncated
    data, mime = thumbnail(_png((1, 2, 3)), 96)
    assert mime == "image/png" and Image.open(io.BytesIO(data)).getpixel((0, 0)) == (1, 2, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 24 x 24 = 576: a "bomb" now
    assert thumbnail(_png((1, 2, 3)), 96) is None


def test_report_options_default_to_report_config(monkeypatch):
    import test_defaults

    from mmcurate.report import ReportConfig

    monkeypatch.setitem(test_defaults.COMMANDS, "report", ReportConfig)
    test_defaults.test_click_options_default_to_the_config_dataclass("report")
