"""`RemoteChatModel`: an OpenAI-compatible chat client for the judge or the meta-reward model.

Any server that speaks `POST {base_url}/chat/completions` works: vLLM, SGLang, a hosted API.
Standard library only (`urllib.request` for HTTP, a thread pool for concurrency).

- The API key is read from the environment variable named by `api_key_env` at every call
  (absent is fine for a local server) and sent as `Authorization: Bearer ...`. It is never
  stored on the object and is scrubbed from every message this module writes: exceptions,
  log records, `repr`, `stats`.
- Each request has a timeout. Timeouts, connection errors, HTTP 429 and 5xx, and malformed
  replies (not JSON, no `choices`) are retried with exponential backoff (`Retry-After` is
  honoured, capped); any other status fails at once. Either way the error is a
  `RemoteBackendError` naming the status and the server's message.
- Integer / choice outputs can be constrained on the server (`constraint_style`):
  "vllm" (`guided_regex` / `guided_choice`, vLLM < 0.12), "vllm_structured"
  (`structured_outputs`, vLLM >= 0.10.2), "sglang" (`regex`), or "none" (hosted APIs: no
  extra fields). Replies are always validated on the client too; a reply that is not a valid
  answer becomes None and is counted in `stats["invalid_outputs"]`.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mpo_jax.errors import InvalidValueError, MpoError

logger = logging.getLogger(__name__)

CONSTRAINT_STYLES = ("none", "vllm", "vllm_structured", "sglang")
Prompt = str | Sequence[dict]
_REDACTED = "***"
_MAX_ERROR_CHARS = 500
_INTEGER = re.compile(r"-?\d+(?:\.\d+)?")


class RemoteBackendError(MpoError, RuntimeError):
    """A chat completion failed (after any retries). `status` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after  # seconds the server asked to wait (Retry-After), if any


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would lose its body (and could carry the key elsewhere): fail instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redact_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(raw: bytes) -> str:
    """The error text of an error reply: OpenAI `{"error": {"message"}}`, vLLM/SGLang `{"message"}`."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_MAX_ERROR_CHARS]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:_MAX_ERROR_CHARS]
        for field in ("message", "detail", "error"):
            if data.get(field):
                value = data[field]
                return (value if isinstance(value, str) else json.dumps(value))[:_MAX_ERROR_CHARS]
    return text[:_MAX_ERROR_CHARS]


def parse_integer(text: str, max_digits: int | None = None) -> int | None:
    """The first integer in `text`, or None: no number, negative, fractional, or too many digits."""
    match = _INTEGER.search(text or "")
    if match is None:
        return None
    token = match.group(0)
    if token.startswith("-") or "." in token:
        return None
    if max_digits is not None and len(token) > max_digits:
        return None
    return int(token)


def parse_choice(text: str, options: Sequence[str]) -> str | None:
    """The option `text` gives: an exact match (after stripping), else a case-insensitive match
    ignoring surrounding quotes/punctuation, else the option that occurs first as a whole word
    (the longest one at a tie), else None."""
    text = (text or "").strip()
    if text in options:
        return text
    bare = text.strip(" \t\n\"'`*.:;,!()[]{}").casefold()
    for option in options:
        if bare == option.strip().casefold():
            return option
    best: tuple[int, int, str] | None = None
    for option in options:
        if not option:
            continue
        pattern = re.escape(option)
        if option[0].isalnum() or option[0] == "_":
            pattern = r"(?<!\w)" + pattern
        if option[-1].isalnum() or option[-1] == "_":
            pattern += r"(?!\w)"
        found = re.search(pattern, text, flags=re.IGNORECASE)
        if found is not None:
            key = (found.start(), -len(option), option)
            if best is None or key < best:
                best = key
    return best[2] if best else None


def _check_sampling(max_tokens: int, temperature: float, top_p: float, top_k: int = 0) -> None:
    if max_tokens < 1:
        raise InvalidValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise InvalidValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise InvalidValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidValueError(f"top_k must be >= 0, got {top_k}")


def _stop_list(stop: str | Sequence[str] | None) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise InvalidValueError("stop strings must be non-empty")
    return stops or None


def _as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise TypeError("a conversation must be a list of {'role': ..., 'content': ...} dicts")
    return messages


class RemoteChatModel:
    """Chat completions from an OpenAI-compatible server, batched over a bounded thread pool.

    `max_concurrency` bounds the requests in flight across every call on this object (also
    when several threads call it at once). `extra_body` fields are merged into every request
    body (e.g. `{"chat_template_kwargs": {"enable_thinking": False}}`).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_concurrency: int = 8, extra_body: dict[str, Any] | None = None,
                 constraint_style: str = "none", max_backoff_s: float = 30.0,
                 max_retry_after_s: float = 60.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidValueError(f"base_url must be an http(s) URL, got {_redact_url(base_url)!r}")
        if constraint_style not in CONSTRAINT_STYLES:
            raise InvalidValueError(f"constraint_style must be one of {CONSTRAINT_STYLES}, got {constraint_style!r}")
        if timeout_s <= 0:
            raise InvalidValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise InvalidValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0 or max_backoff_s < 0 or max_retry_after_s < 0:
            raise InvalidValueError("backoff_s, max_backoff_s and max_retry_after_s must be >= 0")
        if max_concurrency < 1:
            raise InvalidValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_retry_after_s = float(max_retry_after_s)
        self.max_concurrency = int(max_concurrency)
        self.extra_body = dict(extra_body or {})
        self.constraint_style = constraint_style
        self._url = self.base_url + "/chat/completions"
        self._shown_url = _redact_url(self._url)
        handlers: list[Any] = [_NoRedirect()]
        if _is_loopback(parts.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # a local server is never proxied
        self._opener = urllib.request.build_opener(*handlers)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._stats = self._empty_stats()
        self._sleep: Callable[[float], None] = time.sleep  # replaceable in tests

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={_redact_url(self.base_url)!r}, model={self.model!r})"

    # -- stats ---------------------------------------------------------------------------------
    @staticmethod
    def _empty_stats() -> dict[str, float]:
        return {"requests": 0, "retries": 0, "failures": 0, "invalid_outputs": 0,
                "total_latency_s": 0.0, "prompt_tokens": 0, "completion_tokens": 0}

    @property
    def stats(self) -> dict[str, float]:
        """Counters since creation or `reset_stats`: requests (completed calls, failed ones
        included), retries (extra attempts), failures (requests that raised), invalid_outputs
        (replies that were no valid integer/choice), total_latency_s, and token usage."""
        with self._lock:
            return dict(self._stats)

    def reset_stats(self) -> dict[str, float]:
        """Return the counters and start again from zero."""
        with self._lock:
            old, self._stats = self._stats, self._empty_stats()
        return old

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._stats[name] += delta

    # -- one request ---------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @staticmethod
    def _scrub(text: str, key: str | None) -> str:
        return text.replace(key, _REDACTED) if key else text

    def _attempt(self, payload: bytes, key: str | None) -> dict:
        """One HTTP round trip; a RemoteBackendError (already scrubbed) on any failure."""
        request = urllib.request.Request(self._url, data=payload, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        if key:
            request.add_unredirected_header("Authorization", f"Bearer {key}")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                message = _server_message(exc.read())
            except Exception:  # a broken error body still names the status
                message = exc.reason if isinstance(exc.reason, str) else ""
            retry_after = _retry_after_seconds(exc.headers.get("Retry-After") if exc.headers else None)
            exc.close()
            retryable = status == 429 or status >= 500
            error = RemoteBackendError(self._scrub(f"HTTP {status} from {self._shown_url}: {message}", key),
                                       status=status, retryable=retryable, retry_after=retry_after)
            raise error from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, URLError, connection resets
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            kind = "timed out" if isinstance(reason, TimeoutError) else "connection failed"
            detail = self._scrub(f"{type(reason).__name__}: {reason}", key)
            raise RemoteBackendError(f"request to {self._shown_url} {kind} ({detail})", retryable=True) from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            snippet = self._scrub(raw[:200].decode("utf-8", errors="replace"), key)
            raise RemoteBackendError(f"malformed reply from {self._shown_url} (not JSON): {snippet!r}",
                                     retryable=True) from None
        if not isinstance(data, dict):
            raise RemoteBackendError(f"malformed reply from {self._shown_url}: not a JSON object", retryable=True)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            message = _server_message(raw) if "error" in data else "no 'choices'"
            raise RemoteBackendError(self._scrub(f"malformed reply from {self._shown_url}: {message}", key),
                                     retryable=True)
        message = choices[0].get("message")
        if not isinstance(message, dict) or not isinstance(message.get("content", ""), (str, type(None))):
            raise RemoteBackendError(f"malformed reply from {self._shown_url}: no 'message' in choices[0]",
                                     retryable=True)
        return data

    def _delay(self, attempt: int, error: RemoteBackendError) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, self.max_retry_after_s)
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)

    def _complete(self, body: dict) -> tuple[str, bool]:
        """One chat completion with retries: the reply text ('' when the server gives no content),
        and whether the server says it ran out of tokens (`finish_reason` "length"; a server that
        gives no reason counts as finished)."""
        payload = json.dumps(body).encode("utf-8")
        start = time.perf_counter()
        try:
            with self._slots:
                attempt = 0
                while True:
                    key = self._api_key()  # read at call time, never stored
                    try:
                        data = self._attempt(payload, key)
                        break
                    except RemoteBackendError as error:
                        if not error.retryable or attempt >= self.max_retries:
                            if error.retryable:
                                tries = f"{attempt + 1} attempt" + ("s" if attempt else "")
                                error.args = (f"{error.args[0]} (gave up after {tries})",)
                            raise
                        delay = self._delay(attempt, error)
                        logger.warning("remote chat attempt %d/%d failed: %s; retrying in %.2fs",
                                       attempt + 1, self.max_retries + 1, error, delay)
                        self._count(retries=1)
                        attempt += 1
                        self._sleep(delay)
        except RemoteBackendError:
            self._count(requests=1, failures=1, total_latency_s=time.perf_counter() - start)
            raise
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        tokens = {name: int(usage[name]) for name in ("prompt_tokens", "completion_tokens")
                  if isinstance(usage.get(name), (int, float))}
        self._count(requests=1, total_latency_s=time.perf_counter() - start, **tokens)
        choice = data["choices"][0]
        return choice["message"].get("content") or "", choice.get("finish_reason") == "length"

    def _body(self, messages: list[dict], *, max_tokens: int, temperature: float, top_p: float,
              stop: list[str] | None, seed: int | None, top_k: int = 0,
              constraint: dict[str, Any] | None = None) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": temperature,
                                "top_p": top_p, "max_tokens": max_tokens}
        if stop:
            body["stop"] = stop
        if seed is not None:
            body["seed"] = seed
        if top_k:
            body["top_k"] = top_k  # a vLLM/SGLang extension; OpenAI has no top_k
        body.update(self.extra_body)
        body.update(constraint or {})
        return body

    def _run_batch(self, bodies: list[dict]) -> list[tuple[str, bool]]:
        if not bodies:
            return []
        if len(bodies) == 1:
            return [self._complete(bodies[0])]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(bodies)),
                                thread_name_prefix="remote-chat") as pool:
            futures = [pool.submit(self._complete, body) for body in bodies]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    # -- constraints ---------------------------------------------------------------------------
    def _regex_constraint(self, regex: str) -> dict[str, Any]:
        return {"none": {}, "vllm": {"guided_regex": regex},
                "vllm_structured": {"structured_outputs": {"regex": regex}},
                "sglang": {"regex": regex}}[self.constraint_style]

    def _choice_constraint(self, options: list[str]) -> dict[str, Any]:
        if self.constraint_style == "vllm":
            return {"guided_choice": options}
        if self.constraint_style == "vllm_structured":
            return {"structured_outputs": {"choice": options}}
        if self.constraint_style == "sglang":
            return {"regex": "(" + "|".join(re.escape(o) for o in options) + ")"}
        return {}

    def _report_invalid(self, texts: list[str], values: list[Any], what: str) -> None:
        bad = [i for i, v in enumerate(values) if v is None]
        if bad:
            self._count(invalid_outputs=len(bad))
            logger.info("%d of %d remote replies were not a valid %s (first: %r)",
                        len(bad), len(values), what, texts[bad[0]][:80])

    # -- public API ----------------------------------------------------------------------------
    def chat_batch(self, conversations: Sequence[Sequence[dict]], *, max_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                   seed: int | None = None) -> list[str]:
        """One reply per conversation (lists of {'role', 'content'} messages), in order."""
        return self._chat(conversations, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          stop=stop, seed=seed)

    def chat_batch_ending(self, conversations: Sequence[Sequence[dict]], *, max_tokens: int,
                          temperature: float = 0.0, top_p: float = 1.0, stop: str | Sequence[str] | None = None,
                          seed: int | None = None) -> list[tuple[str, bool]]:
        """`chat_batch`, each reply with whether it ran out of tokens (`finish_reason` "length")."""
        return self._run_batch(self._bodies(conversations, max_tokens=max_tokens, temperature=temperature,
                                            top_p=top_p, stop=stop, seed=seed))

    def _chat(self, conversations, *, max_tokens, temperature, top_p, stop, seed, top_k=0,
              constraint=None) -> list[str]:
        ended = self._run_batch(self._bodies(conversations, max_tokens=max_tokens, temperature=temperature,
                                             top_p=top_p, stop=stop, seed=seed, top_k=top_k, constraint=constraint))
        return [text for text, _ in ended]

    def _bodies(self, conversations, *, max_tokens, temperature, top_p, stop, seed, top_k=0,
                constraint=None) -> list[dict]:
        if isinstance(conversations, (str, dict)):
            raise TypeError("conversations must be a list of message lists")
        _check_sampling(max_tokens, temperature, top_p, top_k)
        stops = _stop_list(stop)
        return [self._body(_as_messages(c), max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=stops, seed=seed, top_k=top_k, constraint=constraint)
                for c in conversations]

    def chat_batch_integer(self, conversations: Sequence[Sequence[dict]], *, max_digits: int = 3,
                           max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                           stop: str | Sequence[str] | None = None, seed: int | None = None) -> list[int | None]:
        """An unsigned integer of 1..max_digits digits per conversation; None where the reply has none.

        `max_tokens` defaults to max_digits + 1 when the server constrains the output and 32
        with constraint_style "none" (the model may say a few words around the number).
        """
        if max_digits < 1:
            raise InvalidValueError("max_digits must be >= 1")
        if max_tokens is None:
            max_tokens = 32 if self.constraint_style == "none" else max_digits + 1
        texts = self._chat(conversations, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=stop, seed=seed, constraint=self._regex_constraint(f"[0-9]{{1,{max_digits}}}"))
        values = [parse_integer(t, max_digits) for t in texts]
        self._report_invalid(texts, values, f"integer of at most {max_digits} digits")
        return values

    def chat_batch_choice(self, conversations: Sequence[Sequence[dict]], options: Sequence[str], *,
                          max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                          stop: str | Sequence[str] | None = None, seed: int | None = None) -> list[str | None]:
        """One of `options` per conversation; None where the reply names none of them.

        `max_tokens` defaults to the longest option's length in characters + 1 when the server
        constrains the output, + 32 with constraint_style "none".
        """
        options = list(options)
        if not options or any(not isinstance(o, str) or not o for o in options):
            raise InvalidValueError("choice needs at least one non-empty option")
        if max_tokens is None:
            longest = max(len(o) for o in options)
            max_tokens = longest + (32 if self.constraint_style == "none" else 1)
        texts = self._chat(conversations, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=stop, seed=seed, constraint=self._choice_constraint(options))
        values = [parse_choice(t, options) for t in texts]
        self._report_invalid(texts, values, f"choice of {options}")
        return values

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] | None = None,
                 seed: int = 0) -> list[str]:
        """`LanguageModel.generate` over HTTP: a string prompt becomes one user message."""
        if isinstance(prompts, (str, dict)):
            raise TypeError("prompts must be a list (of strings or of message lists)")
        return self._chat([_as_messages(p) for p in prompts], max_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, stop=stop, seed=seed, top_k=top_k)
