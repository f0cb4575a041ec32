"""`mpo-jax plan`: the shape-only models and train state match what the trainer builds, and programs
compile for abstract TPU topologies (libtpu, the `tpu` extra) with per-chip figures we can count.

The argument bytes of the PPO update are checked against a count made here from the parameter
shapes and which dimension each weight splits over `fsdp` (written out below, not taken from the
partition rules), plus the optimizer moments of the trainable weights and the batch.
"""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mpo_jax.engine import sharding as sharding_lib
from mpo_jax.models.config import canonical_param_shapes, lora_param_shapes
from mpo_jax.plan.topology import libtpu_available, parse_topology
from mpo_jax.train.config import default_config, to_train_config

ROOT = Path(__file__).resolve().parents[1]
NO_LIBTPU = "libtpu is not installed: pip install -e '.[tpu]' (make test installs it) to compile for TPU topologies"
if os.environ.get("CI") and not libtpu_available():  # CI installs the tpu extra (make test): never skip there
    raise RuntimeError(NO_LIBTPU)
needs_libtpu = pytest.mark.skipif(not libtpu_available(), reason=NO_LIBTPU)


def tiny_config(mesh=(1, 4, 1), *, hidden=512, layers=2, lora_rank=128, batch=4, meta=True, **changes):
    """A tiny run whose weights tile TPU memory exactly (dims multiples of 128 per shard)."""
    config = default_config()
    config.task = "essay"
    config.mesh = mesh
    for spec in (config.policy, config.judge.model):
        spec.name = "tiny-random"
        spec.remat = True
    config.policy.tiny_hidden_size = hidden
    config.policy.tiny_layers = layers
    config.policy.lora_rank = lora_rank
    config.judge.max_rubric_tokens = 1024
    config.judge.max_items = 2
    config.meta.enabled = meta
    config.meta.num_samples = 2
    config.meta.analysis_tokens = 16
    config.meta.item_tokens = 12
    config.meta.max_items = 2
    config.data.batch_size = batch
    config.data.max_prompt_tokens = 128
    config.rollout.max_new_tokens = 16
    config.ppo.num_ppo_epochs = 1
    config.ppo.num_mini_batches = 1
    config.ppo.gradient_accumulation_steps = 2
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return to_train_config(config)


# -- without libtpu: the abstract path equals the runtime's ------------------------------------

def _layout(tree):
    return [(tuple(x.shape), str(x.dtype), x.sharding.spec if getattr(x, "sharding", None) is not None else None)
            for x in jax.tree.leaves(tree)]


def test_abstract_models_and_state_match_the_trainers_on_a_cpu_mesh():
    from mpo_jax.plan.models import plan_models, plan_state
    from mpo_jax.train.model_specs import build_policy_and_state
    from mpo_jax.train.trainer import make_run_mesh

    config = tiny_config(mesh=(1, 4, 2), hidden=64, lora_rank=4)
    mesh = make_run_mesh(config)
    policy, _, state = build_policy_and_state(config, mesh)
    models = plan_models(config, mesh)
    abstract = plan_state(config, models)
    assert _layout(models["policy"].model.params) == _layout(policy.params)
    real = [(s, d, spec if not all(a is None for a in spec) else None) for s, d, spec in _layout(state)]
    shapes = [(s, d, spec if spec is not None and not all(a is None for a in spec) else None)
              for s, d, spec in _layout(abstract)]
    assert shapes == real
    assert models["policy"].model.sampler.unroll_layers == policy.sampler.unroll_layers


def test_topologies_agree_with_tpu_py_on_chips_and_hosts():
    spec = importlib.util.spec_from_file_location("mpo_tpu_scripts_plan", ROOT / "tpu_scripts" / "tpu.py")
    tpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tpu
    spec.loader.exec_module(tpu)
    for name in ("v4-8", "v4-32", "v5e-1", "v5e-4", "v5e-8", "v5litepod-16", "v5e-64", "v5p-8", "v5p-64", "v5p-128",
                 "v6e-8", "v6e-256"):
        planned, launched = parse_topology(name), tpu.parse_accelerator(name)
        assert (planned.chips, planned.hosts) == (launched.chips, launched.hosts), name
    assert parse_topology("v5p-64").topology_name == "v5:2x4x4"
    assert parse_topology("v5e-16", slices=2).devices_total == 32


def test_a_mesh_that_does_not_cover_the_slice_is_refused():
    from mpo_jax.plan.plan import MeshMismatchError, check_mesh

    with pytest.raises(MeshMismatchError, match=r"config.mesh = \(1, 4, 1\) uses 4 devices.*v5p-64.*--config.mesh"):
        check_mesh(tiny_config(mesh=(1, 4, 1)), parse_topology("v5p-64"), processes=8)
    check_mesh(tiny_config(mesh=(1, 2, 1)), parse_topology("v5e-4"), processes=1)  # one host: a divisor is fine


# -- with libtpu: compile for abstract TPU topologies ------------------------------------------

# Which dimension of each weight is its hidden (embed) dimension, the one split over fsdp; the
# rest of a weight, and the norms, are replicated over fsdp.
FSDP_DIM = {"embed": 1, "lm_head": 0, "layers.q_proj": 1, "layers.k_proj": 1, "layers.v_proj": 1, "layers.o_proj": 2,
            "layers.gate_proj": 1, "layers.up_proj": 1, "layers.down_proj": 2, "value_head.kernel": 0,
            "layers.q_proj_lora_a": 1, "layers.k_proj_lora_a": 1, "layers.v_proj_lora_a": 1,
            "layers.o_proj_lora_b": 2}


