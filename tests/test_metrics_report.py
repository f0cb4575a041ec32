"""Metrics writer (metrics.jsonl, TensorBoard, progress bar) and the run report.

TensorBoard files are read back with an independent TFRecord + protobuf wire-format reader written
here (CRC32C checked), not with the writer's own library.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from mpo_jax.reward.meta import MetaResult, MetaSample
from mpo_jax.reward.rubric_history import RubricHistory
from mpo_jax.rubric import Rubric
from mpo_jax.train import report, report_plots
from mpo_jax.train.metrics import METRICS_FILE, MetricsWriter, markdown_fence, progress_text, read_metrics

SCRIPT = '<script>alert("pwned")</script>'
IMG = "<img src=x onerror=alert(1)>"


# -- independent readers ----------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _tfrecords(path: Path) -> list[bytes]:
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        assert length_crc == _masked_crc32c(data[pos:pos + 8]), "bad length CRC"
        body = data[pos + 12:pos + 12 + length]
        (body_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
        assert body_crc == _masked_crc32c(body), "bad data CRC"
        records.append(body)
        pos += 12 + length + 4
    return records


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of one protobuf message."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.append((number, wire, value))
    return out


def _events(logdir: Path) -> list[dict]:
    """Every event under `logdir` as {'step', 'scalars': {tag: float}, 'texts': {tag: str}, 'session_start'}."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in _tfrecords(path):
            event = {"step": 0, "scalars": {}, "texts": {}, "session_start": False}
            for number, _, value in _fields(record):
                if number == 2:
                    event["step"] = value
                elif number == 5:
                    for vnum, _, value_msg in _fields(value):
                        assert vnum == 1
                        parts = {n: v for n, _, v in _fields(value_msg)}
                        tag = parts[1].decode()
                        if 2 in parts:
                            event["scalars"][tag] = struct.unpack("<f", parts[2])[0]
                        if 8 in parts:
                            strings = [v for n, _, v in _fields(parts[8]) if n == 8]
                            event["texts"][tag] = strings[0].decode("utf-8")
                elif number == 7:
                    event["session_start"] = dict((n, v) for n, _, v in _fields(value)).get(1) == 1
            events.append(event)
    return events


