"""Data pipeline: TFDS ArrayRecord builders of the task JSONL, the billsum mapping, the prompt iterator."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from mpo_jax.data import (
    CatalogUnavailableError,
    PromptBatch,
    PromptIterator,
    billsum_record,
    clean_bill_text,
    epoch_order,
    prepare_task_source,
)
from mpo_jax.tasks import default_data_dir, get_task, task_names

SAMPLES = json.loads((Path(__file__).parent / "fixtures" / "tasks_samples.json").read_text(encoding="utf-8"))
REAL = default_data_dir()
TRICKY = [
    {"id": "a", "prompt": "Ünïcode ✓ — \"quotes\" and \\backslashes\\ {{ 7 * 7 }} <<prompt>>", "n": 1},
    {"id": "b", "prompt": "line\nbreaks\ttabs", "nested": {"list": [1, 2.5, None, True], "empty": {}}, "n": 2},
    {"id": "c", "prompt": "", "float": 0.1, "big": 12345678901234567890, "neg": -3e-12},
]


def _write_jsonl(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _real_lines(task: str, split: str, count: int) -> list[str]:
    path = REAL / get_task(task).data_folder / f"{split}.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n") for line, _ in zip(handle, range(count))]


# -- builders ---------------------------------------------------------------------------------------


def test_jsonl_records_round_trip_exactly(tmp_path: Path) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in TRICKY[:2]] + ["", "   "] + [json.dumps(TRICKY[2])]
    _write_jsonl(tmp_path / "data" / "essay_writing" / "train.jsonl", lines)
    _write_jsonl(tmp_path / "data" / "essay_writing" / "test.jsonl", [json.dumps({"id": "t", "prompt": "x"})])
    tfds_dir = tmp_path / "tfds"
    source = prepare_task_source("essay", "train", data_dir=tmp_path / "data", tfds_dir=tfds_dir)

    assert len(source) == 3  # blank lines are not records
    assert [source[i] for i in range(3)] == TRICKY
    assert source[-1] == TRICKY[2]
    with pytest.raises(IndexError, match="out of range"):
        source[3]
    # The prepared dataset is plain TFDS: readable by name, ArrayRecord on disk, JSON lines verbatim.
    raw = tfds.data_source("mpo_essay", split="train", data_dir=os.fspath(tfds_dir), download=False)
    assert [raw[i]["json"].decode("utf-8") for i in range(3)] == [lines[0], lines[1], lines[4]]
    assert [int(raw[i]["index"]) for i in range(3)] == [0, 1, 2]
    assert list((tfds_dir / "mpo_essay" / "1.0.0").glob("mpo_essay-train.array_record-*"))
    assert prepare_task_source("essay", "test", data_dir=tmp_path / "data", tfds_dir=tfds_dir)[0] == {
        "id": "t", "prompt": "x"}


@pytest.mark.parametrize("task", ["essay", "summarization", "ethics", "math"])
def test_real_task_records_round_trip(tmp_path: Path, task: str) -> None:
    """Real records (the shared data's first lines when present, else the repository's fixtures)."""
    lines = _real_lines(task, "train", 3) or [json.dumps(r, ensure_ascii=False) for r in SAMPLES[task]["records"]]
    _write_jsonl(tmp_path / get_task(task).data_folder / "train.jsonl", lines)
    source = prepare_task_source(task, "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    assert len(source) == len(lines)
    for i, line in enumerate(lines):
        assert source[i] == json.loads(line)
        assert get_task(task).policy_prompt(source[i]) == get_task(task).policy_prompt(json.loads(line))


def test_prepared_dataset_is_reused_and_rebuilt_when_source_changes(tmp_path: Path) -> None:
    path = tmp_path / "data" / "math" / "train.jsonl"
    _write_jsonl(path, [json.dumps({"id": "m0", "problem": "1+1"}), json.dumps({"id": "m1", "problem": "2+2"})])
    kwargs = {"data_dir": tmp_path / "data", "tfds_dir": tmp_path / "tfds"}
    first = prepare_task_source("math", "train", **kwargs)
    assert first.fingerprint == f"mpo_math:train:sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    shard = next((tmp_path / "tfds" / "mpo_math" / "1.0.0").glob("*.array_record-*"))
    stamp = shard.stat().st_mtime_ns
    os.utime(shard, ns=(stamp - 10**9, stamp - 10**9))  # an unchanged shard keeps this older time

    again = prepare_task_source("math", "train", **kwargs)
    assert again.fingerprint == first.fingerprint
    assert shard.stat().st_mtime_ns == stamp - 10**9  # reused, not rewritten
    assert again[1] == {"id": "m1", "problem": "2+2"}

    _write_jsonl(path, [json.dumps({"id": "m0", "problem": "1+1"}), json.dumps({"id": "m1", "problem": "3+3"}),
                        json.dumps({"id": "m2", "problem": "4+4"})])
    changed = prepare_task_source("math", "train", **kwargs)
    assert changed.fingerprint != first.fingerprint
    assert len(changed) == 3
    assert [changed[i]["problem"] for i in range(3)] == ["1+1", "3+3", "4+4"]

    # A new split rebuilds the dataset, but the train split's content (and fingerprint) stays.
    _write_jsonl(path.with_name("test.jsonl"), [json.dumps({"id": "t0", "problem": "5+5"})])
    assert prepare_task_source("math", "test", **kwargs)[0] == {"id": "t0", "problem": "5+5"}
    assert prepare_task_source("math", "train", **kwargs).fingerprint == changed.fingerprint


def test_missing_or_bad_jsonl_errors(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "essay_writing" / "train.jsonl", [json.dumps({"id": "e"})])
    with pytest.raises(FileNotFoundError, match=r"essay_writing/test\.jsonl does not exist \(found train\)"):
        prepare_task_source("essay", "test", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"no math data folder at .*math; pass data_dir=DIR"):
        prepare_task_source("math", "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    _write_jsonl(tmp_path / "ethical_reasoning" / "train.jsonl", [json.dumps({"id": "x"}), "[1, 2]"])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: expected a JSON object, got list"):
        prepare_task_source("ethics", "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    _write_jsonl(tmp_path / "math" / "train.jsonl", ['{"id": "m",'])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: not valid JSON"):
        prepare_task_source("math", "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        prepare_task_source("poetry", "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds")
    with pytest.raises(ValueError, match="source must be 'jsonl' or 'tfds_catalog'"):
        prepare_task_source("essay", "train", data_dir=tmp_path, tfds_dir=tmp_path / "tfds", source="csv")


# -- TFDS catalog (billsum), without network ---------------------------------------------------------


def test_clean_bill_text_by_hand() -> None:
    raw = "SEC. 2.  ``Short'' \n    title  here.\n\n\n\n    (a) In  general.--Text \nwraps.  "
    assert clean_bill_text(raw) == 'SEC. 2. "Short" title here.\n\n(a) In general.--Text wraps.'


def test_billsum_mapping_matches_our_summarization_fields() -> None:
    lines = _real_lines("summarization", "train", 5)
    if not lines:
        pytest.skip(f"no summarization data at {REAL}")
    for line in lines:
        ours = json.loads(line)
        example = {key: ours[key].encode("utf-8") for key in ("text", "summary", "title")}  # as TFDS returns Text
        mapped = billsum_record(example, "train", 7)
        for key in ("title", "text", "summary", "clean_text", "clean_summary", "clean_text_words", "source_split"):
            assert mapped[key] == ours[key], key
        assert mapped["id"] == "billsum-train-00007"


def test_catalog_source_errors_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"no TFDS catalog dataset .* essay .*summarization \(billsum\).*'jsonl'"):
        prepare_task_source("essay", "train", tfds_dir=tmp_path, source="tfds_catalog")
    with pytest.raises(ValueError, match="billsum has no split 'validation'; choose one of train, test, ca_test"):
        prepare_task_source("summarization", "validation", tfds_dir=tmp_path, source="tfds_catalog")
    with pytest.raises(CatalogUnavailableError, match=r"'billsum' is not prepared .*download=False.*build billsum"):
        prepare_task_source("summarization", "train", tfds_dir=tmp_path, source="tfds_catalog", download=False)

    def offline(self, *args, **kwargs):
        raise ConnectionError("no route to drive.google.com")

    monkeypatch.setattr(tfds.builder_cls("billsum"), "download_and_prepare", offline)
    with pytest.raises(CatalogUnavailableError, match=r"'billsum'.*ConnectionError: no route.*source='jsonl'"):
        prepare_task_source("summarization", "train", tfds_dir=tmp_path, source="tfds_catalog")


def test_catalog_source_reads_a_locally_prepared_billsum(tmp_path: Path) -> None:
    """billsum prepared from a local file in BillSum's own schema, then read through source='tfds_catalog'."""
    bills = [{"bill_id": f"b{i}", "text": f"SECTION {i}.  ``Act'' \n  text {i}", "summary": f"Sum {i}.",
              "title": f"Title {i}", "text_len": 1, "sum_len": 1} for i in range(3)]
    _write_jsonl(tmp_path / "us_train.jsonl", [json.dumps(b) for b in bills])
    billsum = tfds.builder_cls("billsum")

    class LocalBillsum(billsum, skip_registration=True):
        """TFDS's billsum builder with its download replaced by the local file."""

        name = "billsum"
        code_path = epath.Path(inspect.getfile(billsum))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(path=os.fspath(tmp_path / "us_train.jsonl"), key="bill_id")}

    LocalBillsum(data_dir=os.fspath(tmp_path / "tfds"), file_format="array_record").download_and_prepare()

    source = prepare_task_source("summarization", "train", tfds_dir=tmp_path / "tfds", source="tfds_catalog",
                                 download=False)
    records = sorted((source[i] for i in range(len(source))), key=lambda r: r["title"])
    assert [r["title"] for r in records] == ["Title 0", "Title 1", "Title 2"]
    assert records[1]["clean_text"] == 'SECTION 1. "Act" text 1'
    assert records[1]["summary"] == "Sum 1."
    assert source.fingerprint.startswith("tfds:billsum/3.0.0:train:3")
    assert get_task("summarization").policy_prompt(records[0])[0]["content"].count("SECTION 0.") == 1


