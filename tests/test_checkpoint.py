"""Checkpoints of tiny train states: bitwise round trips, keep-N, save_every, mismatches, meshes, corrupt
checkpoints (detected, skipped, set aside), SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import random_params, tiny_config, tiny_tokenizer_dir

from mpo_jax import Tokenizer
from mpo_jax.engine.language_model import LanguageModel, place_params
from mpo_jax.engine.sharding import as_auto_mesh
from mpo_jax.models.params import init_lora_params
from mpo_jax.rl.compiled import place_state
from mpo_jax.rl.config import OptimizerConfig
from mpo_jax.rl.train_state import create_train_state
from mpo_jax.train.checkpoint import (
    FINGERPRINTS_KEY,
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    NoRestorableCheckpointError,
    PreemptionGuard,
)

VOCAB = 264
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, schedule="linear", total_updates=10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def build_state(tokenizer, *, lora_rank=4, separate_critic=True, mesh=None):
    policy_cfg = tiny_config("llama", vocab_size=VOCAB, lora_rank=lora_rank, lora_alpha=8.0,
                             value_head=not separate_critic)
    flat = random_params(policy_cfg, seed=1)
    if lora_rank:
        flat.update(init_lora_params(policy_cfg, seed=2))
    policy = LanguageModel(policy_cfg, tokenizer, *place_params(policy_cfg, flat, mesh), mesh=mesh)
    critic = None
    if separate_critic:
        critic_cfg = tiny_config("llama", vocab_size=VOCAB, value_head=True)
        critic = LanguageModel(critic_cfg, tokenizer, *place_params(critic_cfg, random_params(critic_cfg, seed=3),
                                                                      mesh), mesh=mesh)
    return place_state(create_train_state(policy, critic, OPTIMIZER), mesh)


def randomized(state, seed):
    """The state with every saved leaf (step, params, optimizer) set to fresh random values."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            value = rng.integers(1, 1000, leaf.shape).astype(leaf.dtype)
        else:
            value = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        return jax.device_put(value, leaf.sharding)

    return state.replace(step=fill(state.step), params=jax.tree.map(fill, state.params),
                         opt_state=jax.tree.map(fill, state.opt_state))


