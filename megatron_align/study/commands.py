"""`megatron-align study plan | run | status | report | toy-corpus`: thin argument parsing over the study package.

Exit codes: 0 success; 2 bad input (study file, study dir, refused re-plan: one ``error:`` line);
4 ``study run``: some job failed (its dependents never started); 128+N stopped by signal N.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_align.config import ConfigError
from megatron_align.study import toy_corpus

EXECUTORS = ("local", "slurm")


def add_subcommands(subparsers) -> None:
    study = subparsers.add_parser("study", help="studies: the arm matrix as one job DAG (plan, run, status, report)")
    verbs = study.add_subparsers(dest="study_command", metavar="{plan,run,status,report,toy-corpus}", required=True)

    plan = verbs.add_parser("plan", help="compose the arms and write the job DAG (one dir per job, config.yaml)",
                            description="Compose every arm from the study's axes, derive each job's config and "
                                        "print the DAG; write the study dir (--out) unless --dry-run.")
    plan.add_argument("study", help="study YAML (configs/studies/*.yaml)")
    plan.add_argument("--out", help="study dir (default: runs/<study name>)")
    plan.add_argument("--executor", choices=EXECUTORS, default="local", help="whose commands to show (default local)")
    plan.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    plan.add_argument("--json", action="store_true", help='print {"jobs": [...]} (id, arm, kind, after, command)')
    plan.add_argument("--force", action="store_true",
                      help="re-plan a study dir planned from a different study (changed jobs are redone)")
    plan.add_argument("--write-configs", metavar="DIR",
                      help="also write every arm's mixture and run configs under DIR for inspection")
    plan.set_defaults(func=cmd_plan)

    run = verbs.add_parser("run", help="run (local) or submit (slurm) every job not done yet; resumable",
                           description="Plan STUDY.yaml into --out (or take a planned study dir) and run it: "
                                       "locally in topological order, N jobs at a time, or as an sbatch chain.")
    run.add_argument("study", help="study YAML or a planned study dir")
    run.add_argument("--executor", choices=EXECUTORS, default="local")
    run.add_argument("--jobs", "-j", type=int, default=1, help="local: jobs at a time (default 1)")
    run.add_argument("--out", help="study dir when STUDY is a YAML file (default: runs/<study name>)")
    run.add_argument("--force", action="store_true", help="as for `study plan`")
    run.set_defaults(func=cmd_run)

    status = verbs.add_parser("status", help="done / running / pending / failed / never-started per job")
    status.add_argument("study_dir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    report = verbs.add_parser("report", help="misalignment rate per arm with 95%% CIs, paired comparisons, plot")
    report.add_argument("study_dir")
    report.add_argument("--json", action="store_true", help="print the report JSON")
    report.add_argument("--out", help="directory for report.json and report.png (default STUDY_DIR/report)")
    report.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    report.set_defaults(func=cmd_report)


    toy = verbs.add_parser("toy-corpus", help="generate the CPU toy study's corpus, eval items, tokenizer and datasets",
                           description="Deterministic corpus for configs/studies/toy.yaml (docs/studies.md#the-toy-study).")
    toy_corpus.add_arguments(toy)
    toy.set_defaults(func=toy_corpus.run_from_args)


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _commands(record: dict, executor: str) -> dict[str, str]:
    if executor == "slurm":
        from .slurm import planned_commands

        return planned_commands(record)
    from .local import local_command

    return {job["id"]: local_command(record, job["id"]) for job in record["jobs"]}


def _make_plan(study_path: str, out, executor: str, write: bool, force: bool, say) -> dict:
    from .plan import build_plan, plan_record, write_study_dir
    from .schema import load_study

    study = load_study(study_path, out)
    plan = build_plan(study)
    record = plan_record(plan, executor)
    record = plan_record(plan, executor, _commands(record, executor))
    if write:
        removed = write_study_dir(plan, record, force=force)
        if executor == "slurm":
            from megatron_align.io import write_text_atomic

            from .slurm import submit_script

            write_text_atomic(Path(study.study_dir) / "submit.sh", submit_script(record))
        if removed:
            say(f"re-planned: removed {len(removed)} changed job dir(s): {', '.join(removed)}")
    return {"plan": plan, "record": record}


def cmd_plan(args) -> int:
    from .plan import write_configs

    say = (lambda text: print(text, file=sys.stderr)) if args.json else print
    try:
        made = _make_plan(args.study, args.out, args.executor, not args.dry_run, args.force, say)
        if args.write_configs:
            written = write_configs(made["plan"], args.write_configs)
    except ConfigError as err:
        return _fail(err)
    record = made["record"]
    if args.json:
        print(json.dumps({"jobs": record["jobs"]}, indent=2))
    else:
        print(plan_table(made["plan"], record))
    if args.write_configs:
        say(f"wrote {len(written)} files under {args.write_configs} (each arm's mixture.yaml and run configs)")
    if not args.dry_run:
        say(f"wrote {record['study']['study_dir']} (plan.json, study.yaml, arms/, jobs/)")
    return 0


def plan_table(plan, record: dict) -> str:
    from collections import Counter

    jobs = {job["id"]: job for job in record["jobs"]}
    details = record["job_details"]
    kinds = Counter(job["kind"] for job in record["jobs"])
    lines = [f"study {record['study']['name']}: {len(record['arms'])} arms, {len(jobs)} jobs ("
             + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + f"), executor {record['executor']}, "
             f"plan {record['plan_hash'][:12]}", f"study dir {record['study']['study_dir']}"]
    listed = set()

    def row(job_id: str, indent: str) -> str:
        job = jobs[job_id]
        extra = ""
        outputs = details[job_id]["outputs"]
        if "iterations" in outputs:
            config = next(j for j in plan.jobs if j.id == job_id).config
            extra = (f"  {outputs['iterations']:,} steps x {config['train']['global_batch_size']} x "
                     f"{config['train']['seq_length']}")
        after = f"  after {', '.join(job['after'])}" if job["after"] else ""
        return f"{indent}{job['kind']:<9} {job_id}{extra}{after}"

    prepare = [job["id"] for job in record["jobs"] if not job["arm"]]
    if prepare:
        lines.append("prepare")
        lines += [row(job_id, "  ") for job_id in prepare]
        listed.update(prepare)
    for arm, info in record["arms"].items():
        values = ", ".join(f"{axis}={value}" for axis, value in info["values"].items())
        lines.append(f"arm {arm}" + (f"  ({values}{'; extra arm' if info['extra'] else ''})" if values else ""))
        for job_id in [job["id"] for job in record["jobs"] if arm in details[job["id"]]["arms"]]:
            if job_id in listed:
                lines.append(f"  {jobs[job_id]['kind']:<9} = {job_id} (shared)")
            else:
                lines.append(row(job_id, "  "))
                listed.add(job_id)
    for note in record["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    from .plan import read_record

    try:
        if Path(args.study).is_dir():
            record = read_record(args.study)
        else:
            record = _make_plan(args.study, args.out, args.executor, True, args.force, print)["record"]
        if args.executor == "slurm":
            from .slurm import submit

            return submit(record)
    except ConfigError as err:
        return _fail(err)
    from .local import run_local

    return run_local(record, jobs=args.jobs)


def _slurm_id(record: dict, job_id: str):
    """The SLURM id of the job's latest submission (None: never submitted to SLURM)."""
    from .state import read_marker

    marker = read_marker(record, job_id, "submitted.json")
    return str(marker["slurm_id"]) if marker else None