def expected_update_argument_bytes(config, fsdp: int, batch_ways: int) -> int:
    """Per chip: frozen + trainable weights, AdamW's two float32 moments of the trainable ones, the batch."""
    from mpo_jax.engine.tiny import tiny_tokenizer
    from mpo_jax.train.model_specs import tiny_config as spec_config

    model = spec_config(config.policy, tiny_tokenizer(config.policy.tiny_vocab_size), value_head=True,
                        trainable=True)
    shapes = {**canonical_param_shapes(model), **lora_param_shapes(model)}

    def per_chip(name):
        elements = math.prod(shapes[name])
        return elements // fsdp if name in FSDP_DIM else elements

    trainable = [n for n in shapes if "_lora_" in n or n.startswith("value_head")]
    weights = 4 * sum(per_chip(n) for n in shapes)
    moments = 2 * 4 * sum(per_chip(n) for n in trainable)
    rows = config.rollouts_per_update // batch_ways
    p, r = config.data.max_prompt_tokens, config.rollout.max_new_tokens
    batch = rows * (p * 4 + p * 1 + r * 4 + r * 1 + 3 * r * 4 + 4 + 1)
    return weights + moments + batch


def _plan(config, topology, **kwargs):
    from mpo_jax.plan.plan import run_plan

    return run_plan(config, parse_topology(topology), config_name="test", **kwargs)


@needs_libtpu
def test_tiny_run_compiles_every_program_on_a_4_chip_v5e():
    from mpo_jax.plan.report import render, to_json

    config = tiny_config(mesh=(1, 4, 1))
    result = _plan(config, "v5e-4")
    data = to_json(result)
    names = set(data["programs"])
    assert {"rollout/prefill", "rollout/decode", "rollout_stats", "judge_logits/prefix_prefill",
            "judge_logits/score_items", "ppo_update", "meta/analysis/prefill", "meta/analysis/decode",
            "meta/merge/prefill"} <= names
    assert data["fits"] is True and result.processes == 1
    assert all(p["hbm_bytes_per_chip"] > 0 for p in data["programs"].values())
    assert data["models"]["policy"]["resident_bytes_per_chip"] > 0
    assert data["margin_bytes_per_chip"] > 0
    json.dumps(data)
    text = render(result)
    assert "ppo_update" in text and "FITS" in text and "estimates" in text
    update = data["programs"]["ppo_update"]
    expected = expected_update_argument_bytes(config, fsdp=4, batch_ways=4)
    assert update["argument_bytes"] == pytest.approx(expected, rel=0.03)
    assert update["alias_bytes"] > 0.5 * update["argument_bytes"]  # the train state is donated


@needs_libtpu
def test_update_on_a_multi_process_v5e_16():
    config = tiny_config(mesh=(4, 4, 1), batch=16, meta=False)
    result = _plan(config, "v5e-16", only=("ppo_update",))
    assert result.processes == 4
    update = next(c for c in result.compiled if c.program.name == "ppo_update")
    assert update.fits
    assert update.argument_bytes == pytest.approx(expected_update_argument_bytes(config, fsdp=4, batch_ways=16),
                                                  rel=0.03)


@needs_libtpu
def test_an_oversized_update_is_reported_as_not_fitting(tmp_path, capsys):
    from mpo_jax.cli import main

    out_json = tmp_path / "plan.json"
    code = main(["plan", "--config", str(ROOT / "configs" / "tiny_cpu.py"), "--topology", "v5e-4", "--only",
                 "ppo_update", "--json", str(out_json), "--config.mesh=(1, 4, 1)", "--config.policy.lora_rank=0",
                 "--config.policy.tiny_hidden_size=8192", "--config.policy.tiny_layers=8"])
    out = capsys.readouterr().out
    assert code == 1
    data = json.loads(out_json.read_text())
    assert data["fits"] is False
    assert data["programs"]["ppo_update"]["fits"] is False
    assert "RESOURCE_EXHAUSTED" in data["programs"]["ppo_update"]["error"]
    assert "gradient_accumulation_steps" in data["programs"]["ppo_update"]["fix"]
    assert "ppo_update" in out and "DOES NOT FIT" in out


def test_batch_shardings_of_the_abstract_batch_match_place_batch():
    from mpo_jax.rl import RolloutBatch, place_batch
    from mpo_jax.rl.compiled import abstract_batch

    mesh = sharding_lib.make_mesh((2, 2, 2))
    b, p, r = 8, 6, 4
    host = RolloutBatch(query=np.zeros((b, p), np.int32), query_mask=np.ones((b, p), bool),
                        response=np.zeros((b, r), np.int32), response_mask=np.ones((b, r), bool),
                        logprobs=np.zeros((b, r), np.float32), ref_logprobs=np.zeros((b, r), np.float32),
                        values=np.zeros((b, r), np.float32), scores=np.zeros((b,), np.float32),
                        contains_eos=np.zeros((b,), bool))
    assert _layout(place_batch(host, mesh)) == _layout(abstract_batch(b, p, r, mesh))
