"""Where `select`'s rules find their columns (score files, else the store's parquet), checked
before any work, and the mask rules: string equality and DataComp's named baselines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmcurate.curate.datacomp_rules import (
    DERIVED,
    LANG_HINT,
    NAMED_NEEDS,
    Columns,
    Need,
    basic_mask,
    equals,
    is_string,
    laion2b_mask,
    text_based_mask,
)
from mmcurate.curate.image_based import ImageBased, ImageBasedConfig
from mmcurate.curate.lang import STRING_COLUMNS
from mmcurate.curate.pool import Pool, locate, sidecar_stem
from mmcurate.curate.rules import EQUALS, NAMED, NORMSIM_D, Rule
from mmcurate.errors import UsageError


@dataclass
class ColumnPlan:
    """Where each rule's columns are: the score files' metrics, the store's columns, the name
    found for each logical column, and the named rules' prepared parts."""

    metrics: list[str]
    from_store: set[str]
    cols: Columns
    matcher: Any = None
    image: ImageBased | None = None


def rule_needs(rule: Rule) -> tuple[Need, ...] | None:
    """The columns a rule reads as Needs, or None for a plain score column."""
    if rule.op == NAMED:
        return NAMED_NEEDS[rule.metric]
    if rule.metric in DERIVED:
        return DERIVED[rule.metric]
    if rule.op == EQUALS:
        metric = rule.metric
        hint = LANG_HINT.format(metric=metric) if metric in STRING_COLUMNS else "no such column"
        return (Need((metric,), hint),)
    return None


def plan_columns(
    rules: list[Rule],
    paths: list[Path],
    store: Path | None,
    wordnet: str | None,
    image: ImageBasedConfig,
) -> ColumnPlan:
    """Find every column the rules read (UsageError in one line, before work, when one is
    missing) and prepare the named rules (WordNet, centroids, targets)."""
    plan = ColumnPlan([], set(), {})
    for rule in rules:
        if rule.metric == NORMSIM_D:
            continue
        needs = rule_needs(rule)
        if needs is None:
            _, where, _ = locate(paths, store, (rule.metric,))
            (plan.from_store.add if where == "store" else plan.metrics.append)(rule.metric)
            continue
        for need in needs:
            name, where, kind = locate(paths, store, need.names)
            if not name:
                alts = f" (or {', '.join(map(repr, need.names[1:]))})" if need.names[1:] else ""
                raise UsageError(
                    f"--keep {rule.text} needs column {need.names[0]!r}{alts}: {need.hint}"
                )
            if rule.op == EQUALS and not is_string(kind):
                raise UsageError(f"--keep {rule.text} compares strings, but {name} holds {kind}")
            plan.cols[need.names[0]] = name
            (plan.from_store.add if where == "store" else plan.metrics.append)(name)
    names = {r.metric for r in rules}
    if "datacomp:text_based" in names:
        from mmcurate.curate.in21k import EntityMatcher, in21k_offsets, wordnet_reader

        plan.matcher = EntityMatcher(wordnet_reader(wordnet), in21k_offsets())
    if "datacomp:image_based" in names:
        plan.image = ImageBased(image, store, [sidecar_stem(p) for p in paths])
    plan.metrics = list(dict.fromkeys(plan.metrics))
    return plan


def mask_stage(
    rule: Rule, pool: Pool, alive: np.ndarray, plan: ColumnPlan
) -> tuple[np.ndarray, dict]:
    """A string-equality or named DataComp rule: the alive rows it keeps, and its record."""
    cols = plan.cols
    record: dict[str, Any] = {"rule": rule.text, "metric": rule.metric, "kind": "mask"}
    record["input"] = int(np.count_nonzero(alive))
    desc = f"select: {rule.text}"
    if rule.op == EQUALS:
        mask = pool.per_file(
            [cols[rule.metric]], lambda t, _: equals(t.column(0), rule.string), bool, desc
        )
        keep = alive & mask
    elif rule.metric == "datacomp:image_based":
        keep, extra = plan.image.run(pool, alive, cols)
        record.update(extra)
    else:
        masks = {
            "datacomp:basic": basic_mask,
            "datacomp:laion2b": laion2b_mask,
            "datacomp:text_based": lambda t, c: text_based_mask(t, c, plan.matcher),
        }
        columns = list(dict.fromkeys(cols[n.names[0]] for n in NAMED_NEEDS[rule.metric]))
        mask = pool.per_file(columns, lambda t, _: masks[rule.metric](t, cols), bool, desc)
        keep = alive & mask
    record["count"] = int(np.count_nonzero(keep))
    return keep, record
