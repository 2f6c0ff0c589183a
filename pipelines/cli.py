"""``gradworks``: list the catalogue, and run, sweep or reproduce a method on Ray."""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

from pipelines import pipeline as spine
from pipelines import registry
from pipelines.config import load_config
from pipelines.errors import UserError
from pipelines.results import RunDir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradworks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="print every registered method")
    listing.add_argument("--by", choices=["family", "taxonomy"], default="family",
                         help="group by paper family or by the survey's taxonomy (goal × Pearl level)")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("method", help="method id (see `gradworks list`)")
        p.add_argument("--config", type=Path, help="YAML file of settings")
        p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override settings (values parsed as YAML)")
        p.add_argument("--out", type=Path, help="output folder (re-use one to resume its run)")
        p.add_argument("--address", help="running Ray cluster (default: RAY_ADDRESS, else embedded local Ray)")

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
            print(f"  {e.id:<21} {e.status:<11} {e.title}\n  {'':<21} {'':<11} taxonomy: {place}")


def _out_dir(args: argparse.Namespace) -> Path:
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
    resumed = run_dir.claim({"command": args.command, **cfg.model_dump(mode="json")})
    run_dir.log(f"{'resuming' if resumed else 'writing'} {args.command} in {run_dir.path}")
    try:
        ensure_ray(args.address)
        started = time.time()
        if args.command == "sweep":
            summary = run_sweep(pipeline, cfg, run_dir, space_path=space, samples=args.samples)
            run_dir.log(f"best {summary['metric']} = {summary['value']} with {summary['config']}")
            return 0
        if args.command == "run":
            metrics = spine.run(pipeline, cfg, run_dir)
        else:
            report = spine.reproduce(pipeline, cfg, run_dir)
            run_dir.write_json("claim.json", report.to_json())
            metrics = {"claims": report.to_json()}
            print(report.table())
        run_dir.write_json("metrics.json", {**metrics, "wall_seconds": round(time.time() - started, 1),
                                            "resumed": resumed})
        run_dir.log(f"done: {run_dir.path}")
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
        return _execute(args)
    except UserError as exc:
        print(f"gradworks: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gradworks: interrupted; re-run with the same --out to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
