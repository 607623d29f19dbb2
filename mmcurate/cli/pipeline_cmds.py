"""`mmcurate pipeline CONFIG.toml` and `mmcurate demo`: the resumable select-then-distill run."""

from __future__ import annotations

import click

from mmcurate.data.atomic import write_json_atomic
from mmcurate.pipeline import STAGES, load_plan, run_pipeline


@click.command("pipeline")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--from",
    "start",
    type=click.Choice(STAGES),
    default=None,
    help="Re-run from this stage on (earlier stages must have finished with this config).",
)
@click.option("--until", type=click.Choice(STAGES), default=None, help="Stop after this stage.")
@click.option("--workers", type=int, default=None, help="Override the config's workers.")
@click.option("--device", default=None, help="Override the config's device (auto, cpu, cuda).")
@click.option("--json", "json_path", default=None, help="Write the end summary as JSON.")
def pipeline(config, start, until, workers, device, json_path) -> None:
    """Run embed → score → select → reshard → buffer → distill → evaluate from CONFIG.toml.

    Stages whose settings and inputs are unchanged since they finished are skipped; a changed
    stage re-runs with everything after it; an interrupted stage resumes its unfinished work.
    """
    from mmcurate.engine import pin_threads, resolve_threads

    plan = load_plan(config, {"workers": workers, "device": device})
    pin_threads(resolve_threads(plan.settings["threads"], 1))  # in-process steps: every core
    report = run_pipeline(plan, start=start, until=until)
    click.echo(f"\nmmcurate pipeline: {plan.config_path} -> {plan.out}")
    for stage, entry in report.items():
        seconds = f" in {entry['seconds']:.1f} s" if "seconds" in entry else ""
        click.echo(f"  {stage:<9} {entry['status']}{seconds}  ({entry['hash'][:12]})")
    results = (report.get("evaluate", {}).get("summary") or {}).get("results") or {}
    for name, entry in results.items():
        recalls = "  ".join(
            f"{k} {entry[k]['mean']:.1f}"
            for k in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")
        )
        click.echo(f"  {name:<9} {recalls}")
    if json_path:
        write_json_atomic(
            json_path,
            {
                "out": str(plan.out),
                "stages": {
                    k: {"status": v["status"], "hash": v["hash"], "summary": v["summary"]}
                    for k, v in report.items()
                },
            },
        )


@click.command("demo")
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the corpus, the run, report.html and summary.json go.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--size",
    "scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Scale every split and budget (0.2 is a quick smoke run; figures get noisier).",
)
@click.option(
    "--regime",
    type=click.Choice(["pretrained", "scratch"]),
    default="pretrained",
    show_default=True,
    help="Student towers: pretrained apart on the clean split (the reference's) or from scratch.",
)
@click.option("--json", "json_path", default=None, help="Also write summary.json here.")
def demo(out, seed, scale, regime, json_path) -> None:
    """The whole pipeline on the built-in corpus with injected faults, offline on CPU."""
    from mmcurate.demo.report import terminal_table
    from mmcurate.demo.run import run_demo
    from mmcurate.engine import pin_threads

    pin_threads(1)  # as every demo process (DemoPlan.threads), so its figures match anywhere
    parts = ["mmcurate demo", f"--out {out}"]
    if seed:
        parts.append(f"--seed {seed}")
    if scale != 1.0:
        parts.append(f"--size {scale:g}")
    if regime != "pretrained":
        parts.append(f"--regime {regime}")
    summary = run_demo(out, scale=scale, seed=seed, regime=regime, command=" ".join(parts))
    click.echo("\n" + terminal_table(summary))
    click.echo(
        f"\nmmcurate demo: seed {seed}, {summary['seconds']:.0f} s; report {summary['report']}, "
        f"summary {out}/summary.json"
    )
    if json_path:
        write_json_atomic(json_path, summary)