def host_arrays(tree):
    """keystr(path) -> numpy copy, and the container types along the way (namedtuples, nnx.State)."""
    leaves = {jax.tree_util.keystr(p): np.array(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return leaves, str(jax.tree_util.tree_structure(tree))


def assert_bitwise_equal(restored, expected):
    (got, got_structure), (want, want_structure) = host_arrays(restored), host_arrays(expected)
    assert got_structure == want_structure
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


HOST_STATE = {"rng_key": [0, 42], "data": {"epoch": 1, "position": 17, "order_seed": 3},
              "rubric_history": [{"version": 0, "items": ["Be clear.", "Cite facts."]}],
              "meta_buffer": [{"prompt": "p", "response": "r", "score": 0.25}], "counters": {"episodes": 128},
              "note": None}


@pytest.mark.parametrize("lora_rank, separate_critic", [(4, True), (0, False)], ids=["lora", "full"])
def test_round_trip_is_bitwise_and_keeps_the_host_state(tokenizer, tmp_path, lora_rank, separate_critic):
    state = randomized(build_state(tokenizer, lora_rank=lora_rank, separate_critic=separate_critic), seed=5)
    saved = jax.tree.map(np.array, {"step": state.step, "params": state.params, "opt_state": state.opt_state})
    with Checkpointer(tmp_path / "ckpt", save_every=1, keep=2) as ckpt:
        assert ckpt.save(3, state, HOST_STATE)
    template = build_state(tokenizer, lora_rank=lora_rank, separate_critic=separate_critic)
    assert not np.array_equal(np.asarray(template.step), saved["step"])  # the template holds other values
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
    assert ckpt.latest_update() == 3
    restored, host = ckpt.restore(None, template)
    assert_bitwise_equal({"step": restored.step, "params": restored.params, "opt_state": restored.opt_state}, saved)
    assert host == HOST_STATE
    # not saved: frozen weights and the reference come from the template (the base model)
    assert restored.policy is template.policy and restored.ref_params is template.ref_params
    assert (restored.ref_params is None) == (lora_rank > 0)
    # the inject_hyperparams state is still a usable optax state
    assert float(restored.opt_state[1].hyperparams["learning_rate"]) == float(saved["opt_state"][1].hyperparams[
        "learning_rate"])


def numbered_dirs(path):
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def test_save_every_and_keep_the_last_n(tokenizer, tmp_path):
    state = build_state(tokenizer)
    ckpt = Checkpointer(tmp_path, save_every=2, keep=3)
    written = [u for u in range(1, 11) if ckpt.save(u, state.replace(step=jnp.int32(u)), {"update": u})]
    assert written == [2, 4, 6, 8, 10]
    assert numbered_dirs(tmp_path) == [6, 8, 10]
    assert ckpt.save(11, state.replace(step=jnp.int32(11)), {"update": 11}, force=True)  # e.g. on SIGTERM
    assert ckpt.save(11, state, {"update": 11}, force=True) is False  # already there: not rewritten
    ckpt.close()
    assert numbered_dirs(tmp_path) == [8, 10, 11]
    reopened = Checkpointer(tmp_path, save_every=2, keep=3)
    assert reopened.all_updates() == [8, 10, 11] and reopened.latest_update() == 11
    restored, host = reopened.restore(8, state)
    assert int(restored.step) == 8 and host == {"update": 8}
    with pytest.raises(ValueError, match=r"update 9 is older than the latest checkpoint \(update 11\)"):
        reopened.save(9, state, {}, force=True)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for update 5 .*available updates: \[8, 10, 11\]"):
        reopened.restore(5, state)


def test_async_saves_are_complete_after_close(tokenizer, tmp_path):
    states = [randomized(build_state(tokenizer), seed=u) for u in range(4)]
    expected = jax.tree.map(np.array, {"params": states[3].params, "opt_state": states[3].opt_state})
    ckpt = Checkpointer(tmp_path, save_every=1, keep=2, async_save=True)
    for update, state in enumerate(states, start=1):
        assert ckpt.save(update, state, {"update": update})
    ckpt.close()
    assert numbered_dirs(tmp_path) == [3, 4]
    restored, host = Checkpointer(tmp_path, save_every=1, keep=2).restore(None, build_state(tokenizer))
    assert host == {"update": 4}
    assert_bitwise_equal({"params": restored.params, "opt_state": restored.opt_state}, expected)


def test_a_different_lora_rank_or_trainable_set_is_a_clear_error(tokenizer, tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    ckpt.save(1, build_state(tokenizer, lora_rank=4), {})
    with pytest.raises(CheckpointMismatchError) as rank:
        ckpt.restore(None, build_state(tokenizer, lora_rank=8))
    message = str(rank.value)
    assert "config (model, LoRA rank" in message and "differs from the run that wrote the checkpoint" in message
    assert "params/policy/layers/q_proj_lora_a/value: checkpoint float32[2, 32, 4], this run float32[2, 32, 8]" \
        in message
    with pytest.raises(CheckpointMismatchError) as trainable:
        ckpt.restore(None, build_state(tokenizer, lora_rank=0, separate_critic=True))
    message = str(trainable.value)
    assert "params/policy/embed/value: in this run's state but not in the checkpoint" in message
    assert "params/policy/layers/down_proj_lora_a/value: in the checkpoint but not in this run's state" in message


def test_restore_onto_a_mesh_uses_the_template_shardings(tokenizer, tmp_path):
    state = randomized(build_state(tokenizer), seed=9)
    saved = jax.tree.map(np.array, {"step": state.step, "params": state.params, "opt_state": state.opt_state})
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    ckpt.save(1, state, {})
    mesh = as_auto_mesh(jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")))
    template = build_state(tokenizer, mesh=mesh)
    restored, _ = ckpt.restore(1, template)
    got = {"step": restored.step, "params": restored.params, "opt_state": restored.opt_state}
    assert_bitwise_equal(got, saved)
    want = {"step": template.step, "params": template.params, "opt_state": template.opt_state}
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
    for leaf, like in pairs:
        assert leaf.sharding.mesh == mesh and leaf.sharding.spec == like.sharding.spec
    q_lora = restored.params["policy"]["layers"]["q_proj_lora_a"][...]
    assert q_lora.sharding.spec[1] == "fsdp" and len(q_lora.addressable_shards) == 8
    assert q_lora.addressable_shards[0].data.shape == (2, 16, 4)  # split, not replicated


def test_an_interrupted_save_is_ignored(tokenizer, tmp_path):
    state = randomized(build_state(tokenizer), seed=2)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    ckpt.save(2, state, {"update": 2})
    ckpt.close()
    # a run killed while writing update 4 leaves orbax's unfinalized temporary directory behind
    shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp-1700000000")
    (tmp_path / "6.orbax-checkpoint-tmp-1700000001").mkdir()
    resumed = Checkpointer(tmp_path, save_every=1, keep=5)
    assert resumed.latest_update() == 2 and resumed.all_updates() == [2]
    restored, host = resumed.restore(None, build_state(tokenizer))
    assert host == {"update": 2}
    np.testing.assert_array_equal(np.asarray(restored.step), np.asarray(state.step))


def array_files(step_dir):
    """The files holding a checkpoint's arrays (OCDBT data and index nodes under state/**/d/)."""
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def flip_bytes(path, positions):
    data = bytearray(path.read_bytes())
    for position in positions:
        data[position % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt(step_dir):
    """Bytes flipped all through every array file: what a damaged disk or a bad copy leaves."""
    for path in array_files(step_dir):
        flip_bytes(path, range(7, path.stat().st_size, max(1, path.stat().st_size // 40)))


def test_a_byte_flipped_inside_the_array_data_is_detected(tokenizer, tmp_path):
    """TensorStore reads a flipped data byte back without complaint; the saved fingerprints catch it."""
    state = randomized(build_state(tokenizer), seed=4)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(1, state, {"update": 1})
    largest = max(array_files(tmp_path / "1"), key=lambda p: p.stat().st_size)
    flip_bytes(largest, [largest.stat().st_size // 2])
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint .*/1 is corrupt: the contents of 1 array\(s\) "
                                                     r"differ from what was saved \((params|opt_state)/"):
        Checkpointer(tmp_path, save_every=1, keep=2).restore(1, build_state(tokenizer))


def test_restore_latest_skips_a_corrupt_checkpoint_and_sets_it_aside(tokenizer, tmp_path, caplog):
    states = {u: randomized(build_state(tokenizer), seed=u) for u in (1, 2, 3)}
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        for update, state in states.items():
            ckpt.save(update, state, {"update": update})
    corrupt(tmp_path / "3")
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    with caplog.at_level("WARNING", logger="mpo_jax.train.checkpoint"):
        restored = ckpt.restore_latest(build_state(tokenizer), set_aside=True)
    assert restored.update == 2 and restored.host_state == {"update": 2}
    assert [update for update, _ in restored.skipped] == [3]
    assert_bitwise_equal(restored.state.params, jax.tree.map(np.array, states[2].params))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"checkpoint {tmp_path / '3'} cannot be read back" in m or f"checkpoint {tmp_path / '3'} is corrupt"
               in m for m in warnings), warnings
    # set aside, not deleted: the run saves update 3 again, and the damaged files stay for a look
    assert ckpt.all_updates() == [1, 2] and (tmp_path / "3.corrupt").is_dir()
    assert ckpt.save(3, states[1], {"update": 3})
    ckpt.close()
    again = Checkpointer(tmp_path, save_every=1, keep=5).restore_latest(build_state(tokenizer))
    assert again.update == 3 and not again.skipped
    assert_bitwise_equal(again.state.params, jax.tree.map(np.array, states[1].params))


def test_no_restorable_checkpoint_is_one_clear_error(tokenizer, tmp_path):
    state = randomized(build_state(tokenizer), seed=1)
    with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
        ckpt.save(1, state, {"update": 1})
        ckpt.save(2, state, {"update": 2})
    corrupt(tmp_path / "1")
    corrupt(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    with pytest.raises(NoRestorableCheckpointError) as err:
        ckpt.restore_latest(build_state(tokenizer), set_aside=True)
    message = str(err.value)
    assert message.startswith(f"no checkpoint in {tmp_path} can be restored")
    assert str(tmp_path / "1") in message and str(tmp_path / "2") in message and "start the run over" in message
    assert ckpt.all_updates() == [1, 2]  # nothing renamed when nothing restores
    assert Checkpointer(tmp_path / "empty", save_every=1, keep=1).restore_latest(state) is None


def test_a_checkpoint_without_fingerprints_still_restores(tokenizer, tmp_path):
    """Checkpoints written before fingerprints existed have none to check."""
    state = randomized(build_state(tokenizer), seed=6)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state, {"update": 1})
    host_file = tmp_path / "1" / "host" / "metadata"
    host = json.loads(host_file.read_text())
    assert set(host) == {"update", FINGERPRINTS_KEY}
    host_file.write_text(json.dumps({"update": 1}))
    restored, host = Checkpointer(tmp_path, save_every=1, keep=1).restore(1, build_state(tokenizer))
    assert host == {"update": 1}
    assert_bitwise_equal(restored.params, jax.tree.map(np.array, state.params))
    with pytest.raises(ValueError, match=FINGERPRINTS_KEY):
        Checkpointer(tmp_path / "other", save_every=1, keep=1).save(1, state, {FINGERPRINTS_KEY: {}})


def test_missing_checkpoints_and_bad_arguments_are_named(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="save_every must be a positive integer"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        Checkpointer(tmp_path, save_every=1, keep=0)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1)
    assert ckpt.latest_update() is None
    state = build_state(tokenizer)
    with pytest.raises(FileNotFoundError, match="no finished checkpoint in"):
        ckpt.restore(None, state)
    with pytest.raises(ValueError, match=r"host_state\['counters'\]\['n'\] is a numpy.int64.*int\(\)"):
        ckpt.save(1, state, {"counters": {"n": np.int64(3)}})
    with pytest.raises(ValueError, match=r"host_state\['buffer'\] has the key 3 of type int; JSON keys must be"):
        ckpt.save(1, state, {"buffer": {3: "x"}})
    with pytest.raises(ValueError, match=r"host_state\['loss'\] is nan"):
        ckpt.save(1, state, {"loss": float("nan")})
    assert ckpt.latest_update() is None  # nothing half-written by the rejected saves


def test_the_guard_only_sets_a_flag_and_restores_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and guard.should_stop(1)
        assert calls == []  # the guard took the signal, not the handler it replaced
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]  # which is back in place after the guard
    finally:
        signal.signal(signal.SIGTERM, previous)


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    import optax
    from mpo_jax.train.checkpoint import Checkpointer, PreemptionGuard
    from mpo_jax.rl.train_state import TrainState

    params = {"policy": {"w": jnp.zeros(6)}}
    tx = optax.adam(1e-3)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), policy=None, critic=None,
                       ref_params=None, tx=tx)
    ckpt = Checkpointer(sys.argv[1], save_every=100, keep=2)
    with PreemptionGuard() as guard:
        for update in range(1, 1000):
            state = state.replace(step=jnp.int32(update), params={"policy": {"w": jnp.arange(6.0) * update}})
            ckpt.save(update, state, {"update": update})
            if update == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            if guard.should_stop(update):
                print("stopping after", update, flush=True)
                assert ckpt.save(update, state, {"update": update, "preempted": True}, force=True)
                break
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    sys.exit(0)
""")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SIGTERM_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopping after 3" in proc.stdout
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=100, keep=2)
    assert ckpt.all_updates() == [3]
    params = {"policy": {"w": jnp.ones(6)}}
    import optax

    from mpo_jax.rl.train_state import TrainState

    tx = optax.adam(1e-3)
    template = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), policy=None, critic=None,
                          ref_params=None, tx=tx)
    restored, host = ckpt.restore(None, template)
    assert host == {"update": 3, "preempted": True}
    assert int(restored.step) == 3
    np.testing.assert_array_equal(np.asarray(restored.params["policy"]["w"]), np.arange(6.0) * 3)
