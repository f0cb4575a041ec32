"""The MPO trainer end to end on tiny random models: run dir contents, mesh vs one device,
SIGKILL + resume equality, SIGTERM, and configuration errors raised before anything compiles."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from git_files import head_from_git_files
from tiny import fixture_data_dir

import mpo_jax
from mpo_jax.engine.compilation import count_compilations
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.tasks import get_task
from mpo_jax.train.config import ConfigError, load_config
from mpo_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_cpu.py"
# 3 updates, a meta step after update 2, a checkpoint after every update.
FAST = ["--config.num_updates=3", "--config.meta.interval=2", "--config.rollout.max_new_tokens=8",
        "--config.policy.tiny_hidden_size=32", "--config.judge.model.tiny_hidden_size=32",
        "--config.data.batch_size=8", "--config.checkpoint.every=1", "--config.checkpoint.keep=5",
        "--config.meta.analysis_tokens=8", "--config.meta.item_tokens=6"]
COMPARED = ("score/mean", "objective/kl", "loss/policy_avg", "loss/value_avg", "response/length_mean",
            "rubric/iteration", "policy/approxkl_avg")


@pytest.fixture(scope="module", autouse=True)
def fixture_data(tmp_path_factory):
    """Every run here reads the fixture records (tests/fixtures), through FAST."""
    FAST.append(f"--config.data.data_dir={fixture_data_dir(tmp_path_factory.mktemp('data'))}")


def run_in_process(run_dir: Path, *extra: str):
    from mpo_jax.train.trainer import Trainer

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
    starts = [json.loads(line) for line in (run / "provenance.jsonl").read_text().splitlines()]
    assert [(s["from_update"], s["num_updates"]) for s in starts] == [(0, 3)]
    assert starts[0]["code"]["mpo_jax"] == mpo_jax.__version__
    expected_commit = head_from_git_files(ROOT) if shutil.which("git") else None  # None outside a git checkout
    assert starts[0]["code"]["git_commit"] == expected_commit
    assert starts[0]["devices"]["platform"] == "cpu" and starts[0]["devices"]["count"] >= 1


def test_a_two_by_two_by_two_mesh_matches_one_device(reference_run, tmp_path, cache_env):
    run_in_process(tmp_path / "mesh", "--config.mesh=(2, 2, 2)", "--config.log.report=false")
    one, mesh = metrics_by_update(reference_run), metrics_by_update(tmp_path / "mesh")
    for update in (1, 2, 3):
        for name in COMPARED:
            assert mesh[update][name] == pytest.approx(one[update][name], rel=2e-3, abs=2e-4), (update, name)


CHILD = textwrap.dedent("""
    import os, signal, sys
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from mpo_jax.train.config import load_config
    from mpo_jax.train.trainer import Trainer
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
    starts = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert [s["from_update"] for s in starts] == [0, 2]  # the resume is recorded, not overwritten


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
    from mpo_jax.train.trainer import Trainer

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
    from mpo_jax.train.config import load_config
    from mpo_jax.train import distributed
    config = load_config(sys.argv[4], sys.argv[5:] + [
        f"--config.run_dir={run_dir}", "--config.distributed.initialize=true",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}"])
    distributed.initialize(config.distributed)
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    from mpo_jax.train.trainer import Trainer
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


# -- a scripted judge and meta model behind a fake OpenAI-compatible server ----------------------

NEW_CRITERIA = (
    "### Brevity and focus (0-5)\n- 5: Every paragraph serves the instruction; for example, a story that keeps "
    "to one scene.\n- 2: Some sentences wander away from the instruction.\n- 0: The response ignores the "
    "instruction or is empty.",
    "### Development of ideas (0-5)\n- 5: Claims are supported with concrete detail; for example, a named event "
    "backs an argument.\n- 2: Support is thin or generic.\n- 0: No idea is developed beyond one sentence.",
)
# Judge scores per item: high only once the rubric in its system turn holds the new criteria.
OLD_RUBRIC_SCORE, NEW_RUBRIC_SCORE = 1, 5


def _guideline_text(chars: int) -> str:
    sentences = [f"Check step {i} of the solution against the reference and note any sign error in it."
                 for i in range(1, 400)]
    return " ".join(sentences)[:chars].rsplit(" ", 1)[0] + "."


GUIDELINE = _guideline_text(6000)


def scripted_mpo(index, seen):
    """Judge: a score that depends on the rubric text; MRM: fixed analyses and criteria."""
    from fake_openai import ok

    from mpo_jax.tasks import get_task

    messages = seen.body["messages"]
    system, last = messages[0]["content"], messages[-1]["content"]
    essay, math = get_task("essay"), get_task("math")
    if system.startswith(essay.judge_system):
        if "single integer" in last:  # the score turn
            return ok(str(NEW_RUBRIC_SCORE if "Brevity and focus" in system else OLD_RUBRIC_SCORE))
        return ok("The writing addresses the item.<EOE>")
    if system == math.meta_system:
        if "next version of the meta-level guidelines" in last:
            return ok(GUIDELINE + "<EOE>")
        return ok("The junior instructor missed sign errors.<EOE>")
    if system == essay.meta_system:
        if "How many" in last:
            return ok(str(len(NEW_CRITERIA)))
        number = re.search(r"criterion #(\d+)", last)
        if number:
            return ok(NEW_CRITERIA[(int(number.group(1)) - 1) % len(NEW_CRITERIA)] + "<EOE>")
        return ok("The score is inflated: the response does not develop the instruction.<EOE>")
    return ok("unexpected request<EOE>")


@pytest.fixture
def mpo_server():
    from fake_openai import FakeServer

    server = FakeServer(scripted_mpo, max_requests=100_000, lifetime_s=900).start()
    yield server
    server.stop()


def test_the_new_rubric_reaches_the_reward_from_the_update_after_the_meta_step(tmp_path, cache_env, mpo_server):
    """Remote judge and meta model (the loopback server): rubric iteration 1 is installed at update 2's
    meta step and every score from update 3 on is the new rubric's (2 items x 5), not the old one's (1 x 1)."""
    run_dir = tmp_path / "remote"
    # The judge gives every response one score per rubric, so the canary gate (which would see
    # only ties) is off here: this checks the install path, as the published MPO runs it.
    run_in_process(run_dir, f"--config.judge.remote.base_url={mpo_server.url}", "--config.judge.mode=generate",
                   f"--config.meta.remote.base_url={mpo_server.url}", "--config.num_updates=3",
                   "--config.log.report=false", "--config.meta.canary.enabled=false")
    metrics = metrics_by_update(run_dir)
    assert [metrics[u]["score/mean"] for u in (1, 2, 3)] == [OLD_RUBRIC_SCORE, OLD_RUBRIC_SCORE,
                                                             len(NEW_CRITERIA) * NEW_RUBRIC_SCORE]
    assert [metrics[u]["rubric/iteration"] for u in (1, 2, 3)] == [0, 0, 1]
    assert metrics[2]["meta/accepted"] == 1.0 and metrics[3]["rubric/items"] == len(NEW_CRITERIA)
    history = json.loads((run_dir / "rubric_history.json").read_text())
    accepted = [e for e in history["events"] if e["accepted"]]
    assert [(e["iteration"], e["created_step"]) for e in accepted] == [(0, None), (1, 2)]
    assert RubricHistory.load(run_dir).current.items == NEW_CRITERIA
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert {r["rubric_iteration"] for r in rollouts if r["update"] == 3} == {1}
    # every score request after the meta step carried the new rubric in its system turn
    essay_judge = get_task("essay").judge_system
    judge_systems = [s.body["messages"][0]["content"] for s in mpo_server.seen
                     if s.body["messages"][0]["content"].startswith(essay_judge)]
    assert "Brevity and focus" in judge_systems[-1] and "Brevity and focus" not in judge_systems[0]


def scripted_canary(index, seen):
    """As `scripted_mpo`, but the judge's score depends on the response: short is good under the
    old rubric, long under the new one. The tiny policy writes a few tokens and most degradations
    (a refusal, a note to the grader, foreign text) are longer, so the canary share falls and iter0 stays."""
    from fake_openai import ok

    messages = seen.body["messages"]
    system, last = messages[0]["content"], messages[-1]["content"]
    if system.startswith(get_task("essay").judge_system) and "single integer" in last:
        label = get_task("essay").response_label
        response = messages[1]["content"].split(f"[Start of {label}]")[1].split(f"[End of {label}]")[0]
        short = 5 - min(5, len(response.split()) // 4)
        return ok(str(5 - short if "Brevity and focus" in system else short))
    return scripted_mpo(index, seen)


def test_every_meta_step_records_the_canary_decision_and_a_resume_repeats_it(tmp_path, cache_env):
    from fake_openai import FakeServer

    server = FakeServer(scripted_canary, max_requests=100_000, lifetime_s=900).start()
    try:
        run_dir = tmp_path / "canary"
        args = (f"--config.judge.remote.base_url={server.url}", "--config.judge.mode=generate",
                f"--config.meta.remote.base_url={server.url}", "--config.num_updates=3", "--config.log.report=false",
                "--config.meta.canary.num_samples=4")
        run_in_process(run_dir, *args)
        first = json.loads((run_dir / "meta_evaluation_2.json").read_text())
        metrics = metrics_by_update(run_dir)
        # Resume from update 1's checkpoint: update 2 and its meta step are redone.
        for update in (2, 3):
            shutil.rmtree(run_dir / "checkpoints" / str(update))
        run_in_process(run_dir, *args)
        again = json.loads((run_dir / "meta_evaluation_2.json").read_text())
    finally:
        server.stop()
    canary = first["canary"]
    assert canary["ran"] and (first["reason_code"], canary["decision"]) == ("canary", "keep")
    assert canary["proposal_share"] < canary["current_share"] - canary["tolerance"]
    assert set(canary["current_by_kind"]) == set(canary["proposal_by_kind"]) and canary["current_by_kind"]
    for side in ("current", "proposal"):  # the shares are the trace's pairs, counted here
        wins = [(np.sign(a - d) + 1) / 2 for a, d in (pair[side] for pair in canary["details"])]
        assert canary[f"{side}_share"] == pytest.approx(np.mean(wins))
    assert metrics[2]["meta/canary/ran"] == 1.0 and metrics[2]["meta/canary/passed"] == 0.0
    assert metrics[2]["meta/canary/current_share"] == pytest.approx(canary["current_share"])
    assert metrics[2]["meta/canary/proposal_share"] == pytest.approx(canary["proposal_share"])
    assert metrics[2]["meta/kept/canary"] == 1.0 and metrics[2]["time/meta_canary_s"] >= 0
    assert metrics[3]["rubric/iteration"] == 0
    volatile = ("seconds",)
    assert {k: v for k, v in again["canary"].items() if k not in volatile} == {
        k: v for k, v in canary.items() if k not in volatile}
    assert again["reason"] == first["reason"] and again["samples"] == first["samples"]


def test_kept_rubrics_are_counted_by_reason(reference_run):
    """The tiny random meta model writes noise: whatever it writes, a kept rubric is counted by its reason."""
    run_dir = reference_run
    metrics = metrics_by_update(run_dir)
    kept = {k: v for k, v in metrics[2].items() if k.startswith("meta/kept/")}
    assert kept, "no meta/kept/* metrics"
    history = RubricHistory.load(run_dir)
    assert sum(kept.values()) == sum(not e.accepted for e in history.events) == 1 - metrics[2]["meta/accepted"]


@pytest.mark.parametrize("name, overrides", [
    ("grpo", ["--config.algorithm=grpo", "--config.grpo.group_size=2", "--config.data.batch_size=4",
              "--config.grpo.num_mini_batches=2"]),
    ("critic", ["--config.critic.name=tiny-random", "--config.critic.tiny_hidden_size=32",
                "--config.critic.remat=false"]),
    ("generate_judge", ["--config.judge.mode=generate", "--config.judge.rationale_tokens=6"]),
])
def test_one_update_runs_for_each_variant(name, overrides, tmp_path, cache_env):
    run_dir = tmp_path / name
    trainer = run_in_process(run_dir, "--config.num_updates=1", "--config.log.report=false", *overrides)
    metrics = metrics_by_update(run_dir)[1]
    for key in ("score/mean", "objective/kl", "loss/policy_avg"):
        assert np.isfinite(metrics[key]), key
    assert (run_dir / "checkpoints" / "1").is_dir() and trainer.update == 1
    if name == "critic":
        assert np.isfinite(metrics["loss/value_avg"])
    if name == "generate_judge":
        rationales = trainer.judge.score_detailed([{"prompt": "Write about rain."}], ["Rain fell."])[0].rationales
        assert len(rationales) == len(trainer.history.current.items)


def test_no_meta_step_runs_after_the_last_update(tmp_path, cache_env):
    """Interval 1 over 2 updates: a meta step after update 1, none after update 2 (nothing would use it)."""
    run_dir = tmp_path / "run"
    run_in_process(run_dir, "--config.num_updates=2", "--config.meta.interval=1", "--config.log.report=false")
    metrics = metrics_by_update(run_dir)
    assert metrics[1].get("meta/step") == 1.0 and not metrics[2].get("meta/step")
    assert (run_dir / "meta_evaluation_1.json").is_file() and not (run_dir / "meta_evaluation_2.json").exists()


def test_math_meta_step_installs_a_long_guideline_that_survives_restore(tmp_path, cache_env, mpo_server):
    """A 6,000-character guideline (over the generic 4,000-character item limit, within MATH's 12,000)."""
    from mpo_jax.tasks import load_records
    from mpo_jax.tasks.math_reasoning import MATH_SUBJECTS, subject_id
    from mpo_jax.train.trainer import Trainer

    run_dir = tmp_path / "math"
    args = ["--config.task=math", "--config.num_updates=3", "--config.log.report=false",
            f"--config.meta.remote.base_url={mpo_server.url}", "--config.judge.plan_tokens=6"]
    trainer = run_in_process(run_dir, *args)
    record = json.loads((run_dir / "meta_evaluation_2.json").read_text())
    data_dir = next(a.split("=", 1)[1] for a in FAST if a.startswith("--config.data.data_dir="))
    seen = {r["subject"] for r in load_records("math", "train", data_dir)}
    assert record["groups"] and set(record["groups"]) <= seen
    assert all(group["accepted"] for group in record["groups"].values()), record["groups"]
    assert {MATH_SUBJECTS[g] for g in trainer.judge.guidelines} == set(record["groups"])
    assert all(r.items == (GUIDELINE,) for r in trainer.judge.guidelines.values()) and len(GUIDELINE) > 4000
    for name in record["groups"]:
        assert GUIDELINE in (run_dir / f"guideline_{name}.txt").read_text()
    restored = Trainer(load_config(TINY, [*FAST, f"--config.run_dir={run_dir}", *args]))
    restored._restore()
    assert restored.update == 3
    assert {g: r.items for g, r in restored.guidelines.items()} == \
        {subject_id({"subject": name}): (GUIDELINE,) for name in record["groups"]}


def test_in_training_evaluation_scores_the_same_held_out_prompts_each_time(tmp_path, cache_env):
    run_dir = tmp_path / "eval"
    run_in_process(run_dir, "--config.num_updates=2", "--config.eval.every=2", "--config.eval.num_prompts=3",
                   "--config.eval.max_new_tokens=6", "--config.eval.judge_rubric=iter0", "--config.log.report=false")
    metrics = metrics_by_update(run_dir)
    assert sorted(metrics) == [0, 1, 2]  # before training, then every eval.every updates
    assert not any(k.startswith("eval/") for k in metrics[1])
    rows = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    by_update = {u: [r for r in rows if r["update"] == u] for u in (0, 2)}
    assert [len(by_update[u]) for u in (0, 2)] == [3, 3]
    assert [r["prompt"] for r in by_update[0]] == [r["prompt"] for r in by_update[2]]
    data_dir = next(a.split("=", 1)[1] for a in FAST if a.startswith("--config.data.data_dir="))
    from mpo_jax.tasks import load_records

    test_prompts = {get_task("essay").prompt_text(r) for r in load_records("essay", "test", data_dir)}
    assert {r["prompt"] for r in rows} <= test_prompts
    for update in (0, 2):
        m = metrics[update]
        assert m["eval/length_mean"] == pytest.approx(np.mean([r["response_tokens"] for r in by_update[update]]))
        assert m["eval/judge_score"] == pytest.approx(np.mean([r["judge_score"] for r in by_update[update]]),
                                                      rel=1e-5)
        assert m["eval/independent_score"] == pytest.approx(
            np.mean([r["independent_score"] for r in by_update[update]]), rel=1e-5)
        hack_rates = {k[len("eval/hack/"):]: v for k, v in m.items()
                      if k.startswith("eval/hack/") and k != "eval/hack/any"}
        assert hack_rates
        for name, rate in hack_rates.items():
            assert rate == pytest.approx(np.mean([name in r["hacks"] for r in by_update[update]])), name


PAPER_UPDATES = {"essay": 407, "summarization": 580, "ethics": 203, "math": 118}  # meta steps x interval
PAPER_INTERVALS = {"essay": 10, "summarization": 20, "ethics": 10, "math": 30}


@pytest.mark.parametrize("variant", ["essay_mpo", "essay_ppo_expert", "summarization_ppo_mpo", "ethics_ppo_iter0",
                                     "math_grpo_mpo", "math_ppo_iter0"])
def test_paper_configs_load_and_validate(variant):
    config = load_config(f"{ROOT}/configs/paper.py:{variant}")
    task = variant.split("_")[0]
    assert config.policy.lora_rank == 64 and config.ppo.optimizer.learning_rate == 3e-6
    assert "lm_head" in config.policy.lora_targets
    assert config.meta.enabled == variant.endswith("mpo")
    assert config.rollouts_per_update == 64
    # the published judge protocol and the original's token budgets
    assert (config.judge.mode, config.judge.rationale_tokens) == ("generate", 300)
    assert (config.meta.analysis_tokens, config.meta.item_tokens) == (2000, 500)
    assert (config.judge.max_rubric_tokens, config.judge.max_items) == (0, 0)  # derived
    assert config.num_updates == PAPER_UPDATES[task] == config.update_config.optimizer.total_updates
    assert config.meta.interval == PAPER_INTERVALS[task]
    if task == "summarization":
        assert config.data.max_prompt_tokens == 4000


def test_the_judge_rubric_budget_follows_the_meta_config():
    config = load_config(f"{ROOT}/configs/paper.py:essay_mpo")
    from mpo_jax.train.config import RUBRIC_HEADROOM_TOKENS

    items = get_task("essay").rubric_limits.max_items  # meta.max_items = 0: the task's hard limit
    assert config.judge_max_items == items
    expected = items * 500 + RUBRIC_HEADROOM_TOKENS
    assert config.judge_rubric_tokens(100) == -(-expected // 256) * 256 >= expected
    fixed = load_config(f"{ROOT}/configs/paper.py:essay_ppo_expert")  # no meta step: the initial rubric decides
    assert fixed.judge_rubric_tokens(1300) == -(-(1300 + RUBRIC_HEADROOM_TOKENS) // 256) * 256


def test_the_meta_model_and_the_evaluation_judge_share_one_copy_when_their_specs_match(tmp_path, cache_env):
    from mpo_jax.train.trainer import Trainer

    other = ["--config.meta.model.name=tiny-random", "--config.meta.model.remat=false",
             "--config.meta.model.seed=5", "--config.meta.model.tiny_hidden_size=48",
             "--config.eval.every=2", "--config.eval.num_prompts=2", "--config.eval.judge_rubric=iter0",
             "--config.eval.judge.name=tiny-random", "--config.eval.judge.remat=false",
             "--config.eval.judge.tiny_hidden_size=48"]
    trainer = Trainer(load_config(TINY, [*FAST, f"--config.run_dir={tmp_path / 'a'}", *other,
                                         "--config.eval.judge.seed=5"]))
    assert trainer.mrm.model is trainer.evaluator.independent_judge.model  # one spec, one copy
    assert trainer.mrm.model is not trainer.judge_model
    assert trainer.mrm.model.config.hidden_size == 48
    trainer = Trainer(load_config(TINY, [*FAST, f"--config.run_dir={tmp_path / 'b'}", *other,
                                         "--config.eval.judge.seed=6"]))
    assert trainer.mrm.model is not trainer.evaluator.independent_judge.model  # other weights, own copy
    trainer = Trainer(load_config(TINY, [*FAST, f"--config.run_dir={tmp_path / 'c'}", *other,
                                         "--config.eval.judge.seed=6", "--config.meta.enabled=false"]))
    assert trainer.mrm.model is trainer.judge_model  # a fixed-rubric run does not load the meta model
    assert len(trainer._frozen_models) == 2  # the judge and the evaluation judge
