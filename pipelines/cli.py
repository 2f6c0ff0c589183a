"""gradworks: list the catalogue, show a method's settings, and run, sweep or reproduce a method on Ray."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

from pipelines import console
from pipelines import pipeline as spine
from pipelines import registry
from pipelines.claims import ClaimReport
from pipelines.config import load_config
from pipelines.errors import UserError
from pipelines.results import RunDir

SETTINGS_HINT = "a method's settings, profiles, sweep space and claims: gradworks show ID"
FINISHED = {"run": "metrics.json", "reproduce": "claim.json", "sweep": "best.json"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradworks", description=__doc__, epilog=SETTINGS_HINT)
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="print every registered method")
    listing.add_argument("--by", choices=["family", "taxonomy"], default="family",
                         help="group by paper family or by the survey's taxonomy (goal × Pearl level)")

    show = sub.add_parser("show", help="print a method's settings, profiles, sweep space and claims")
    show.add_argument("method", help="method id (see: gradworks list)")

    def common(p: argparse.ArgumentParser) -> None:
        p.epilog = SETTINGS_HINT
        p.add_argument("method", help="method id (see: gradworks list)")
        p.add_argument("--config", type=Path, help="YAML file of settings")
        p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override settings (values parsed as YAML)")
        p.add_argument("--out", type=Path, help="output folder (re-use one to resume its run)")
        p.add_argument("--address", help="running Ray cluster (default: RAY_ADDRESS, else embedded local Ray)")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show Ray's own lines on the console too (they are always in <out>/ray.log)")
        p.add_argument("--force", action="store_true",
                       help="re-run a finished run into the same --out, after moving its results aside")

    common(sub.add_parser("run", help="run a method's pipeline"))
    sweep = sub.add_parser("sweep", help="Ray Tune sweep over a method's search space")
    common(sweep)
    sweep.add_argument("--space", type=Path, help="search space YAML (default: tune_spaces/<id>.yaml)")
    sweep.add_argument("--samples", type=int, default=4, help="number of trials")
    repro = sub.add_parser("reproduce", help="run a method's claim check")
    common(repro)
    repro.add_argument("--quick", action="store_true", help="tiny budget (smoke test of the claim check)")
    return parser


def _list(by: str) -> None:
    entries = list(registry.catalogue().values())
    key = (lambda e: e.family) if by == "family" else (lambda e: f"{e.goal}  [{e.pearl_level}]")
    groups = defaultdict(list)
    for entry in entries:
        groups[key(entry)].append(entry)
    done = sum(e.status == "implemented" for e in entries)
    print(f"{len(entries)} methods, {done} implemented. Taxonomy: {registry.taxonomy_source()} (editorial placement)")
    for group in sorted(groups):
        print(f"\n{group}")
        for e in groups[group]:
            place = f"{e.goal} | {e.pearl_level} | {e.stage}" if by == "family" else f"{e.family} | {e.stage}"
            label = "taxonomy" if by == "family" else "family"
            print(f"  {e.id:<21} {e.status:<11} {e.title}\n  {'':<21} {'':<11} {label}: {place}")


def _show(method_id: str) -> None:
    """The config fields (type, default, bounds, description), profiles, sweep space and claims."""
    from pipelines.sweep import default_space_path

    entry = registry.get(method_id)
    pipeline = entry.pipeline()
    print(f"{entry.id}: {entry.title}\n\nsettings (--set KEY=VALUE, or a --config YAML file):")
    for name, info in pipeline.config.model_fields.items():
        kind = (info.annotation.__name__ if type(info.annotation) is type
                else str(info.annotation).replace("typing.", ""))
        bounds = ", ".join(f"{op} {getattr(m, attr)}" for m in info.metadata
                           for attr, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")) if hasattr(m, attr))
        print(f"  {name} ({kind}) = {info.get_default(call_default_factory=True)!r}"
              f"{f'  [{bounds}]' if bounds else ''}{f'  {info.description}' if info.description else ''}")
    for profile, overrides in pipeline.profiles.items():
        print(f"\nprofile {profile} (gradworks reproduce {entry.id}{' --quick' if profile == 'quick' else ''}):")
        print("  " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "the defaults"))
    space = default_space_path(entry.id)
    if pipeline.trial is not None and space.exists():
        print(f"\nsweep space ({space.name}, metric {pipeline.sweep_metric}, {pipeline.sweep_mode}):")
        print("\n".join("  " + line for line in space.read_text().splitlines()
                        if line.strip() and not line.lstrip().startswith("#")))
    if pipeline.claims is not None:
        print(f"\nclaims (gradworks reproduce {entry.id}): {(pipeline.claims.__doc__ or '').strip()}")
    if pipeline.deviations:
        print("\ndeviations from the paper:\n" + "\n".join(f"  - {d}" for d in pipeline.deviations))


def _headline(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Scalar metrics as (dotted name, value) rows; lists and the bookkeeping keys are left out."""
    rows = []
    for key, value in metrics.items():
        if key in ("deviations", "resumed", "claims"):
            continue
        if isinstance(value, dict):
            rows += _headline(value, f"{prefix}{key}.")
        elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        else:
            rows.append((prefix + key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    return rows


def _summary(command: str, run_dir: RunDir) -> None:
    """What a finished run measured (its headline metrics or claims) and where its files are."""
    if command == "reproduce":
        print(ClaimReport.from_json(json.loads((run_dir.path / "claim.json").read_text())).table())
    elif command == "run":
        rows = _headline(json.loads((run_dir.path / "metrics.json").read_text()))
        width = max((len(name) for name, _ in rows[:30]), default=0)
        print("\n".join(f"  {name:<{width}}  {value}" for name, value in rows[:30]))
        if len(rows) > 30:
            print(f"  … {len(rows) - 30} more in metrics.json")
    plots = sorted(p.name for p in run_dir.path.glob("*.png"))
    print(f"results: {run_dir.path}" + (f"\nplots: {', '.join(plots)}" if plots else ""))


def _out_dir(args: argparse.Namespace) -> Path:
    # set by `ray job submit` for the job's driver, whose working dir is an unpacked copy on one node
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not (args.out and args.out.is_absolute()):
        raise UserError(f"inside a submitted Ray job --out must be an absolute path on storage every node "
                        f"reaches (got {str(args.out) if args.out else 'none'}); a relative one would land in "
                        f"the job's unpacked working dir")
    if args.out is not None:
        return args.out
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / args.method / f"{args.command}-{stamp}"


def _execute(args: argparse.Namespace) -> int:
    from pipelines.ray_session import ensure_ray

    entry = registry.get(args.method)
    pipeline = entry.pipeline()
    base = {}
    if args.command == "reproduce":
        base = pipeline.profiles.get("quick" if args.quick else "full", {})
        if pipeline.claims is None:
            raise UserError(f"{args.method} has no claim check yet")
    cfg = load_config(pipeline.config, args.config, args.sets, base=base)
    if args.command == "sweep":
        from pipelines.sweep import default_space_path, run_sweep

        space = args.space or default_space_path(args.method)
        if not space.exists():
            raise UserError(f"no search space at {space}")
        if args.samples < 1:
            raise UserError("--samples must be at least 1")

    run_dir = RunDir(_out_dir(args), args.method)
    if args.force and (moved := run_dir.move_aside()):
        run_dir.log(f"moved the earlier results to {moved}")
    resumed = run_dir.claim({"command": args.command, **cfg.model_dump(mode="json")})
    if resumed and (run_dir.path / FINISHED[args.command]).exists():
        run_dir.log(f"{args.command} is complete in {run_dir.path} (--force re-runs it)")
        if args.command != "sweep":
            _summary(args.command, run_dir)
        return 0
    run_dir.log(f"{'resuming' if resumed else 'writing'} {args.command} in {run_dir.path}")
    try:
        ensure_ray(args.address)
        console.route_ray_output(run_dir.path / "ray.log", args.verbose)
        started = time.time()
        if args.command == "sweep":
            summary = run_sweep(pipeline, cfg, run_dir, space_path=space, samples=args.samples,
                                verbose=args.verbose)
            run_dir.log(f"best {summary['metric']} = {summary['value']} with {summary['config']}")
            return 0
        if args.command == "run":
            metrics = spine.run(pipeline, cfg, run_dir)
        else:
            report = spine.reproduce(pipeline, cfg, run_dir)
            metrics = {"claims": report.to_json()}
        run_dir.write_json("metrics.json", {**metrics, "wall_seconds": round(time.time() - started, 1),
                                            "resumed": resumed})
        if args.command == "reproduce":  # written last: it marks the claim check finished
            run_dir.write_json("claim.json", report.to_json())
        run_dir.log(f"done: {run_dir.path}")
        _summary(args.command, run_dir)
        return 0
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:
        log = run_dir.path / "error.log"
        log.write_text(traceback.format_exc())
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"gradworks: {args.method} {args.command} failed: {type(exc).__name__}: {first} "
              f"(traceback in {log})", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            _list(args.by)
            return 0
        if args.command == "show":
            _show(args.method)
            return 0
        return _execute(args)
    except UserError as exc:
        print(f"gradworks: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        console.log_only()
        print("gradworks: interrupted; re-run with the same --out to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