def _check_png(path: Path) -> tuple[int, int]:
    """Validate PNG framing (signature, chunk CRCs, IHDR first, IEND last); returns (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds, size = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    assert size is not None and size[0] > 0 and size[1] > 0
    return size


def _outside_fences(markdown: str) -> str:
    """The Markdown text that is not inside a backtick-fenced code block."""
    kept, fence = [], None
    for line in markdown.split("\n"):
        match = re.match(r"^(`{3,})", line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            kept.append(line)
    assert fence is None, "unclosed fence"
    return "\n".join(kept)


# -- metrics.jsonl ----------------------------------------------------------------------------------


def _writer(path: Path, **kwargs) -> MetricsWriter:
    kwargs.setdefault("tensorboard", False)
    kwargs.setdefault("progress", False)
    return MetricsWriter(path, enabled=True, **kwargs)


def test_metrics_jsonl_round_trip_with_non_finite_values(tmp_path: Path) -> None:
    values = [
        {"score/mean": 0.25, "objective/kl": math.nan, "rubric/items": 3},
        {"score/mean": np.float32(0.5), "objective/kl": math.inf, "rubric/items": np.int64(4)},
        {"score/mean": np.array(-1.5), "objective/kl": -math.inf, "meta/step": True},
    ]
    with _writer(tmp_path) as writer:
        for update, metrics in enumerate(values):
            writer.write(update, metrics, wall_time=1000.0 + update)

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    raw = [json.loads(line, parse_constant=no_constants)
           for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [row["objective/kl"] for row in raw] == ["NaN", "Infinity", "-Infinity"]
    assert raw[1]["rubric/items"] == 4 and isinstance(raw[1]["rubric/items"], int)
    assert raw[2]["meta/step"] == 1 and raw[2]["time"] == 1002.0

    records = read_metrics(tmp_path)
    assert [r["update"] for r in records] == [0, 1, 2]
    assert math.isnan(records[0]["objective/kl"])
    assert records[1]["objective/kl"] == math.inf and records[2]["objective/kl"] == -math.inf
    assert records[1]["score/mean"] == 0.5 and records[2]["score/mean"] == -1.5
    assert records[0]["rubric/items"] == 3


def test_resume_drops_updates_at_or_after_the_resume_point(tmp_path: Path) -> None:
    with _writer(tmp_path) as writer:
        for update in range(6):
            writer.write(update, {"x": float(update)})
    with open(tmp_path / METRICS_FILE, "a") as handle:  # a kill in the middle of a line
        handle.write('{"update": 6, "ti')
    with pytest.raises(FileExistsError, match="resume_from_update"):
        _writer(tmp_path)
    with _writer(tmp_path, resume_from_update=4) as writer:
        assert [r["update"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="updates must increase"):
            writer.write(3, {"x": 0.0})
        writer.write(4, {"x": 40.0})
        writer.write(5, {"x": 50.0})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["update"] for line in lines] == [0, 1, 2, 3, 4, 5]
    assert [r["x"] for r in read_metrics(tmp_path)] == [0.0, 1.0, 2.0, 3.0, 40.0, 50.0]


def test_disabled_writer_touches_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir, enabled=False)
    record = writer.write(0, {"score/mean": math.nan})
    writer.write_text("note", "hello", 0)
    writer.close()
    assert record["score/mean"] == "NaN"
    assert not run_dir.exists()


def test_bad_input_is_named(tmp_path: Path) -> None:
    with _writer(tmp_path) as writer:
        with pytest.raises(TypeError, match="'objective/kl' must be a"):
            writer.write(0, {"objective/kl": "high"})
        with pytest.raises(TypeError, match="'v'"):
            writer.write(0, {"v": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(0, {"update": 1.0})
        with pytest.raises(ValueError, match="update must be an int >= 0"):
            writer.write(-1, {"x": 1.0})
    (tmp_path / METRICS_FILE).write_text('{"update": 0, "x": 1}\nnot json\n{"update": 2, "x": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics record"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "elsewhere")


def test_progress_bar_shows_key_metrics(tmp_path: Path) -> None:
    assert progress_text({"score/mean": 0.51234, "objective/kl": 0.01, "rubric/iteration": 2}) == \
        "score=0.5123 kl=0.01 rubric=2"
    assert progress_text({"objective/scores": -1.0}) == "score=-1"
    stream = io.StringIO()
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, total_updates=10, progress_file=stream) as writer:
        for update in range(3):
            writer.write(update, {"score/mean": 0.5, "objective/kl": 0.25, "rubric/iteration": 1})
    text = stream.getvalue()
    assert "3/10" in text and "kl=0.25" in text and "rubric=1" in text


# -- TensorBoard ------------------------------------------------------------------------------------


def test_tensorboard_event_files_hold_the_scalars_and_rubric_text(tmp_path: Path) -> None:
    rubric = Rubric(("Be concise.", f"No {SCRIPT}."), iteration=2, created_step=1)
    with _writer(tmp_path, tensorboard=True) as writer:
        writer.write(0, {"objective/kl": 0.125, "score/mean": 0.1, "bad name!": 2.0})
        writer.write(1, {"objective/kl": math.nan, "score/mean": 0.3})
        writer.write_rubric(rubric, 1)
    events = _events(tmp_path / "tensorboard")
    scalars = {(e["step"], tag): value for e in events for tag, value in e["scalars"].items()}
    assert scalars[(0, "objective/kl")] == 0.125
    assert scalars[(0, "score/mean")] == float(np.float32(0.1))
    assert scalars[(0, "bad_name_")] == 2.0
    assert math.isnan(scalars[(1, "objective/kl")])
    assert scalars[(1, "score/mean")] == float(np.float32(0.3))
    texts = [(e["step"], tag, text) for e in events for tag, text in e["texts"].items()]
    assert len(texts) == 1 and texts[0][0] == 1 and texts[0][1].startswith("rubric")
    assert "iteration 2" in texts[0][2] and rubric.render() in texts[0][2]
    assert texts[0][2].rstrip().endswith("```")  # fenced: TensorBoard renders text as Markdown

    with _writer(tmp_path, tensorboard=True, resume_from_update=1) as writer:
        writer.write(1, {"objective/kl": 0.5})
    events = _events(tmp_path / "tensorboard")
    assert [e["step"] for e in events if e["session_start"]] == [1]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_markdown_fence_outlasts_backticks_in_the_text() -> None:
    text = "a ```` b\n```\nc"
    fenced = markdown_fence(text)
    assert fenced.startswith("`````\n") and fenced.endswith("\n`````")
    assert _outside_fences(fenced + "\n") == ""


# -- the report -------------------------------------------------------------------------------------


def _make_run(run_dir: Path, *, with_rollouts: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"task": "essay", "total_updates": 10}))
    meta_updates = {4, 6, 8}
    with MetricsWriter(run_dir, enabled=True, tensorboard=False, progress=False) as writer:
        for update in range(10):
            metrics = {"score/mean": 0.1 * update, "score/std": 0.05, "objective/kl": 0.01 * update,
                       "response/length_mean": 100.0 + update, "rubric/items": 2 + (update >= 4) + (update >= 8),
                       "rubric/tokens": 50.0 + 10 * update, "policy/approxkl_avg": math.nan}
            if update in meta_updates:
                metrics["meta/step"] = 1
            writer.write(update, metrics, wall_time=1_700_000_000.0 + update)
    history = RubricHistory(Rubric(("Is the essay on topic?", f"Clarity {SCRIPT}"), task="essay", created_step=0))
    first = history.current
    second = history.append(Rubric(first.items + ("Uses evidence.",)), reason="meta step at update 4",
                            created_step=4)
    history.propose(f"<rubric><item>{IMG}", reason="meta step at update 6", created_step=6)
    history.append(Rubric(second.items + ("No **bold** [link](http://evil.example)",)),
                   reason="meta step at update 8", created_step=8)
    history.save(run_dir)
    samples = [MetaSample({"prompt": "Write about cats"}, f"Cats {SCRIPT}", 0.9)]
    result = MetaResult(rubric=second, accepted=True, reason="refined", previous=first, selected=[0],
                        prescreen=[None], analyses=[f"The judge missed {IMG}"], refinements=["r"],
                        merged_text="m", timing={"total": 1.5})
    result.save(run_dir, 4, samples)
    if with_rollouts:
        rows = [{"update": u, "prompt": [{"role": "user", "content": f"Essay {u}"}],
                 "response": f"Answer {u} {SCRIPT}", "score": 0.5, "rubric_iteration": 0 if u < 4 else 1}
                for u in range(6)]
        (run_dir / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_meta_markers_are_at_the_accepted_and_kept_updates(tmp_path: Path) -> None:
    _make_run(tmp_path)
    markers = report.meta_markers(report.load_run(tmp_path))
    assert markers == report.MetaMarkers(accepted=(4, 8), kept=(6,))

    from matplotlib.figure import Figure

    ax = Figure().add_subplot(1, 1, 1)
    report_plots.draw_markers(ax, markers)
    xs = sorted(line.get_xdata()[0] for line in ax.lines)
    assert xs == [4, 6, 8]
    assert {line.get_xdata()[0]: line.get_linestyle() for line in ax.lines} == {4: "-", 6: ":", 8: "-"}


def test_report_writes_valid_plots_and_pages(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _make_run(run_dir)
    out = report.write_report(run_dir, rollouts_per_version=2)
    assert out == run_dir / "report"
    for name in ("score", "kl", "response_length", "rubric_length"):
        path = out / f"{name}.png"
        assert path.stat().st_size > 1000
        _check_png(path)
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in ("score", "kl", "response_length", "rubric_length"):
        assert f"]({name}.png)" in md
    assert page.count("data:image/png;base64,") == 4 and 'src="' + "score.png" not in page

    # Rubric versions, the diff and the rejected proposal.
    assert "Uses evidence." in md and "+Uses evidence." in md and '<span class="add">+Uses evidence.</span>' in page
    assert "Attempt 2 at update 6" in page and "expected exactly one &lt;rubric&gt;" in page
    # Last metrics: NaN is shown, numbers are the last update's.
    assert "<td>policy/approxkl_avg</td><td>NaN</td>" in page and "<td>score/mean</td><td>0.9</td>" in page
    # The two most recent rollouts per rubric iteration (iteration 0: updates 2, 3; iteration 1: 4, 5).
    shown = sorted(int(n) for n in re.findall(r"Answer (\d)", md))
    assert shown == [2, 3, 4, 5]


def test_report_escapes_model_text(tmp_path: Path) -> None:
    _make_run(tmp_path)
    out = report.write_report(tmp_path)
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert html_escaped(SCRIPT) in page and html_escaped(IMG) in page
    assert "Answer 5 " + html_escaped(SCRIPT) in page  # a response
    assert "Clarity " + html_escaped(SCRIPT) in page  # a rubric item
    assert "Content-Security-Policy" in page
    # Markdown: untrusted text only inside fences; outside them no raw tag, link or emphasis survives.
    assert SCRIPT in md
    outside = _outside_fences(md)
    assert "<script" not in outside and "<img" not in outside and "](http" not in outside
    assert re.search(r"(?<![\\!])[<*\[]", outside) is None  # escaped, images aside


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


MARKUP = ["a *b* [c](http://x) <i>&amp; | `d`", "# not a heading", "###### nor this", "- not a list", "+ nor this",
          "1. not a list", "2) nor this", "> not a quote", "---", "- - -", "___", "_under_ and snake_case",
          "~~struck~~", "a \\* b", "ends with ##", "<http://x.org>", "![img](y.png)", "x] y [z", "**bold**",
          "a | b | c", "line one\nline two", "&#65; &lt;", "`code` ``more``"]
PLAIN = "Reason: meta-step at update 4.5 (3 items, 40 characters); see policy/approxkl_avg - done."


def _inline_text(token) -> str:
    """The literal text of an inline token: fails if markdown-it found any markup in it."""
    kinds = {child.type for child in token.children}
    assert kinds <= {"text", "text_special"}, (kinds, token.content)
    return "".join(child.content for child in token.children)


@pytest.mark.parametrize("context", ["paragraph", "heading", "cell", "alt", "any"])
def test_markdown_text_shows_markup_characters_literally(context: str) -> None:
    """A CommonMark parser (markdown-it, with GFM tables and strikethrough) reads the text back unchanged."""
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"])
    for text in [*MARKUP, PLAIN]:
        escaped = report.markdown_text(text, context)
        expected = " ".join(text.split())
        if context in ("paragraph", "any"):
            tokens = md.parse(escaped)
            assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"], (text, escaped)
            assert _inline_text(tokens[1]) == expected
        if context in ("heading", "any"):
            tokens = md.parse(f"## {escaped}")
            assert [t.type for t in tokens] == ["heading_open", "inline", "heading_close"], (text, escaped)
            assert _inline_text(tokens[1]) == expected
        if context in ("cell", "any"):
            tokens = md.parse(f"| name | value |\n|---|---|\n| {escaped} | 1 |")
            cells = [t for t in tokens if t.type == "inline"]
            assert [_inline_text(t) for t in cells] == ["name", "value", expected, "1"], (text, escaped)
        if context in ("alt", "any"):
            tokens = md.parse(f"![{escaped}](plot.png)")
            (image,) = tokens[1].children
            assert image.type == "image" and image.attrs["src"] == "plot.png", (text, escaped)
            assert _inline_text(image) == expected


def test_markdown_text_leaves_ordinary_punctuation_alone() -> None:
    for context in ("paragraph", "heading", "cell", "alt", "any"):
        assert report.markdown_text(PLAIN, context) == PLAIN


def test_report_markdown_reads_as_plain_text(tmp_path: Path) -> None:
    _make_run(tmp_path)
    md = (report.write_report(tmp_path) / "report.md").read_text()
    outside = _outside_fences(md)
    assert re.search(r"\\[:.\-]", outside) is None, re.findall(r".{0,30}\\[:.\-].{0,30}", outside)
    # sentences, headings and table rows as a reader of the plain file sees them
    assert "Created at update 4; refined from iteration 0; 3 items, " in outside
    assert "## Meta step at update 4" in outside and "Outcome: accepted; rubric iteration" in outside
    assert "| policy/approxkl_avg | NaN |" in outside and "| score/mean | 0.9 |" in outside
    assert "Update 5, score 0.5. Prompt:" in outside


def _fenced_blocks(markdown: str) -> list[str]:
    """The contents of every backtick-fenced block, as written."""
    blocks, current, fence = [], [], None
    for line in markdown.split("\n"):
        match = re.match(r"^(`{3,})", line)
        if fence is None and match:
            fence, current = match.group(1), []
        elif fence is not None and line == fence:
            blocks.append("\n".join(current))
            fence = None
        elif fence is not None:
            current.append(line)
    return blocks


def test_model_text_with_markdown_characters_is_fenced_verbatim(tmp_path: Path) -> None:
    _make_run(tmp_path, with_rollouts=False)
    response = "# Title\n- item **bold** [x](http://y) `code` 1. x | y\n```\nrm -rf /\n```\n<b>&amp;</b> \\_done_"
    row = {"update": 9, "prompt": "Write *this* & that", "response": response, "score": 1.0, "rubric_iteration": 2}
    (tmp_path / "rollouts.jsonl").write_text(json.dumps(row) + "\n")
    md = (report.write_report(tmp_path) / "report.md").read_text()
    blocks = _fenced_blocks(md)
    assert response in blocks and "Write *this* & that" in blocks
    assert "No **bold** [link](http://evil.example)" in blocks  # a rubric item
    assert "rm -rf /" not in _outside_fences(md)
    markdown_it = pytest.importorskip("markdown_it")
    fences = [t for t in markdown_it.MarkdownIt("commonmark").parse(md) if t.type == "fence"]
    assert response + "\n" in [t.content for t in fences]  # a CommonMark parser sees the same block


def test_report_files_have_the_usual_permissions(tmp_path: Path) -> None:
    _make_run(tmp_path)
    old = os.umask(0o022)
    try:
        out = report.write_report(tmp_path)
    finally:
        os.umask(old)
    for name in ("report.md", "report.html", "score.png"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode & 0o044 == 0o044 and mode & 0o022 == 0, (name, oct(mode))  # 0644: others may read
    old = os.umask(0o077)
    try:
        out = report.write_report(tmp_path)  # a private umask is respected
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "report.md").stat().st_mode) == 0o600


def test_report_with_missing_optional_pieces(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"task": "essay"}))
    out = report.write_report(tmp_path, tmp_path / "out")
    md = (out / "report.md").read_text()
    assert "No metrics yet" in md and "No example rollouts" in md and "No meta step has run yet" in md
    assert "No rubric versions found" in md
    assert not list(out.glob("*.png"))

    run_dir = tmp_path / "early"
    _make_run(run_dir, with_rollouts=False)
    for path in run_dir.glob("meta_evaluation_*.json"):
        path.unlink()
    out = report.write_report(run_dir)
    md = (out / "report.md").read_text()
    assert "No example rollouts" in md and "No meta step has run yet" in md
    assert len(list(out.glob("*.png"))) == 4


def test_report_history_without_meta_steps_says_so(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, progress=False) as writer:
        writer.write(0, {"score/mean": 0.5})
    RubricHistory(Rubric(("Only item.",), created_step=0)).save(tmp_path)
    (tmp_path / "rollouts.jsonl").write_text('{"update": 0, "response": "ok", "rubric_iteration": 0}\n{"upd\n')
    run = report.load_run(tmp_path)
    assert report.meta_markers(run) == report.MetaMarkers(accepted=(), kept=())
    assert len(run.rollouts) == 1 and "skipped 1 line" in run.problems[0]
    md = (report.write_report(tmp_path) / "report.md").read_text()
    assert "No meta step has produced a new rubric yet" in md and "No rejected proposals" in md
    assert "skipped 1 line" in md
    assert (tmp_path / "report" / "score.png").is_file() and not (tmp_path / "report" / "kl.png").exists()
    _check_png(tmp_path / "report" / "rubric_length.png")  # drawn from the rubric history instead


def test_not_a_run_dir_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(report.ReportError, match="neither metrics.jsonl nor config.json"):
        report.write_report(tmp_path)
    assert report.report_main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err

    _make_run(tmp_path / "run", with_rollouts=False)
    assert report.report_main([str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere")]) == 0
    assert str(tmp_path / "elsewhere") in capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "report.html").is_file()
