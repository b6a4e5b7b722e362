"""`lambdafutures deploy | status | destroy | gc`: the command line.

    lambdafutures deploy [--name N] [--region R] [--profile P] [--memory MB] [--timeout S]
                         [--architecture arm64|x86_64] [--requirements FILE | --layer-zip FILE
                         | --requirements-from-env NAME... | --no-layer]
                         [--reserved-concurrency N|none] ...
    lambdafutures status                 exit 0 when everything exists and matches, else 1
    lambdafutures destroy [--yes]        removes what deploy made, then the config file; a
                                         bucket, queue or role that existed before is kept
    lambdafutures gc [--stale-after MINUTES] [--older-than HOURS] [--dry-run]

A re-run of `deploy` keeps the previous deployment's settings (read from the config file)
unless a flag changes them, so `lambdafutures deploy` alone updates code and nothing else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ..config import config_path, load_deployment, save_deployment
from . import environment, runtimes, stack
from . import layer as layers
from .aws import Aws
from .functions import Function
from .gc import collect
from .spec import DEFAULT_NAME, Deployment, Settings, settings_from_config
from .storage import queues_with_prefix

log = logging.getLogger("lambdafutures")


# -- output ---------------------------------------------------------------------------------

def _say(text: str) -> None:
    print(text, flush=True)


def _report(kind: str, name: str, status: str, notes: list[str]) -> None:
    line = f"  {kind:<13} {name:<46} {status}"
    _say(line + (f" ({'; '.join(notes)})" if notes else ""))


def _progress(message: str) -> None:
    _say(f"    ... {message}")


# -- arguments ------------------------------------------------------------------------------

def _reserved(value: str) -> int | str:
    if value.lower() == "none":
        return "none"
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be a positive integer or 'none'")
    return number


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lambdafutures",
                                  description="Deploy and manage lambdafutures on AWS Lambda.")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    commands = top.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--name", help=f"deployment name (default: the config's, else "
                                        f"{DEFAULT_NAME!r})")
        sub.add_argument("--region", help="AWS region (default: the config's, else boto3's)")
        sub.add_argument("--profile", help="AWS profile (default: the config's, else boto3's)")

    deploy = commands.add_parser(
        "deploy", help="create or update the deployment",
        description="Create or update the deployment and write the config file that "
                    "LambdaExecutor() reads. Flags left out keep the values of the deployment "
                    "in the config file (same name), else the defaults shown.")
    common(deploy)
    deploy.add_argument("--bucket", help="bucket name (default {name}-{account}-{region})")
    deploy.add_argument("--memory", type=int, dest="memory_mb", metavar="MB",
                        help="function memory (default 2048)")
    deploy.add_argument("--timeout", type=int, metavar="SECONDS",
                        help="function timeout (default 900)")
    deploy.add_argument("--architecture", choices=["arm64", "x86_64"],
                        help="default arm64")
    deploy.add_argument("--max-event-age", type=int, metavar="SECONDS",
                        help="how long an async invoke may wait before it goes to the "
                             "failure queue (default 21600)")
    deploy.add_argument("--object-expiry-days", type=int, metavar="DAYS",
                        help="lifecycle expiry of task objects (default 1)")
    deploy.add_argument("--log-retention-days", type=int, metavar="DAYS",
                        help="function log retention (default 14)")
    deploy.add_argument("--failure-retention", type=int, metavar="SECONDS",
                        help="how long the failure queue keeps Lambda's failure records, "
                             "which hold the tasks' arguments (default 3600)")
    deploy.add_argument("--reserved-concurrency", type=_reserved, metavar="N|none",
                        help="reserve concurrency for the function (default none)")
    source = deploy.add_mutually_exclusive_group()
    source.add_argument("--requirements", type=Path, metavar="FILE",
                        help="requirements for the dependency layer (default: numpy)")
    source.add_argument("--layer-zip", type=Path, metavar="FILE",
                        help="a layer zip built elsewhere (python/... inside)")
    source.add_argument("--requirements-from-env", nargs="+", metavar="NAME",
                        help="a layer of these packages at this host's installed versions")
    source.add_argument("--no-layer", action="store_true", help="no dependency layer")
    deploy.add_argument("--ignore-runtime-dates", action="store_true",
                        help="skip the check of Lambda's runtime deprecation and block dates "
                             "(for endpoints that are not Lambda: moto, LocalStack)")

    status = commands.add_parser("status", help="show what exists and whether it matches")
    common(status)

    destroy = commands.add_parser("destroy", help="remove everything deploy made")
    common(destroy)
    destroy.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    gc = commands.add_parser(
        "gc", help="remove the queues and task objects of executors that stopped",
        description="Remove the completion queues, and the objects under "
                    "{prefix}/{executor id}/, of executors whose heartbeat stopped. Executors "
                    "that still beat are never touched, however old.")
    common(gc)
    gc.add_argument("--stale-after", type=float, default=10.0, metavar="MINUTES",
                    help="a heartbeat older than this means the executor stopped (default 10)")
    gc.add_argument("--older-than", type=float, default=24.0, metavar="HOURS",
                    help="age threshold for queues without a heartbeat, made by executors "
                         "from before heartbeats (default 24)")
    gc.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    return top


# -- settings -------------------------------------------------------------------------------

_SETTING_FLAGS = ("bucket", "memory_mb", "timeout", "architecture", "max_event_age",
                  "object_expiry_days", "log_retention_days", "failure_retention")


def _previous(args: argparse.Namespace) -> dict[str, Any] | None:
    """The config file's deployment, when it is the one these arguments name."""
    config = load_deployment()
    if config and args.name in (None, config.get("name")):
        return config
    return None


