"""Settings of the `score` stage: the user's `ScoreConfig` (every default, once) and the
`ScoreJob` it resolves to (metrics, exponents, τ and the target checked before any work)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from mmcurate.curate.centroids import CENTROID, load_centroids
from mmcurate.curate.dedup_plan import DedupConfig, check_config
from mmcurate.curate.lang import (
    LANG,
    LANG_COLUMNS,
    LANG_METRICS,
    check_model,
    file_sha256,
    model_path,
)
from mmcurate.curate.precision import PRECISIONS, resolve_precision
from mmcurate.curate.targets import cached_target
from mmcurate.data.store import detect_keys, store_logit_scale
from mmcurate.embed import DEFAULT_DEVICE, check_device_name
from mmcurate.errors import UsageError

METRICS = ("clipscore", "negclip", "normsim", "semdedup", CENTROID, *LANG_METRICS)
INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_TAU = 0.01


@dataclass(frozen=True)
class ScoreConfig:
    """Options of `mmcurate score`; empty `metrics` means clipscore and negclip (+ normsim with a
    target), empty `p` means ∞, a None `temperature` means 1/logit_scale of the store, else 0.01,
    and None npz keys are detected (`data.store.detect_keys`)."""

    metrics: tuple[str, ...] = ()
    p: tuple[str, ...] = ()
    target: tuple[str, ...] = ()
    temperature: float | None = None
    batch_size: int = 32768
    k: int = 10
    window: int = 1_048_576
    seed: int = 0
    img_key: str | None = None
    txt_key: str | None = None
    normsim_index: str = "flat"
    device: str = DEFAULT_DEVICE
    precision: str | None = None
    clusters: int | None = DedupConfig.clusters
    dedup_keep: str = DedupConfig.keep
    dedup_train: int = DedupConfig.train
    lang_model: str | None = None
    centroids: str | None = None

    def dedup(self) -> DedupConfig:
        """The SemDeDup settings these options give (the seed is the score seed)."""
        return DedupConfig(
            clusters=self.clusters, keep=self.dedup_keep, train=self.dedup_train, seed=self.seed
        )


@dataclass(frozen=True)
class ScoreJob:
    """Everything a window's scores depend on, plus where to read and write."""

    store: str
    out: str
    metrics: tuple[str, ...]
    ps: tuple[float, ...]
    tau: float
    tau_source: str
    batch_size: int
    k: int
    window: int
    seed: int
    img_key: str | None
    txt_key: str | None
    targets: tuple[str, ...]
    target_shape: tuple[int, int] | None
    normsim_index: str
    device: str
    precision: str
    columns: tuple[str, ...]
    dedup: DedupConfig | None = None
    dedup_key: str | None = None
    lang_model: str | None = None
    lang_model_sha256: str | None = None
    centroids: str | None = None
    centroids_sha256: str | None = None

    @property
    def keys(self) -> list[str]:
        """The npz arrays a row needs, image first: a row invalid in any of them is skipped
        (none when only caption metrics run)."""
        if not needs_embeddings(self.metrics):
            return []
        return [self.img_key] + ([self.txt_key] if needs_text(self.metrics) else [])

    @property
    def lang_metrics(self) -> tuple[str, ...]:
        """The caption metrics of this run (lang, lang_cld3)."""
        return tuple(m for m in self.metrics if m in LANG_METRICS)

    @property
    def dedup_dir(self) -> Path:
        """Where SemDeDup keeps its resumable intermediate files."""
        return Path(self.out) / ".semdedup"

    def signature(self) -> dict:
        """The settings a done marker must match for its stem to count as done."""
        sig = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("out", "tau_source", "device", "lang_model", "centroids")
        }
        sig["store"] = str(Path(self.store).resolve())
        sig["ps"] = [normsim_column(p) for p in self.ps]
        for key in ("lang_model_sha256", "centroids_sha256"):
            if sig[key] is None:
                del sig[key]  # runs without these metrics keep their signature
        return json.loads(json.dumps(sig))


def needs_text(metrics: tuple[str, ...] | list[str]) -> bool:
    """Whether the metrics read caption embeddings (clipscore and negclip do)."""
    return "clipscore" in metrics or "negclip" in metrics


def needs_embeddings(metrics: tuple[str, ...] | list[str]) -> bool:
    """Whether any metric reads embeddings (all but the caption metrics do)."""
    return any(m not in LANG_METRICS for m in metrics)


def parse_p(text: str | float) -> float:
    """A NormSim exponent: a float > 0 or inf."""
    try:
        p = float(text)
    except ValueError:
        raise UsageError(f"--p must be a number > 0 or inf, got {text!r}") from None
    if not p > 0:
        raise UsageError(f"--p must be a number > 0 or inf, got {text!r}")
    return p


def normsim_column(p: float) -> str:
    """Sidecar column of NormSim_p: normsim_2, normsim_inf, normsim_3, normsim_2.5."""
    return "normsim_inf" if math.isinf(p) else f"normsim_{p:g}"


