"""The MPO trainer end to end on tiny random models: run dir contents, mesh vs one device,
SIGKILL + resume equality, SIGTERM, and configuration errors raised before anything compiles."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny import fixture_data_dir

from mpo_jax.compilation import count_compilations
from mpo_jax.config import ConfigError, load_config
from mpo_jax.metrics import read_metrics
from mpo_jax.rubric import RubricHistory

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"
# 3 updates, a meta step after update 2, a checkpoint after every update.
FAST = ["--config.num_updates=3", "--config.meta.interval=2", "--config.rollout.max_new_tokens=8",
        "--config.policy.tiny_hidden_size=32", "--config.judge.model.tiny_hidden_size=32",
        "--config.data.batch_size=8", "--config.checkpoint.every=1", "--config.checkpoint.keep=5",
        "--config.meta.analysis_tokens=8", "--config.meta.item_tokens=6"]
COMPARED = ("score/mean", "objective/kl", "loss/policy_avg", "loss/value_avg", "response/length_mean",
            "rubric/iteration", "policy/approxkl_avg")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    FAST.append(f"--config.data.data_dir={fixture_data_dir(tmp_path_factory.mktemp('data'))}")
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MPO_JAX_CACHE")
    os.environ["MPO_JAX_CACHE"] = str(cache)
    yield {"MPO_JAX_CACHE": str(cache)}
    if old is None:
        os.environ.pop("MPO_JAX_CACHE", None)
    else:
        os.environ["MPO_JAX_CACHE"] = old


def run_in_process(run_dir: Path, *extra: str):
    from mpo_jax.trainer import Trainer

    trainer = Trainer(load_config(TINY, [*FAST, f"--config.run_dir={run_dir}", *extra]))
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache_env):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_in_process(run_dir)
    return run_dir


def metrics_by_update(run_dir: Path) -> dict[int, dict]:
    return {int(m["update"]): m for m in read_metrics(run_dir)}


def test_run_directory_holds_every_artifact(reference_run):
    run = reference_run
    assert (run / "config.json").is_file() and json.loads((run / "config.json").read_text())["num_updates"] == 3
    metrics = metrics_by_update(run)
    assert sorted(metrics) == [1, 2, 3]
    assert metrics[2].get("meta/step") == 1.0 and not metrics[1].get("meta/step")
    for name in ("objective/kl", "score/mean", "response/eos_rate", "time/judge_s", "rubric/iteration"):
        assert np.isfinite(metrics[3][name]), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "meta_evaluation_2.json").is_file()
    history = RubricHistory.load(run)
    assert (run / "rubric_iter_0.txt").is_file()
    # the meta step either installed iteration 1 or logged why it kept iteration 0
    assert len(history.events) == 2 and history.events[1].created_step == 2
    assert metrics[3]["rubric/iteration"] == history.current.iteration
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["update"] for r in rollouts}) == [1, 2, 3]
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]
    assert (run / "report" / "report.html").is_file()


def test_a_two_by_two_by_two_mesh_matches_one_device(reference_run, tmp_path, cache_env):
    run_in_process(tmp_path / "mesh", "--config.mesh=(2, 2, 2)", "--config.log.report=false")
    one, mesh = metrics_by_update(reference_run), metrics_by_update(tmp_path / "mesh")
    for update in (1, 2, 3):
        for name in COMPARED:
            assert mesh[update][name] == pytest.approx(one[update][name], rel=2e-3, abs=2e-4), (update, name)


CHILD = textwrap.dedent("""
    import os, signal, sys
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from mpo_jax.config import load_config
    from mpo_jax.trainer import Trainer
    mode, config_path, *overrides = sys.argv[1:]
    trainer = Trainer(load_config(config_path, overrides))
    if mode == "kill-after-checkpoint-2":
        save = trainer.checkpointer.save
        def save_then_die(update, *args, **kwargs):
            saved = save(update, *args, **kwargs)
            if update == 2:
                trainer.checkpointer.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            return saved
        trainer.checkpointer.save = save_then_die
    elif mode == "sigterm-during-update-2":
        step = trainer.train_step
        def step_then_term(update):
            out = step(update)
            if update == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        trainer.train_step = step_then_term
    trainer.run()
    print("finished at update", trainer.update)
