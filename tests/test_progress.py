"""Progress bars in logs: whole lines, throttled, with the stage, counts, rate and ETA."""

from __future__ import annotations

import io

import mmcurate.progress as progress
from mmcurate.progress import LogBar, progress_bar


def test_a_log_gets_a_start_and_an_end_line_when_updates_come_fast():
    out = io.StringIO()
    for _ in progress_bar(range(50), desc="score", unit="pair", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 2, lines
    assert lines[0].startswith("score: 0/50 pair [") and lines[1].startswith("score: 50/50 pair [")
    assert "pair/s" in lines[1]


def test_a_postfix_set_every_step_adds_no_lines_and_shows_at_the_end():
    out = io.StringIO()
    bar = progress_bar(range(300), desc="distill", unit="it", file=out)
    for i in bar:
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines[:5]
    assert lines[-1].startswith("distill: 300/300 it [") and "loss=0.0033" in lines[-1]


def test_a_log_gets_a_line_per_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    out = io.StringIO()
    bar = progress_bar(total=4, desc="embed", unit="item", file=out)
    assert isinstance(bar, LogBar)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == [f"embed: {i}/4 item" for i in range(5)] + [
        "embed: 4/4 item"
    ]


def test_a_bar_that_does_not_stay_leaves_nothing_behind_but_its_lines():
    out = io.StringIO()
    bar = progress_bar(total=3, desc="captions", unit="batch", leave=False, file=out)
    bar.update(3)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("captions: 0/3 batch")
    assert "\r" not in out.getvalue()


def test_a_stage_bar_moves_within_an_item_as_it_reports(monkeypatch, capsys):
    from conftest import Item

    from mmcurate.engine import LocalExecutor, report_progress, run_stage

    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)

    def halfway(item):
        report_progress(0.5, final=True)
        return {"rows": 3}

    run_stage(LocalExecutor(1, 1), halfway, [Item("a"), Item("b")], desc="score")
    lines = [line.split(" [")[0] for line in capsys.readouterr().err.splitlines()]
    assert lines[:4] == [
        "score: 0.00/2 item",
        "score: 0.50/2 item",
        "score: 1.00/2 item",
        "score: 1.50/2 item",
    ], lines
    assert lines[-1] == "score: 2.00/2 item"
