"""Command line: `python -m personalize_client run WORKFLOW.json --server URL [--set NODE.INPUT=VALUE ...]`.

Exit codes: 0 success, 1 the run failed (the node's error is printed), 2 bad arguments or workflow,
3 the server refused or could not be reached, 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .api import ComfyClient, PromptRejected, ServerError
from .convert import (
    WorkflowError,
    apply_override,
    is_api_format,
    is_ui_format,
    node_titles,
    parse_value,
    sweep_grid,
    ui_to_api,
)
from .runner import ProgressBar, results_table, run_prompt, run_sweep, save_results

EXIT_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_INTERRUPTED = 1, 2, 3, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m personalize_client",
                                     description="Queue ComfyUI workflows headless, follow them, download their outputs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow (UI or API format) once, or a sweep over several servers")
    run.add_argument("workflow", type=Path, help="workflow JSON: the editor's Save (UI) or Export (API) format")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI server URL")
    where.add_argument("--servers", default="", help="comma-separated server URLs to fan sweep runs over")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="change an input (NODE: id, title or class type; VALUE: JSON or text); repeatable")
    run.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="INPUT=V1,V2",
                     help="run every combination of these values (INPUT or NODE.INPUT); repeatable")
    run.add_argument("--out", type=Path, default=Path("personalize_outputs"), help="folder for downloads and results")
    run.add_argument("--no-download", action="store_true", help="do not download output files")
    run.add_argument("--timeout", type=float, default=24 * 3600, help="seconds to wait for each run")
    convert = sub.add_parser("convert", help="print the API format of a UI-format workflow")
    convert.add_argument("workflow", type=Path)
    convert.add_argument("--server", default="http://127.0.0.1:8188", help="server whose /object_info to use")
    return parser


def _split_assignment(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise WorkflowError(f"`{flag} {text}` must look like NAME=VALUE.")
    name, value = text.split("=", 1)
    return name.strip(), value


def load_prompt(path: Path, client: ComfyClient) -> tuple[dict, dict, dict | None]:
    """(API prompt, titles, object_info or None) of a workflow file in either format."""
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"cannot read workflow {str(path)!r}: {exc}") from exc
    titles = node_titles(workflow)
    if is_ui_format(workflow):
        object_info = client.object_info()
        return ui_to_api(workflow, object_info), titles, object_info
    if is_api_format(workflow):
        return {k: v for k, v in workflow.items() if not k.startswith("_")}, titles, None
    raise WorkflowError(f"{path.name} is neither a UI-format nor an API-format ComfyUI workflow.")


def _with_overrides(prompt: dict, overrides: dict, titles: dict, object_info) -> dict:
    prompt = json.loads(json.dumps(prompt))
    for target, value in overrides.items():
        apply_override(prompt, target, value, titles, object_info)
    return prompt


def cmd_run(args) -> int:
    servers = [s for s in args.servers.split(",") if s.strip()] if args.servers else [args.server]
    client = ComfyClient(servers[0])
    prompt, titles, object_info = load_prompt(args.workflow, client)
    sets = dict(_split_assignment(s, "--set") for s in args.sets)
    prompt = _with_overrides(prompt, {k: parse_value(v) for k, v in sets.items()}, titles, object_info)
    sweeps = []
    for text in args.sweeps:
        name, values = _split_assignment(text, "--sweep")
        sweeps.append((name, [parse_value(v.strip()) for v in values.split(",") if v.strip()]))
    out_dir = None if args.no_download else args.out
    if not sweeps and len(servers) == 1:
        result = run_prompt(client, prompt, out_dir=out_dir, timeout=args.timeout, bar=ProgressBar(),
                            on_queued=lambda pid: print(f"queued {pid} on {client.url}", file=sys.stderr, flush=True))
        for line in result.texts:
            print(line)
        for path in result.files:
            print(f"downloaded {path}")
        if not result.ok:
            print(f"error: {result.error}", file=sys.stderr)
            return EXIT_INTERRUPTED if result.status == "interrupted" else EXIT_FAILED
        print(f"done in {result.seconds:.1f} s" + (f", final loss {result.final_loss:.5f}" if result.final_loss is not None else ""))
        return 0
    runs = [(params, _with_overrides(prompt, params, titles, object_info)) for params in sweep_grid(sweeps)]
    results = run_sweep(servers, runs, out_dir=out_dir, timeout=args.timeout, log=lambda m: print(m, file=sys.stderr))
    print(results_table(results))
    for path in save_results(results, args.out):
        print(f"saved {path}")
    return 0 if all(r.ok for r in results) else EXIT_FAILED


def cmd_convert(args) -> int:
    client = ComfyClient(args.server)
    prompt, _, _ = load_prompt(args.workflow, client)
    print(json.dumps(prompt, indent=1))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "convert": cmd_convert}[args.command](args)
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PromptRejected as exc:
        print(f"error: the server refused the workflow:\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        print("\ninterrupted: the prompt was stopped on the server.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