""")


def run_child(mode: str, run_dir: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-c", CHILD, mode, str(TINY), *FAST, f"--config.run_dir={run_dir}", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, **env, "JAX_PLATFORMS": "cpu"})


def test_sigkill_after_the_second_checkpoint_then_resume_matches_an_uninterrupted_run(reference_run, tmp_path,
                                                                                      cache_env):
    run_dir = tmp_path / "killed"
    killed = run_child("kill-after-checkpoint-2", run_dir, cache_env, "--config.log.report=false")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(metrics_by_update(run_dir)) == [1, 2]
    resumed = run_child("plain", run_dir, cache_env, "--config.log.report=false")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished at update 3" in resumed.stdout
    after, reference = metrics_by_update(run_dir), metrics_by_update(reference_run)
    assert sorted(after) == [1, 2, 3]  # no duplicate or lost update lines
    for name in COMPARED:
        assert after[3][name] == pytest.approx(reference[3][name], rel=1e-4, abs=1e-5), name
    assert RubricHistory.load(run_dir).current.render() == RubricHistory.load(reference_run).current.render()
    assert (run_dir / "rollouts.jsonl").read_text() == (reference_run / "rollouts.jsonl").read_text()


def test_sigterm_saves_and_exits_cleanly(tmp_path, cache_env):
    run_dir = tmp_path / "term"
    done = run_child("sigterm-during-update-2", run_dir, cache_env, "--config.checkpoint.every=100",
                     "--config.log.report=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished at update 2" in done.stdout
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [2]
    assert sorted(metrics_by_update(run_dir)) == [1, 2]


@pytest.mark.parametrize("override, expected", [
    ("--config.ppo.learnig_rate=1e-5", "config.ppo.learnig_rate"),
    ("--config.num_updates=many", "num_updates"),
    ("--config.data.data_dir=/nonexistent/data", "config.data.data_dir"),
    ("--config.policy.name=/nonexistent/model.gguf", "config.policy.name"),
    ("--config.mesh=(3, 1, 1)", "config.mesh"),
    ("--config.judge.initial_rubric=nonesuch", "config.judge.initial_rubric"),
])
def test_bad_configs_fail_before_compiling_and_name_the_key(override, expected, tmp_path, cache_env):
    from mpo_jax.trainer import Trainer

    with count_compilations() as compiled:
        with pytest.raises(ConfigError) as err:
            data = next(a for a in FAST if a.startswith("--config.data.data_dir="))
            Trainer(load_config(TINY, [data, f"--config.run_dir={tmp_path / 'bad'}", override]))
    assert expected in str(err.value)
    assert compiled == []


def test_config_file_types_are_checked_when_loaded():
    with pytest.raises(ConfigError, match=r"config\.meta\.interval must be an integer"):
        load_config(TINY, ["--config.meta.interval=2.5"])
    with pytest.raises(ConfigError, match="config.ppo.num_mini_batches"):
        load_config(TINY, ["--config.ppo.num_mini_batches=3"])


MULTIHOST_CHILD = textwrap.dedent("""
    import os, sys
    process_id, port, run_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    from mpo_jax.config import load_config
    from mpo_jax import distributed
    config = load_config(sys.argv[4], sys.argv[5:] + [
        f"--config.run_dir={run_dir}", "--config.distributed.initialize=true",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}"])
    distributed.initialize(config.distributed)
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    from mpo_jax.trainer import Trainer
    trainer = Trainer(config)
    trainer.run()
    print("RUBRIC", repr(trainer.history.current.render()))
    print("FINISHED", trainer.update)
""")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_localhost_match_the_single_process_run(reference_run, tmp_path, cache_env):
    """The pod code path: 2 processes x 4 CPU devices, gloo collectives, one (2, 2, 2) mesh."""
    run_dir, port = tmp_path / "multihost", free_port()
    env = {**os.environ, **cache_env, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_CHILD, str(i), str(port), str(run_dir), str(TINY),
                               *FAST, "--config.mesh=(2, 2, 2)", "--config.log.report=false"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for i in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
        assert "FINISHED 3" in out
    rubrics = [next(line for line in out.splitlines() if line.startswith("RUBRIC")) for out, _ in outputs]
    assert rubrics[0] == rubrics[1]  # every process installed the same rubric
    reference = metrics_by_update(reference_run)
    multihost = metrics_by_update(run_dir)
    assert sorted(multihost) == [1, 2, 3]
    for update in (1, 2, 3):
        for name in COMPARED:
            assert multihost[update][name] == pytest.approx(reference[update][name], rel=2e-3, abs=2e-4), name
    # only process 0 wrote: one metrics line per update, one events file
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_math_meta_step_refines_one_guideline_per_subject(tmp_path, cache_env):
    trainer = run_in_process(tmp_path / "math", "--config.task=math", "--config.num_updates=2",
                             "--config.log.report=false", "--config.judge.max_rubric_tokens=2048")
    record = json.loads((tmp_path / "math" / "meta_evaluation_2.json").read_text())
    data_dir = next(a.split("=", 1)[1] for a in FAST if a.startswith("--config.data.data_dir="))
    from mpo_jax.tasks import load_records

    seen = {r["subject"] for r in load_records("math", "train", data_dir)}
    assert record["groups"] and set(record["groups"]) <= seen
    accepted = {name for name, group in record["groups"].items() if group["accepted"]}
    from mpo_jax.tasks.math_reasoning import MATH_SUBJECTS

    assert {MATH_SUBJECTS[g] for g in trainer.judge.guidelines} == accepted
    for name in accepted:
        assert (tmp_path / "math" / f"guideline_{name}.txt").is_file()


@pytest.mark.parametrize("variant", ["essay_mpo", "essay_ppo_expert", "summarization_ppo_mpo", "ethics_ppo_iter0",
                                     "math_grpo_mpo", "math_ppo_iter0"])
def test_paper_configs_load_and_validate(variant):
    config = load_config(f"{ROOT}/configs/paper.py:{variant}")
    assert config.policy.lora_rank == 64 and config.ppo.optimizer.learning_rate == 3e-6
    assert config.meta.enabled == variant.endswith("mpo")
    assert config.rollouts_per_update == 64