def _check_options(store: str, out: str, config: ScoreConfig) -> None:
    if not Path(store).is_dir():
        raise UsageError(f"store directory not found: {store}")
    if Path(out).resolve() == Path(store).resolve():
        raise UsageError("--out must differ from the store directory")
    for name in ("batch_size", "k", "window"):
        value = getattr(config, name)
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    temperature = config.temperature
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    unknown = [m for m in config.metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {unknown}: use {', '.join(METRICS)}")
    check_device_name(config.device)
    if "semdedup" in config.metrics:
        check_config(config.dedup())
    if config.precision is not None and config.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if config.normsim_index not in INDEX_KINDS:
        raise UsageError(f"--normsim-index must be flat, ivf or hnsw, got {config.normsim_index!r}")


def _temperature(store: str, config: ScoreConfig) -> tuple[float, str]:
    if config.temperature is not None:
        return float(config.temperature), "--temperature"
    scale = store_logit_scale(store)
    if scale:
        return 1.0 / scale, f"1/logit_scale recorded in the store ({scale:g})"
    return DEFAULT_TAU, "default"


def task_precision(requested: str | None, task_device: str) -> str:
    """The negclip precision on the tasks' device type; a fallback is warned about in one line."""
    import torch

    dev = torch.device(task_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        return requested or "tf32"  # the tasks' GPUs are on other nodes: they check it there
    precision, note = resolve_precision(requested, dev)
    if note:
        warnings.warn(note, stacklevel=2)
    return precision


def resolve_score(store: str, out: str, config: ScoreConfig, task_device: str = "cpu") -> ScoreJob:
    """Validate options (UsageError before any work) and resolve defaults: metrics, p, τ, and
    the negclip precision on `task_device` (cpu or cuda, where the work items will run)."""
    _check_options(store, out, config)
    targets = tuple(config.target)
    chosen = list(dict.fromkeys(config.metrics))
    if not chosen:
        chosen = ["clipscore", "negclip"] + (["normsim"] if targets else [])
    if "normsim" in chosen and not targets:
        raise UsageError("--metric normsim needs --target PATH")
    parsed = tuple(dict.fromkeys(parse_p(p) for p in config.p)) or (math.inf,)
    if "normsim" not in chosen and (targets or config.p):
        warnings.warn("--target and --p are ignored without --metric normsim", stacklevel=2)
    need_txt = needs_text(chosen)
    img_key, txt_key = config.img_key, config.txt_key
    embeds = needs_embeddings(chosen)
    if embeds and (img_key is None or (need_txt and txt_key is None)):
        found_img, found_txt = detect_keys(store, need_txt)
        img_key, txt_key = img_key or found_img, txt_key or found_txt
    target_paths: tuple[str, ...] = ()
    target_shape = None
    if "normsim" in chosen:
        for t in targets:
            if not Path(t).exists():
                raise UsageError(f"target file not found: {t}")
        target_paths = tuple(str(Path(t).resolve()) for t in targets)
        target_shape = tuple(cached_target(target_paths, img_key).shape)
    tau, source = _temperature(store, config)
    columns = [m for m in ("clipscore", "negclip") if m in chosen]
    if "normsim" in chosen:
        columns += [normsim_column(p) for p in parsed]
    if "semdedup" in chosen:
        columns.append("semdedup")
    for metric in LANG_METRICS:
        if metric in chosen:
            columns += LANG_COLUMNS[metric]
    centroids = None
    if CENTROID in chosen:
        if config.centroids is None:
            raise UsageError("--metric centroid needs --centroids (e.g. medium_centroids_l14.pt)")
        load_centroids(config.centroids)
        centroids = str(Path(config.centroids).resolve())
        columns.append(CENTROID)
    lang_model = None
    if LANG in chosen:
        lang_model = str(model_path(config.lang_model).resolve())
        check_model(lang_model)
    return ScoreJob(
        store=str(store),
        out=str(out),
        metrics=tuple(chosen),
        ps=parsed if "normsim" in chosen else (),
        tau=tau if "negclip" in chosen else DEFAULT_TAU,
        tau_source=source if "negclip" in chosen else "unused",
        batch_size=int(config.batch_size),
        k=int(config.k),
        window=int(config.window) if embeds else 1,
        seed=int(config.seed),
        img_key=img_key,
        txt_key=txt_key,
        targets=target_paths,
        target_shape=target_shape,
        normsim_index=config.normsim_index,
        device=config.device,
        precision=task_precision(config.precision, task_device) if "negclip" in chosen else "fp32",
        columns=tuple(columns),
        dedup=config.dedup() if "semdedup" in chosen else None,
        lang_model=lang_model,
        lang_model_sha256=file_sha256(lang_model) if lang_model else None,
        centroids=centroids,
        centroids_sha256=file_sha256(centroids) if centroids else None,
    )
