"""The `evaluate` stage: num_eval fresh students per set, one work item each, and their recall.

Sets are the distilled artifact and the baselines on equal budgets: random real pairs (a new
draw for each student, independent of the distillation's initial pairs), every real pair
(full), and MTT-VL (S fixed to I). Every set's students train with the same recipe
(EvalConfig). Figures are taken after the last epoch; the paper protocol adds the best epoch on
the test split, kept apart as `best_on_test`. The MTT distillation is itself a work item, run
beside the other sets' students; the MTT students follow it. An MTT artifact already at its
path (the pipeline's distill stage makes it beside LoRS) is used when it is the baseline of
this artifact at these N pairs.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmcurate.data.atomic import read_json_dict, write_json_atomic
from mmcurate.distill.artifact import load_artifact
from mmcurate.distill.buffers import load_buffers
from mmcurate.distill.data import load_pairs
from mmcurate.distill.evaluate import (
    EvalConfig,
    SmallSet,
    architecture,
    artifact_set,
    full_set,
    is_mtt_of,
    mtt_artifact,
    random_set,
    student_recall,
    summarize_students,
)
from mmcurate.distill.sources import absolute_data
from mmcurate.distill.towers import check_tower_weights
from mmcurate.embed import DEFAULT_DEVICE, resolve_device
from mmcurate.engine import Executor, run_stage, summarise
from mmcurate.errors import UsageError

BASELINES = ("random", "full", "mtt")
FULL_BASELINE_LIMIT = 20000


@dataclass(frozen=True)
class StudentItem:
    """An evaluation work item: student `student` of one set (named `<set>#<student>`)."""

    name: str
    set: str
    student: int


@dataclass(frozen=True)
class MttItem:
    """The work item that distills the MTT baseline, before its students can train."""

    name: str = "mtt#distill"


@dataclass(frozen=True)
class EvalJob:
    """What every evaluation student reads: the sets' sources, the data and the recipe."""

    artifact: str
    mtt: str | None
    buffers: str | None
    progress: bool
    train: str | None
    test: str
    pairs: int
    load: dict
    config: EvalConfig
    device: str
    out: str


def student_path(out: str | os.PathLike, name: str, k: int) -> Path:
    """Where evaluation student k of a set writes its recall."""
    return Path(out) / f"{name}.student{k}.json"


def _job_set(job: EvalJob, item: StudentItem) -> tuple[SmallSet, int]:
    """The training set of one evaluation student, built in the worker, and its pair count."""
    name = item.set
    if name in ("distilled", "mtt"):
        art = load_artifact(job.mtt if name == "mtt" else job.artifact)
        return artifact_set(art), int(art["images"].shape[0])
    art = load_artifact(job.artifact)
    train = load_pairs(job.train, **job.load)
    if name == "random":
        return random_set(art, train, job.pairs, job.config.seed, item.student), job.pairs
    return full_set(art, train), train.n_pairs


def evaluate_student(job: EvalJob, item: StudentItem) -> dict:
    """Work item: train evaluation student k of one set and write its recall.

    Student k gets the seed `evaluate_small_set` gives its k-th student, so a set's students
    spread over workers give exactly what one process gives.
    """
    small, pairs = _job_set(job, item)
    test = load_pairs(job.test, **job.load)
    result = student_recall(small, test, job.config, item.student, resolve_device(job.device))
    record = {**result, "pairs": pairs, **_recipe(job.config)}
    write_json_atomic(student_path(job.out, item.set, item.student), record)
    return {"rows": 1, "pairs": pairs}


def distill_mtt(job: EvalJob) -> dict:
    """Work item: the MTT-VL baseline of the artifact at the job's N (resumable), saved to
    job.mtt."""
    art = load_artifact(job.artifact)
    train = load_pairs(job.train, **job.load)
    buffers = load_buffers(job.buffers, tower_pins(art["config"]))
    dev = resolve_device(job.device)
    mtt_artifact(art, train, buffers, dev, job.mtt, progress=job.progress, pairs=job.pairs)
    return {"rows": 1, "pairs": job.pairs}


def evaluate_item(job: EvalJob, item: StudentItem | MttItem) -> dict:
    """Work item of either kind: the MTT distillation or one student."""
    if isinstance(item, MttItem):
        return distill_mtt(job)
    return evaluate_student(job, item)


def _recipe(config: EvalConfig) -> dict:
    """What a kept student file must have been trained with to be reused on a re-run."""
    return {"protocol": config.protocol, "epochs": config.epochs, "seed": config.seed}


def _student_done(out: Path, item: StudentItem, config: EvalConfig) -> bool:
    record = read_json_dict(student_path(out, item.set, item.student))
    return record is not None and all(record.get(k) == v for k, v in _recipe(config).items())


def collect_set(out: str | os.PathLike, name: str, num_eval: int) -> dict:
    """A set's students: R@K mean ± std, the runs, their mean R@K (and `best_on_test`)."""
    students = [json.loads(student_path(out, name, k).read_text()) for k in range(num_eval)]
    summary = summarize_students(students)
    result = {**summary.pop("summary"), "pairs": students[0]["pairs"], **summary}
    if "best_on_test" in result:
        best = result["best_on_test"]
        result["best_on_test"] = {**best.pop("summary"), **best}
    return result