def _aws(args: argparse.Namespace, previous: dict[str, Any] | None) -> Aws:
    previous = previous or {}
    return Aws(profile=args.profile or previous.get("profile"),
               region=args.region or previous.get("region"))


def _settings(args: argparse.Namespace, previous: dict[str, Any] | None, aws: Aws) -> Settings:
    values: dict[str, Any] = settings_from_config(previous) if previous else {}
    values["name"] = args.name or values.get("name") or DEFAULT_NAME
    values["region"] = aws.region
    values["profile"] = args.profile or values.get("profile")
    for flag in _SETTING_FLAGS:
        if getattr(args, flag, None) is not None:
            values[flag] = getattr(args, flag)
    reserved = getattr(args, "reserved_concurrency", None)
    if reserved is not None:
        values["reserved_concurrency"] = None if reserved == "none" else reserved
    return Settings(**values)


def _layer_source(args: argparse.Namespace, previous: dict[str, Any] | None,
                  deployment: Deployment) -> layers.LayerSource | None:
    arch, python = deployment.settings.architecture, deployment.python
    if args.no_layer:
        return None
    if args.layer_zip:
        return layers.from_zip(args.layer_zip.read_bytes(), label=args.layer_zip.name)
    if args.requirements:
        return layers.from_requirements(args.requirements.read_text(), arch, python)
    if args.requirements_from_env:
        return layers.from_host_packages(args.requirements_from_env, arch, python)
    if previous and "layer_source" in previous:
        record = previous["layer_source"]
        return layers.from_record(record, arch, python) if record else None
    return layers.from_requirements(layers.DEFAULT_REQUIREMENTS, arch, python)


def _target(args: argparse.Namespace) -> tuple[Aws, Deployment, dict[str, Any] | None]:
    """The deployment status/destroy/gc act on: the config file's, or one named by --name
    (default settings) when there is no config for it."""
    previous = _previous(args)
    if previous is None and args.name is None:
        raise LookupError(f"no deployment config at {config_path()}; pass --name (and "
                          "--region) to name a deployment")
    aws = _aws(args, previous)
    if previous is not None:
        return aws, stack.deployment_from_config(aws, previous), previous
    settings = Settings(name=args.name, region=aws.region, profile=args.profile)
    return aws, stack.bind(aws, settings), None


# -- commands -------------------------------------------------------------------------------