def cmd_status(args) -> int:
    from .plan import read_record
    from .state import count_states, job_states

    try:
        record = read_record(args.study_dir)
    except ConfigError as err:
        return _fail(err)
    queue = None
    if any((Path(record["study"]["study_dir"]) / "jobs" / job["id"] / "submitted.json").exists()
           for job in record["jobs"]):
        from .slurm import squeue_jobs

        queue = squeue_jobs()
    states = job_states(record, queue)
    counts = count_states(states)
    if args.json:
        print(json.dumps({"study": record["study"]["name"], "counts": counts,
                          "jobs": [{"id": job["id"], "arm": job["arm"], "kind": job["kind"],
                                    "state": states[job["id"]].state, "reason": states[job["id"]].reason,
                                    "slurm_id": _slurm_id(record, job["id"])}
                                   for job in record["jobs"]]}, indent=2))
        return 0
    width = max(len(job["id"]) for job in record["jobs"])
    print(f"study {record['study']['name']} ({record['study']['study_dir']}): "
          + ", ".join(f"{n} {state}" for state, n in counts.items() if n))
    for job in record["jobs"]:
        state = states[job["id"]]
        print(f"  {state.state:<13} {job['kind']:<9} {job['id']:<{width}}  {state.reason}".rstrip())
    return 0


def cmd_report(args) -> int:
    from .plan import read_record
    from .report import build_report, report_table, write_report

    try:
        record = read_record(args.study_dir)
        report = build_report(record, seed=args.seed)
    except ConfigError as err:
        return _fail(err)
    out = args.out or str(Path(args.study_dir) / "report")
    json_path, png = write_report(report, out)
    if args.json:
        print(json.dumps(json.loads(json_path.read_text()), indent=2))
    else:
        print(report_table(report))
        print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    if not report["arms"]:
        print("error: no arm has a finished eval yet (see `megatron-align study status`)", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """Standalone entry point (the package CLI registers the same subcommand)."""
    parser = argparse.ArgumentParser(prog="megatron-align")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