# -- epoch order --------------------------------------------------------------------------------------

M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_epoch_order_matches_a_pure_python_reference() -> None:
    for seed, epoch, size in [(0, 0, 17), (3, 1, 40), (2**63 + 5, 7, 9)]:
        key = _splitmix64((_splitmix64(seed) + epoch) & M64)
        expected = sorted(range(size), key=lambda i, key=key: _splitmix64(i ^ key))
        assert epoch_order(size, seed, epoch).tolist() == expected
    assert epoch_order(5, 1, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


# -- prompt iterator ------------------------------------------------------------------------------------


def _records(lengths: list[int]) -> list[dict]:
    return [{"id": f"r{i}", "length": n} for i, n in enumerate(lengths)]


def _encode(record: dict) -> list[int]:
    """Token ids whose count is the record's `length` and whose values identify the record."""
    return [int(record["id"][1:])] * record["length"]


def _take(iterator: PromptIterator, count: int) -> list[PromptBatch]:
    return [next(iterator) for _ in range(count)]


def _ids(batches: list[PromptBatch]) -> list[list[int]]:
    return [b.indices for b in batches]


def test_same_seed_same_batches_and_different_seed_differs() -> None:
    source = _records([3] * 40)

    def make(seed: int) -> PromptIterator:
        return PromptIterator(source, _encode, batch_size=4, max_prompt_tokens=8, seed=seed)

    a, b, c = _take(make(5), 12), _take(make(5), 12), _take(make(6), 12)
    assert a == b
    assert _ids(a) != _ids(c)
    for batch in a:
        assert batch.records == [source[i] for i in batch.indices]
        assert batch.prompt_ids == [[i] * 3 for i in batch.indices]


def test_every_record_once_per_epoch_with_a_fresh_order() -> None:
    it = PromptIterator(_records([2] * 24), _encode, batch_size=4, max_prompt_tokens=2, seed=1)
    batches = _take(it, 13)
    epochs = [[i for b in batches[k * 6:(k + 1) * 6] for i in b.indices] for k in range(2)]
    for flat in epochs:
        assert sorted(flat) == list(range(24))
    assert epochs[0] != epochs[1]
    assert [b.epoch for b in batches] == [0] * 6 + [1] * 6 + [2]
    assert [b.step for b in batches] == list(range(13))
    assert epochs[0] == epoch_order(24, 1, 0).tolist()


def test_epoch_remainder_is_dropped_and_not_shuffle_keeps_order() -> None:
    it = PromptIterator(_records([1] * 10), _encode, batch_size=4, max_prompt_tokens=1, shuffle=False,
                        num_epochs=2)
    batches = list(it)
    assert _ids(batches) == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert [b.epoch for b in batches] == [0, 0, 1, 1]


def test_resume_from_state_replays_the_following_batches() -> None:
    lengths = [1 + (7 * i) % 9 for i in range(30)]  # some longer than the limit: filtering must replay too
    make = lambda: PromptIterator(_records(lengths), _encode, batch_size=3, max_prompt_tokens=6, seed=11)
    first = make()
    _take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    assert len(json.dumps(state)) < 400
    following = _take(first, 9)  # crosses at least one epoch boundary
    assert len({b.epoch for b in following}) > 1

    resumed = make()
    resumed.set_state(state)
    assert _take(resumed, 9) == following
    assert resumed.get_state() == first.get_state()


def test_processes_get_disjoint_shares_of_the_same_global_batch() -> None:
    lengths = [1 + (5 * i) % 7 for i in range(50)]
    kw = {"max_prompt_tokens": 5, "seed": 3}
    single = _take(PromptIterator(_records(lengths), _encode, batch_size=6, **kw), 10)
    shares = [_take(PromptIterator(_records(lengths), _encode, batch_size=3, process_index=p, process_count=2, **kw),
                    10) for p in range(2)]
    for step, batch in enumerate(single):
        a, b = shares[0][step], shares[1][step]
        assert not set(a.indices) & set(b.indices)
        assert a.indices + b.indices == batch.indices
        assert a.prompt_ids + b.prompt_ids == batch.prompt_ids
        assert a.epoch == b.epoch == batch.epoch

    # The global stream does not depend on the process count: a 2-process state resumes on 1 process.
    two = PromptIterator(_records(lengths), _encode, batch_size=3, process_index=1, process_count=2, **kw)
    _take(two, 4)
    one = PromptIterator(_records(lengths), _encode, batch_size=6, **kw)
    one.set_state(two.get_state())
    assert _ids(_take(one, 6)) == _ids(single[4:10])


def test_long_prompts_are_filtered_and_counted() -> None:
    lengths = [(i * 37) % 13 + 1 for i in range(60)]
    limit = 8
    kept = {i for i, n in enumerate(lengths) if n <= limit}
    global_batch = 4
    per_epoch = len(kept) // global_batch
    it = PromptIterator(_records(lengths), _encode, batch_size=global_batch, max_prompt_tokens=limit, seed=2)
    epoch0 = _take(it, per_epoch)
    seen = [i for b in epoch0 for i in b.indices]
    assert len(seen) == len(set(seen)) == per_epoch * global_batch
    assert set(seen) <= kept
    assert all(len(ids) <= limit for b in epoch0 for ids in b.prompt_ids)
    next(it)  # walks the rest of epoch 0, so every length is known
    assert it.num_checked == 60
    assert it.num_filtered == sum(n > limit for n in lengths) == 60 - len(kept)


def test_encoding_is_lazy() -> None:
    calls: list[str] = []

    def counting(record: dict) -> list[int]:
        calls.append(record["id"])
        return _encode(record)

    source = _records([2] * 1000)
    next(PromptIterator(source, counting, batch_size=4, max_prompt_tokens=4, seed=0))
    assert len(calls) == 4
    calls.clear()
    next(PromptIterator(source, counting, batch_size=4, max_prompt_tokens=4, process_index=1, process_count=2))
    assert len(calls) == 8  # the global batch's lengths decide the shares; nothing beyond it is encoded


def test_nothing_left_after_filtering_is_an_error() -> None:
    it = PromptIterator(_records([9, 10, 11]), _encode, batch_size=1, max_prompt_tokens=8)
    with pytest.raises(ValueError, match=r"only 0 of 3 records have prompts of at most 8 tokens \(3 filtered out\)"):
        next(it)
    few = PromptIterator(_records([1, 1, 1, 20]), _encode, batch_size=2, process_count=2, max_prompt_tokens=8)
    with pytest.raises(ValueError, match=r"only 3 of 4 .*one global batch of 4 \(2 per process x 2 processes\)"):
        next(few)


def test_bad_state_errors() -> None:
    source = _records([1] * 20)
    it = PromptIterator(source, _encode, batch_size=2, max_prompt_tokens=4, seed=1)
    next(it)
    state = it.get_state()

    def restore(other: PromptIterator, bad: object) -> None:
        other.set_state(bad)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"seed: state has 1, this iterator has 2"):
        restore(PromptIterator(source, _encode, batch_size=2, max_prompt_tokens=4, seed=2), state)
    with pytest.raises(ValueError, match=r"source_size: state has 20, this iterator has 19"):
        restore(PromptIterator(source[:19], _encode, batch_size=2, max_prompt_tokens=4, seed=1), state)
    with pytest.raises(ValueError, match=r"global_batch_size: state has 2, this iterator has 4"):
        restore(PromptIterator(source, _encode, batch_size=4, max_prompt_tokens=4, seed=1), state)
    with pytest.raises(ValueError, match=r"max_prompt_tokens: state has 4, this iterator has 5"):
        restore(PromptIterator(source, _encode, batch_size=2, max_prompt_tokens=5, seed=1), state)
    with pytest.raises(ValueError, match="state lacks position"):
        restore(it, {k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ValueError, match="state format is None"):
        restore(it, {"epoch": 0})
    with pytest.raises(ValueError, match=r"0 <= position <= 20"):
        restore(it, {**state, "position": 21})
    with pytest.raises(TypeError, match="must be a dict from PromptIterator.get_state"):
        restore(it, [state])
    assert it.get_state() == state  # failed restores change nothing


def test_source_change_is_detected_on_restore(tmp_path: Path) -> None:
    path = tmp_path / "data" / "essay_writing" / "train.jsonl"
    _write_jsonl(path, [json.dumps({"id": f"e{i}", "prompt": "p" * i}) for i in range(1, 9)])
    kwargs = {"data_dir": tmp_path / "data", "tfds_dir": tmp_path / "tfds"}
    encode = lambda record: list(record["prompt"].encode())
    it = PromptIterator(prepare_task_source("essay", "train", **kwargs), encode, batch_size=2, max_prompt_tokens=6)
    batch = next(it)
    assert all(len(r["prompt"]) <= 6 for r in batch.records)
    assert batch.prompt_ids == [list(r["prompt"].encode()) for r in batch.records]

    _write_jsonl(path, [json.dumps({"id": f"e{i}", "prompt": "q" * i}) for i in range(1, 9)])
    changed = PromptIterator(prepare_task_source("essay", "train", **kwargs), encode, batch_size=2,
                             max_prompt_tokens=6)
    with pytest.raises(ValueError, match="source_fingerprint: state has 'mpo_essay:train:sha256:"):
        changed.set_state(it.get_state())


def test_constructor_errors() -> None:
    source = _records([1] * 4)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        PromptIterator(source, _encode, batch_size=0, max_prompt_tokens=4)
    with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\), got 2"):
        PromptIterator(source, _encode, batch_size=1, max_prompt_tokens=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="source holds no records"):
        PromptIterator([], _encode, batch_size=1, max_prompt_tokens=4)
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        PromptIterator(source, _encode, batch_size=1, max_prompt_tokens=4, seed=1.5)
    with pytest.raises(TypeError, match=r"encode\(source\[\d\]\) returned a str"):
        next(PromptIterator(source, lambda r: "text", batch_size=1, max_prompt_tokens=4))
    with pytest.raises(ValueError, match="returned no token ids"):
        next(PromptIterator(source, lambda r: [], batch_size=1, max_prompt_tokens=4))
    assert np.array_equal(epoch_order(3, 0, 0, shuffle=False), [0, 1, 2])
    assert set(task_names()) == {"essay", "summarization", "ethics", "math"}