def cmd_deploy(args: argparse.Namespace) -> int:
    started = time.monotonic()
    previous = _previous(args)
    aws = _aws(args, previous)
    deployment = stack.bind(aws, _settings(args, previous, aws))
    # Before anything is made: Lambda would refuse a blocked runtime only at the function.
    if not args.ignore_runtime_dates:
        deployed = Function(aws, deployment, b"", None).deployed_runtime()
        for warning in runtimes.check(deployment.python, runtimes.today(),
                                      deployed_runtime=deployed):
            _say(f"warning: {warning}")
    source = _layer_source(args, previous, deployment)
    s = deployment.settings
    _say(f"deploying {deployment.name!r} to account {deployment.account_id}, {deployment.region}"
         f" ({deployment.runtime}, {s.architecture}, {s.memory_mb} MB, {s.timeout} s)")
    config = stack.deploy(aws, deployment, source, _report, _progress)
    config.update(environment.record(source, config, previous))
    for line in environment.describe(config, only_differences=True):
        _say(line)
    replaced = load_deployment()
    path = save_deployment(config)
    if replaced and replaced.get("name") != config["name"]:
        _say(f"note: the config named deployment {replaced.get('name')!r} before; "
             "that deployment still exists")
    _say(f"config written to {path} ({time.monotonic() - started:.1f} s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    aws, deployment, config = _target(args)
    _say(f"deployment {deployment.name!r} in account {deployment.account_id}, "
         f"{deployment.region} (config: {config_path() if config else 'none'})")
    good = True
    for kind, name, state in stack.inspect(aws, deployment, config):
        if not state.exists:
            status, notes = "MISSING", []
        elif state.differences:
            status, notes = "DIFFERS", state.differences
        else:
            status, notes = "ok", [state.detail] if state.detail in stack.SHOWN_DETAILS else []
        good = good and state.ok
        shown = state.detail.split(":layer:")[-1] if ":layer:" in state.detail else name
        _report(kind, shown, status, notes)
    leftovers = queues_with_prefix(aws, deployment.queue_prefix)
    live = sum(stack.was_alive(aws, url) for url in leftovers)
    _say(f"  executor queues: {len(leftovers)}, {live} with a live heartbeat (gc removes "
         "those whose heartbeat stopped)")
    if config is None:
        _say("  no config file for this deployment: run `lambdafutures deploy`")
        good = False
    else:
        _say(f"  {runtimes.status_line(deployment.python, runtimes.today())}")
        for line in environment.describe(config):
            _say(f"  {line}")
    _say("all good" if good else "not all good: run `lambdafutures deploy` to fix")
    return 0 if good else 1


def cmd_destroy(args: argparse.Namespace) -> int:
    aws, deployment, config = _target(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise LookupError("destroy needs --yes when not run interactively")
        answer = input(f"delete deployment {deployment.name!r} (its objects under "
                       f"{deployment.bucket}/{deployment.prefix}/, the bucket if deploy made "
                       "it and nothing else is in it, function, queues, role, layer)? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            _say("nothing deleted")
            return 1
    _say(f"destroying {deployment.name!r} in account {deployment.account_id}, "
         f"{deployment.region}")
    stack.destroy(aws, deployment, _report, _progress)
    current = load_deployment()
    if current and current.get("name") == deployment.name:
        os.remove(config_path())
        _say(f"removed {config_path()}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    aws, deployment, _ = _target(args)
    result = collect(aws, deployment, args.older_than * 3600,
                     stale_after_s=args.stale_after * 60, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    _say(f"gc {deployment.name!r} (heartbeat older than {args.stale_after:g} min, or no "
         f"heartbeat and older than {args.older_than:g} h): {verb} "
         f"{len(result.queues)} executor queue(s) and {result.objects} task object(s); kept "
         f"{result.queues_kept} queue(s) and {result.objects_kept} object(s)")
    return 0


COMMANDS = {"deploy": cmd_deploy, "status": cmd_status, "destroy": cmd_destroy, "gc": cmd_gc}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        log.setLevel(logging.DEBUG)
    try:
        return COMMANDS[args.command](args)
    except (ClientError, BotoCoreError, ValueError, LookupError, RuntimeError, OSError) as exc:
        if args.verbose:
            raise
        print(f"lambdafutures {args.command}: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
