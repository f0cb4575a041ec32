"""RemoteChatModel against a scripted fake OpenAI-compatible server on 127.0.0.1.

Every test starts its own `ThreadingHTTPServer` on an ephemeral loopback port. The server
answers at most `max_requests` requests, shuts itself down after `lifetime_s` and is stopped
when the test ends; nothing else is contacted.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import socket
import threading
import time
import traceback

import pytest
from fake_openai import FakeServer, Reply, error, ok

from mpo_jax.engine.remote import RemoteBackendError, RemoteChatModel, _retry_after_seconds, parse_choice, parse_integer

KEY_ENV = "MPO_TEST_REMOTE_KEY"
SECRET = "sk-test-SECRET-9f8e7d6c5b4a"


@pytest.fixture
def serve():
    servers: list[FakeServer] = []

    def start(respond, **kwargs) -> FakeServer:
        server = FakeServer(respond, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def client(server: FakeServer, **kwargs) -> RemoteChatModel:
    options = dict(api_key_env=KEY_ENV, timeout_s=2.0, max_retries=2, backoff_s=0.01)
    options.update(kwargs)
    return RemoteChatModel(server.url, "judge-model", **options)


def record_sleeps(model: RemoteChatModel) -> list[float]:
    sleeps: list[float] = []
    model._sleep = sleeps.append
    return sleeps


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate it."}]


# -- requests --------------------------------------------------------------------------------
def test_request_body_and_authorization_from_env_at_call_time(serve, monkeypatch):
    server = serve(lambda i, seen: ok("fine"))
    model = client(server, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    monkeypatch.setenv(KEY_ENV, SECRET)  # set after construction: read at call time
    out = model.chat_batch([CHAT], max_tokens=7, temperature=0.5, top_p=0.9, stop=["\n\n"], seed=3)
    assert out == ["fine"]
    (seen,) = server.seen
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {SECRET}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {"model": "judge-model", "messages": CHAT, "temperature": 0.5, "top_p": 0.9,
                         "max_tokens": 7, "stop": ["\n\n"], "seed": 3,
                         "chat_template_kwargs": {"enable_thinking": False}}
    stats = model.stats
    assert stats["requests"] == 1 and stats["retries"] == 0 and stats["failures"] == 0
    assert stats["prompt_tokens"] == 3 and stats["completion_tokens"] == 2 and stats["total_latency_s"] > 0


def test_no_key_no_authorization_header_and_defaults(serve):
    server = serve(lambda i, seen: ok("x"))
    client(server).chat_batch([CHAT], max_tokens=4)
    (seen,) = server.seen
    assert "Authorization" not in seen.headers
    assert seen.body == {"model": "judge-model", "messages": CHAT, "temperature": 0.0, "top_p": 1.0,
                         "max_tokens": 4}


@pytest.mark.parametrize("style, integer_fields, choice_fields", [
    ("vllm", {"guided_regex": "[0-9]{1,2}"}, {"guided_choice": ["A", "B+"]}),
    ("vllm_structured", {"structured_outputs": {"regex": "[0-9]{1,2}"}},
     {"structured_outputs": {"choice": ["A", "B+"]}}),
    ("sglang", {"regex": "[0-9]{1,2}"}, {"regex": r"(A|B\+)"}),
    ("none", {}, {}),
])
def test_constraint_fields_per_style(serve, style, integer_fields, choice_fields):
    server = serve(lambda i, seen: ok("42") if i == 0 else ok("B+"))
    model = client(server, constraint_style=style)
    assert model.chat_batch_integer([CHAT], max_digits=2) == [42]
    assert model.chat_batch_choice([CHAT], ["A", "B+"]) == ["B+"]
    base = {"model", "messages", "temperature", "top_p", "max_tokens"}
    integer_body, choice_body = server.seen[0].body, server.seen[1].body
    assert {k: v for k, v in integer_body.items() if k not in base} == integer_fields
    assert {k: v for k, v in choice_body.items() if k not in base} == choice_fields
    assert integer_body["max_tokens"] == (32 if style == "none" else 3)


def test_generate_matches_language_model_signature_and_wraps_strings(serve):
    from mpo_jax.engine.language_model import LanguageModel

    ours = inspect.signature(RemoteChatModel.generate).parameters
    theirs = inspect.signature(LanguageModel.generate).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == \
           [(p.name, p.kind, p.default) for p in theirs.values()]

    server = serve(lambda i, seen: ok(f"out-{seen.body['messages'][-1]['content']}"))
    model = client(server)
    out = model.generate(["hello", CHAT], max_new_tokens=5, top_k=4, stop=["\n"], temperature=0.7)
    assert out == ["out-hello", "out-Rate it."]
    bodies = sorted((s.body for s in server.seen), key=lambda b: len(b["messages"]))
    assert bodies[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert bodies[1]["messages"] == CHAT
    for body in bodies:
        assert body["max_tokens"] == 5 and body["top_k"] == 4 and body["stop"] == ["\n"]
        assert body["seed"] == 0 and body["temperature"] == 0.7
    with pytest.raises(TypeError):
        model.generate("not a list", max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(["x"], top_p=0.0)


# -- concurrency -------------------------------------------------------------------------------
def test_order_preserved_with_out_of_order_responses(serve):
    n = 8

    def respond(i, seen):
        k = int(seen.body["messages"][0]["content"])
        return dataclasses.replace(ok(f"reply {k}"), delay=0.03 * (n - k))  # the first finishes last

    server = serve(respond)
    out = client(server, max_concurrency=n).chat_batch(
        [[{"role": "user", "content": str(k)}] for k in range(n)], max_tokens=4)
    assert out == [f"reply {k}" for k in range(n)]
    assert server.max_active > 1


def test_concurrency_limit_is_respected_across_calls(serve):
    server = serve(lambda i, seen: dataclasses.replace(ok("x"), delay=0.05))
    model = client(server, max_concurrency=3)
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(model.chat_batch([CHAT] * 6, max_tokens=1)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [["x"] * 6] * 2
    assert len(server.seen) == 12
    assert server.max_active == 3


# -- retries -----------------------------------------------------------------------------------
def test_timeout_then_success(serve):
    server = serve(lambda i, seen: dataclasses.replace(ok("late"), delay=1.0) if i == 0 else ok("on time"))
    model = client(server, timeout_s=0.2)
    start = time.perf_counter()
    assert model.chat_batch([CHAT], max_tokens=2) == ["on time"]
    assert time.perf_counter() - start < 0.9
    assert len(server.seen) == 2
    assert model.stats["retries"] == 1 and model.stats["failures"] == 0


def test_5xx_then_success_with_exponential_backoff(serve, caplog):
    caplog.set_level(logging.DEBUG)
    script = [error(500, "boom"), error(503, "overloaded"), ok("done")]
    server = serve(lambda i, seen: script[i])
    model = client(server, max_retries=3, backoff_s=0.01)
    sleeps = record_sleeps(model)
    assert model.chat_batch([CHAT], max_tokens=2) == ["done"]
    assert sleeps == [0.01, 0.02]
    assert model.stats["retries"] == 2 and model.stats["requests"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP 500" in w and "boom" in w for w in warnings)
    assert any("HTTP 503" in w for w in warnings)


def test_429_honours_retry_after_capped(serve):
    script = [error(429, "slow down", **{"Retry-After": "2"}), error(429, "slower", **{"Retry-After": "120"}),
              ok("ok")]
    server = serve(lambda i, seen: script[i])
    model = client(server, max_retries=3, max_retry_after_s=5.0)
    sleeps = record_sleeps(model)
    assert model.chat_batch([CHAT], max_tokens=2) == ["ok"]
    assert sleeps == [2.0, 5.0]


def test_retry_after_parsing():
    assert _retry_after_seconds("3") == 3.0
    assert _retry_after_seconds(None) is None
    assert _retry_after_seconds("soon") is None
    assert _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: no wait
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _retry_after_seconds(future) <= 30


def test_400_is_not_retried_and_names_status_and_message(serve):
    server = serve(lambda i, seen: error(400, "max_tokens is too large: 99999"))
    model = client(server, max_retries=3)
    sleeps = record_sleeps(model)
    with pytest.raises(RemoteBackendError) as info:
        model.chat_batch([CHAT], max_tokens=99999)
    assert info.value.status == 400
    assert "400" in str(info.value) and "max_tokens is too large" in str(info.value)
    assert len(server.seen) == 1 and sleeps == []
    assert model.stats["failures"] == 1 and model.stats["retries"] == 0


def test_redirect_is_not_followed(serve):
    server = serve(lambda i, seen: Reply(status=307, body={}, headers={"Location": "/elsewhere"}))
    with pytest.raises(RemoteBackendError, match="307"):
        client(server).chat_batch([CHAT], max_tokens=2)
    assert len(server.seen) == 1


@pytest.mark.parametrize("reply, expected", [
    (error(502, "bad gateway"), "HTTP 502"),
    (Reply(body=b"<html>not json</html>"), "not JSON"),
    (Reply(body={"id": "x", "object": "chat.completion"}), "no 'choices'"),
    (Reply(body={"choices": []}), "no 'choices'"),
    (Reply(body={"choices": [{"index": 0}]}), "no 'message'"),
])
def test_retries_exhausted(serve, reply, expected):
    server = serve(lambda i, seen: reply)
    model = client(server, max_retries=2)
    sleeps = record_sleeps(model)
    with pytest.raises(RemoteBackendError, match=expected) as info:
        model.chat_batch([CHAT], max_tokens=2)
    assert "3 attempts" in str(info.value)
    assert len(server.seen) == 3 and sleeps == [0.01, 0.02]
    assert model.stats == {**model.stats, "requests": 1, "retries": 2, "failures": 1}


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = RemoteChatModel(f"http://127.0.0.1:{port}/v1", "m", api_key_env=KEY_ENV, timeout_s=1.0,
                            max_retries=1, backoff_s=0.01)
    sleeps = record_sleeps(model)
    with pytest.raises(RemoteBackendError, match="connection failed"):
        model.chat_batch([CHAT], max_tokens=2)
    assert sleeps == [0.01]


def test_a_failure_in_a_batch_raises(serve):
    server = serve(lambda i, seen: error(404, "no such model")
                   if seen.body["messages"][0]["content"] == "2" else ok("x"))
    model = client(server, max_concurrency=2)
    with pytest.raises(RemoteBackendError, match="404"):
        model.chat_batch([[{"role": "user", "content": str(k)}] for k in range(4)], max_tokens=1)


# -- the key never leaks -----------------------------------------------------------------------
@pytest.mark.parametrize("make_reply", [
    lambda: error(401, f"Incorrect API key provided: {SECRET}"),
    lambda: error(500, f"internal error for key {SECRET}"),
    lambda: Reply(body=f"garbage {SECRET}".encode()),
    lambda: Reply(body={"error": {"message": f"quota exceeded for {SECRET}"}}),
    lambda: dataclasses.replace(ok("late"), delay=0.5),
])
def test_api_key_never_in_errors_logs_repr_or_stats(serve, monkeypatch, caplog, make_reply):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    server = serve(lambda i, seen: make_reply())
    model = client(server, max_retries=1, timeout_s=0.15)
    with pytest.raises(RemoteBackendError) as info:
        model.chat_batch([CHAT], max_tokens=2)
    assert server.seen[0].headers["Authorization"] == f"Bearer {SECRET}"  # the key was really used
    exc = info.value
    texts = [str(exc), repr(exc), repr(exc.args), "".join(traceback.format_exception(exc)),
             repr(model), str(model), str(model.stats), str(vars(model))]
    texts += [record.getMessage() for record in caplog.records]
    texts += [caplog.text]
    for text in texts:
        assert SECRET not in text
    if exc.status is not None:
        assert str(exc.status) in str(exc)


def test_repr_shows_base_url_and_model_only(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    model = RemoteChatModel("http://user:pw@127.0.0.1:9/v1/", "judge", api_key_env=KEY_ENV,
                            extra_body={"token": "hidden"})
    assert repr(model) == "RemoteChatModel(base_url='http://127.0.0.1:9/v1', model='judge')"


def test_invalid_arguments():
    with pytest.raises(ValueError, match="constraint_style"):
        RemoteChatModel("http://127.0.0.1:9/v1", "m", constraint_style="outlines")
    with pytest.raises(ValueError, match="http"):
        RemoteChatModel("file:///etc/passwd", "m")
    with pytest.raises(ValueError, match="max_concurrency"):
        RemoteChatModel("http://127.0.0.1:9/v1", "m", max_concurrency=0)
    model = RemoteChatModel("http://127.0.0.1:9/v1", "m")
    with pytest.raises(ValueError, match="max_tokens"):
        model.chat_batch([CHAT], max_tokens=0)
    with pytest.raises(ValueError, match="option"):
        model.chat_batch_choice([CHAT], [])
    with pytest.raises(TypeError):
        model.chat_batch([["not a message"]], max_tokens=1)
    assert model.chat_batch([], max_tokens=1) == []


# -- client-side validation ("none" style) -----------------------------------------------------
def test_integer_and_choice_parsed_client_side(serve):
    integer_replies = ["Score: 7/10", " 12\n", "I cannot rate this.", "1234", "-3", "7.5", ""]
    choice_replies = ["Yes.", "no", "The answer is no, because", "maybe", "**yes**", "NO"]
    replies = {f"i{k}": r for k, r in enumerate(integer_replies)} | {f"c{k}": r for k, r in enumerate(choice_replies)}
    server = serve(lambda i, seen: ok(replies[seen.body["messages"][0]["content"]]))
    model = client(server, constraint_style="none")

    ints = model.chat_batch_integer([[{"role": "user", "content": f"i{k}"}] for k in range(len(integer_replies))],
                                    max_digits=3)
    assert ints == [7, 12, None, None, None, None, None]
    assert model.stats["invalid_outputs"] == 5

    choices = model.chat_batch_choice([[{"role": "user", "content": f"c{k}"}] for k in range(len(choice_replies))],
                                      ["yes", "no"])
    assert choices == ["yes", "no", "no", None, "yes", "no"]
    assert model.stats["invalid_outputs"] == 6
    for seen in server.seen:
        assert not {"regex", "guided_regex", "guided_choice", "structured_outputs"} & set(seen.body)


def test_parsers():
    assert parse_integer("9", 1) == 9 and parse_integer("10", 1) is None
    assert parse_integer("rating 0 of 5") == 0
    assert parse_choice("B", ["A", "B", "AB"]) == "B"
    assert parse_choice("I pick AB", ["A", "B", "AB"]) == "AB"  # whole words only
    assert parse_choice("A or B", ["A", "B"]) == "A"  # the first one mentioned
    assert parse_choice("'Response 2'", ["Response 1", "Response 2"]) == "Response 2"
    assert parse_choice("nothing", ["A", "B"]) is None


def test_replies_that_ran_out_of_tokens_are_reported(serve):
    def respond(index, seen):
        reply = ok(seen.body["messages"][-1]["content"])
        if "long" in reply.body["choices"][0]["message"]["content"]:
            reply.body["choices"][0]["finish_reason"] = "length"
        return reply

    model = client(serve(respond))
    chats = [[{"role": "user", "content": text}] for text in ("short", "long", "long, then STOP and more")]
    assert model.chat_batch_ending(chats, max_tokens=4) == [("short", False), ("long", True),
                                                            ("long, then STOP and more", True)]
    from mpo_jax.engine.chat_session import open_session

    session = open_session(model, [[] for _ in chats])
    assert session.say(chats, max_tokens=4, stop=("STOP",)) == ["short", "long", "long, then "]
    assert session.hit_limit == [False, True, False]  # the third ended at its stop string