def tower_pins(cfg: dict) -> dict:
    """What buffers must share with a distilled set: both towers and their starting weights."""
    keys = ("image_encoder", "text_encoder", "image_weights", "text_weights")
    return {k: cfg[k] for k in keys if k in cfg}


def _mtt_made(path: str | os.PathLike | None, art: dict, pairs: int) -> bool:
    """True when PATH holds the finished MTT baseline of ART at N pairs."""
    return path is not None and Path(path).is_file() and is_mtt_of(load_artifact(path), art, pairs)


def _check_sets(sets: Sequence[str], train: str | None) -> None:
    unknown = [s for s in sets if s != "distilled" and s not in BASELINES]
    if unknown:
        raise UsageError(f"unknown baseline {unknown[0]!r}: use {', '.join(BASELINES)}")
    baselines = [s for s in sets if s != "distilled"]
    if baselines and not train:
        raise UsageError(f"the {baselines[0]} baseline needs the real training pairs (--train)")


def run_evaluate(
    artifact: str | os.PathLike,
    test: str,
    config: EvalConfig,
    executor: Executor,
    *,
    sets: Sequence[str] = ("distilled",),
    train: str | None = None,
    pairs: int | None = None,
    cache_dir: str | os.PathLike,
    image_root: str | None = None,
    device: str = DEFAULT_DEVICE,
    out: str | os.PathLike | None = None,
    buffers: str | os.PathLike | None = None,
    mtt_out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`mmcurate evaluate`: num_eval fresh students per set (the distilled artifact and the
    baselines random, full, mtt), one work item each, last-epoch recall on the test split
    (with the paper protocol also the best epoch's, as each set's `best_on_test`).

    With `out`, every student's recall and every set's result are kept there, and finished
    students are skipped on a re-run. The MTT baseline is distilled as one more work item
    beside the other sets' students (resuming from its checkpoint), then its students run.
    """
    config.check()
    resolve_device(device)
    art = load_artifact(artifact)
    cfg = art["config"]
    train = train or cfg.get("data")
    _check_sets(sets, train)
    n = int(art["images"].shape[0]) if pairs is None else int(pairs)
    if n < 1:
        raise UsageError("--pairs must be >= 1")
    check_tower_weights(cfg, f"the distilled set {artifact}")
    arch = architecture(cfg)
    load = {
        "image_size": int(cfg["image_size"]),
        "text_encoder": str(cfg["text_encoder"]),
        "cache_dir": str(cache_dir),
        "image_root": image_root or cfg.get("image_root"),
        "device": device,
        "resize": arch["resize"],
    }
    test_pairs = load_pairs(absolute_data(test), **load)
    if test_pairs.image_size != arch["image_size"] or test_pairs.text_dim != arch["text_dim"]:
        raise UsageError(
            f"test data has {test_pairs.image_size} px images and {test_pairs.text_dim}-d "
            f"texts; the distilled set needs {arch['image_size']} px and {arch['text_dim']}-d"
        )
    train = absolute_data(train) if train else None
    if train:
        train_pairs = load_pairs(train, **load)
        if "full" in sets and train_pairs.n_pairs > FULL_BASELINE_LIMIT:
            raise UsageError(
                f"the full baseline trains with an N×N target matrix; {train_pairs.n_pairs} "
                f"pairs exceed {FULL_BASELINE_LIMIT} (drop 'full')"
            )
    mtt_buffers = str(buffers or cfg["buffers"]) if "mtt" in sets else None
    if mtt_buffers is not None:
        mtt_out = mtt_out or Path(artifact).with_name(
            Path(artifact).name.removesuffix(".pt") + f".mtt{n}.pt"
        )
        load_buffers(mtt_buffers, tower_pins(cfg))
    with ExitStack() as stack:
        work = Path(out) if out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        job = EvalJob(
            artifact=str(artifact),
            mtt=str(mtt_out) if mtt_out else None,
            buffers=mtt_buffers,
            progress=progress,
            train=train,
            test=absolute_data(test),
            pairs=n,
            load=load,
            config=config,
            device=device,
            out=str(work),
        )
        students = [
            StudentItem(f"{name}#{k}", name, k)
            for name in sorted(sets, key=lambda s: s != "full")
            for k in range(config.num_eval)
        ]
        first = [MttItem()] if "mtt" in sets and not _mtt_made(mtt_out, art, n) else []
        first += [it for it in students if it.set != "mtt"]
        outcomes, skipped = [], []
        for items in (first, [it for it in students if it.set == "mtt"]):
            if any(not o.ok for o in outcomes):
                break
            ran, kept = run_stage(
                executor,
                functools.partial(evaluate_item, job),
                items,
                is_done=lambda it: isinstance(it, StudentItem) and _student_done(work, it, config),
                desc="evaluate",
            )
            outcomes, skipped = outcomes + ran, skipped + kept
        summary = summarise(outcomes, skipped)
        results = {}
        if not summary["failed"]:
            for name in sets:
                results[name] = collect_set(work, name, config.num_eval)
                if out:
                    write_json_atomic(work / f"{name}.json", results[name])
    summary.update(
        {
            "results": results,
            "test": test,
            "num_eval": config.num_eval,
            "protocol": config.protocol,
            "pairs": n,
            "method": cfg["method"],
            "test_images": test_pairs.n_images,
            "test_pairs": test_pairs.n_pairs,
            "mtt": str(mtt_out) if "mtt" in sets else None,
        }
    )
    return summary
