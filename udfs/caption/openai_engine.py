"""The ``openai`` caption engine: any vision-language server with an OpenAI-compatible
``/v1/chat/completions`` (``vllm serve``, SGLang, TGI, llama.cpp's server, Ollama, a hosted API).

One request per image: a user turn with the image as a ``data:`` URL (``image_url`` part) and the
configured prompt, ``temperature`` 0 by default (descriptions are cached by image, engine, model
and prompt, so they must be reproducible), ``max_tokens`` = ``experiment.caption.max_new_tokens``.
The served model name is ``experiment.caption.model`` (part of the cache key; the server's
address is not: any server of the same model gives the same descriptions).

How it runs in Ray Data, and why not ``ray.data.llm``: the job's actor pool holds one engine
per actor (``caption.num_workers`` actors); each engine keeps an asyncio event loop on a thread
of its own with one ``aiohttp`` session, and a batch's requests run concurrently on it, at most
``max_concurrency`` in flight and ``qps`` started per second *per actor*. Ray 2.60's
``HttpRequestProcessorConfig`` was the first choice and does not fit: it posts to one URL (no
list of servers), retries only 408/429/502/503/504 with a fixed exponential wait (no jitter, no
``Retry-After``, no retry on a 500 or on a connection refused in the middle of a batch), sends
every row of a batch at once with no bound but ``qps``, raises for the whole batch when one row
runs out of retries, reports neither an error kind per row nor token counts, and imports
``aiohttp`` only with ``ray[llm]`` (vLLM's dependency tree). ``aiohttp`` is what it uses too.

Faults, per image (``describe_each``):
- retried with exponential backoff and full jitter (``backoff_s`` * 2^attempt, at most
  ``backoff_max_s``): a connection error, a timeout (``timeout_s`` per request), 408, 429
  (waiting what ``Retry-After`` says, seconds or an HTTP date, when the server sends it) and
  5xx; each retry goes to the next server of ``base_urls``, so a dead server's share moves to
  the live ones;
- not retried: any other 4xx (``rejected``: the server refuses this request as it is) and a 200
  whose body is not a chat completion (``bad_response``);
- after ``max_retries`` retries the image fails alone with the kind of its last fault
  (``connection``, ``timeout``, ``rate_limited``, ``server_error``), which the job writes as an
  error row; a failed image never fails its batch or the job.

The API key is read from the environment variable named by ``api_key_env`` when the engine is
built (on the worker, so every node needs it set); only the variable's name is configuration.
The key is sent as ``Authorization: Bearer`` and never logged, stored or put in an error text; a
server that echoes it in an error body has it removed first (``udfs.caption.redaction``).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import io
import itertools
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from udfs.caption.engine import Caption, CaptionEngine
from udfs.caption.kinds import KINDS, OpenaiOptions
from udfs.caption.prompts import DEFAULT_PROMPT
from udfs.caption.redaction import redact, secret_forms, without_secrets
# The image as a JPEG ``data:`` URL: the vllm engine's request format, shared.
from udfs.caption.vllm_engine import image_data_url

log = logging.getLogger(__name__)

DEFAULT_MODEL = KINDS["openai"].default_model
CHAT_PATH = "/chat/completions"
MODELS_PATH = "/models"
# The options and their defaults: ``udfs.caption.kinds.OpenaiOptions``.
KIND = KINDS["openai"]
# Error kinds (the ``descriptions.error`` prefix); the first four are retried within a run.
CONNECTION, TIMEOUT, RATE_LIMITED, SERVER_ERROR = "connection", "timeout", "rate_limited", "server_error"
REJECTED, BAD_RESPONSE = "rejected", "bad_response"
# A Retry-After beyond this is a server asking us to stop for the day: cap it, the budget decides.
MAX_RETRY_AFTER_S = 300.0


class RequestFailed(RuntimeError):
    """One image's request failed for good: ``kind`` (an error kind above), ``retries`` (the
    kinds of the attempts before the last one)."""

    def __init__(self, kind: str, message: str, retries: tuple[str, ...] = ()):
        super().__init__(message)
        self.kind = kind
        self.retries = retries


class ServerUnavailable(RuntimeError):
    """No configured server answers (checked before a job starts)."""


class ClientSettings(OpenaiOptions):
    """The validated options, typed; ``urls`` are the servers' API roots (``api_root``)."""

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(api_root(str(u)) for u in (self.base_urls or [self.base_url]))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ClientSettings:
        o = KIND.checked_options(options)
        urls = tuple(api_root(str(u)) for u in (o["base_urls"] or [o["base_url"]]))
        problems = [
            *(f"base URL {u!r} must start with http:// or https://" for u in urls
              if not u.startswith(("http://", "https://"))),
            *(["base_url is empty and base_urls lists nothing"] if not urls or not all(urls) else []),
            *([f"max_concurrency must be >= 1, got {o['max_concurrency']}"] if o["max_concurrency"] < 1 else []),
            *([f"timeout_s must be > 0, got {o['timeout_s']}"] if o["timeout_s"] <= 0 else []),
            *([f"qps must be > 0 (or null for no limit), got {o['qps']}"]
              if o["qps"] is not None and o["qps"] <= 0 else []),
            *([f"max_retries must be >= 0, got {o['max_retries']}"] if o["max_retries"] < 0 else []),
            *([f"backoff_s must be >= 0, got {o['backoff_s']}"] if o["backoff_s"] < 0 else []),
        ]
        if problems:
            raise ValueError(f"caption engine 'openai': {'; '.join(problems)}")
        return cls(**o)

    def headers(self) -> dict[str, str]:
        """Request headers; the key comes from the environment, named by ``api_key_env``."""
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(f"caption engine 'openai': api_key_env names {self.api_key_env!r}, which is "
                                 "not set in this process's environment: export it on every node")
            headers["Authorization"] = f"Bearer {key}"
        return headers


def api_root(base_url: str) -> str:
    """Where ``/chat/completions`` and ``/models`` live: a bare server address gets ``/v1``
    (``http://host:8000`` -> ``http://host:8000/v1``); an address with a path is the root as it
    is, as the OpenAI SDK's ``base_url`` (``http://host:8000/v1``, ``https://host/v1beta/openai``)."""
    from urllib.parse import urlsplit

    url = base_url.strip().rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") and url else url


# Formats every vision server decodes itself (llama.cpp's stb_image, vLLM's and TGI's Pillow,
# Ollama, hosted APIs; not WebP, which stb_image cannot read), in the pixel modes whose look
# does not depend on how a decoder treats alpha, palettes, CMYK or 16 bits: such files go out
# as their own bytes.
SENT_AS_IS: dict[str, str] = {"JPEG": "image/jpeg", "PNG": "image/png"}
SENT_AS_IS_MODES = frozenset({"RGB", "L"})
# A file above this is shrunk and re-encoded even within max_side: hosted APIs cap a request's
# image (OpenAI at 20 MB, others lower) and a data URL is a third larger than its bytes.
MAX_SENT_BYTES = 4 * 1024 * 1024
EXIF_ORIENTATION = 0x0112


def file_data_url(data: bytes, name: str, max_side: int | None, verified: bool = False) -> tuple[str, bool]:
    """``(data: URL, sent as is)`` for one image file's bytes.

    A JPEG or PNG in RGB or grey without transparency, no larger than ``max_side`` on its longest side and
    ``MAX_SENT_BYTES``, upright (no EXIF rotation) goes out as its own bytes with its MIME type:
    no re-encoding, so the server sees the very file that was hashed. Unless ``verified`` (the
    bytes hash to what ``ingest`` recorded, and ingest decoded every pixel of them before it
    recorded a hash: ``udfs.io.images.check_image``), it is decoded once first, so a truncated or
    corrupt file fails here as ``udfs.io.images.ImageError`` and never reaches the server (the
    decode was 80% of the caption actor's work per poster). Anything else
    is decoded, rotated, flattened and shrunk as for the other engines (``udfs.io.images.load_image``)
    and sent as a JPEG."""
    from udfs.io.images import load_image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            as_is = (probe.format in SENT_AS_IS and probe.mode in SENT_AS_IS_MODES
                     and "transparency" not in probe.info
                     and (max_side is None or max(probe.size) <= max_side) and len(data) <= MAX_SENT_BYTES
                     and probe.getexif().get(EXIF_ORIENTATION, 1) == 1)
            mime = SENT_AS_IS.get(probe.format or "")
    except Exception:  # noqa: BLE001 - load_image below names what is wrong with the file
        as_is = False
    if as_is:
        if not verified:
            load_image(data, name=name, max_side=64)  # the integrity check: raises for a bad file
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", True
    return image_data_url(load_image(data, name=name, max_side=max_side)), False


def request_body(model: str, prompt: str, image_url: str, max_tokens: int, temperature: float) -> dict[str, Any]:
    """The chat completion request for one image."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": prompt},
        ]}],
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "stream": False,
    }


def parse_completion(body: Any) -> Caption:
    """A ``Caption`` from a chat completion response body; ``ValueError`` when it is not one.
    ``n_tokens`` / ``prompt_tokens`` are the server's ``usage`` (``None`` when it reports none)."""
    try:
        message = body["choices"][0]["message"]
        text = message.get("content") or ""
        if not isinstance(text, str):  # some servers return content parts
            text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a chat completion ({type(exc).__name__}: {exc}): {str(body)[:200]}") from None
    usage = body.get("usage") or {}
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    return Caption(text=text.strip(), n_tokens=None if completion is None else int(completion),
                   prompt_tokens=None if prompt is None else int(prompt))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date; ``None`` when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)] (``attempt`` counts from 0)."""
    return rng.uniform(0.0, min(cap, base * (2 ** attempt)))


class _Limiter:
    """At most ``qps`` request starts per second (None: no limit), shared by one engine's requests."""

    def __init__(self, qps: float | None):
        self.interval = 0.0 if not qps else 1.0 / qps
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class _Client:
    """An event loop on a thread of its own with one aiohttp session: synchronous callers (the
    Ray actor) hand it a batch and wait for all of its requests."""

    def __init__(self, settings: ClientSettings, headers: dict[str, str]):
        self.settings = settings
        self.headers = headers
        self.secrets = secret_forms(headers)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openai-engine", daemon=True)
        self.thread.start()
        self.session = self._run(self._open())
        # Requests handed over and not finished: the max_concurrency in flight plus as many
        # waiting, so that the servers never wait for the caller to read the next image.
        self.window = threading.BoundedSemaphore(2 * settings.max_concurrency)
        # Each attempt goes to the next server (only the loop's thread draws from it).
        self.urls = itertools.cycle(settings.urls)
        self.rng = random.Random()

    async def _open(self):
        import aiohttp

        self.semaphore = asyncio.Semaphore(self.settings.max_concurrency)
        self.limiter = _Limiter(self.settings.qps)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0), headers=self.headers)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def submit(self, body: dict[str, Any] | Exception) -> concurrent.futures.Future:
        """Start one request on the loop; the future holds its ``Caption`` or raises its error.
        Blocks while ``window`` requests are in flight or queued, so that a caller reading a
        large batch never holds more than that many request bodies in memory."""
        self.window.acquire()
        future = asyncio.run_coroutine_threadsafe(self._one(body) if isinstance(body, dict) else _raise(body),
                                                  self.loop)
        future.add_done_callback(lambda _: self.window.release())
        return future

    async def _one(self, body: dict[str, Any]) -> Caption:
        import aiohttp

        s = self.settings
        payload = json.dumps(body)
        retries: list[str] = []
        async with self.semaphore:
            for attempt in range(s.max_retries + 1):
                await self.limiter.wait()
                url = next(self.urls)
                wait = None
                try:
                    async with self.session.post(url + CHAT_PATH, data=payload,
                                                 timeout=aiohttp.ClientTimeout(total=s.timeout_s)) as response:
                        status = response.status
                        # The whole body without the key, before anything parses, cuts or keeps it;
                        # bytes that are not text become U+FFFD (a bad response, not a crash).
                        text = without_secrets(await response.text(errors="replace"), self.secrets)
                        if status == 200:
                            try:
                                caption = parse_completion(json.loads(text))
                            except ValueError as exc:
                                raise RequestFailed(BAD_RESPONSE, redact(f"{url}: {exc}", ()), tuple(retries)) from None
                            return Caption(caption.text, caption.n_tokens, caption.prompt_tokens, tuple(retries))
                        reason = f"HTTP {status} from {url}{CHAT_PATH}: {redact(text, ())[:300]}"
                        # Retried: 408, 429 and 5xx; any other status is the server refusing the request.
                        kind = {429: RATE_LIMITED, 408: TIMEOUT}.get(status, SERVER_ERROR if status >= 500 else REJECTED)
                        if kind == REJECTED:
                            raise RequestFailed(REJECTED, reason, tuple(retries))
                        if status == 429:
                            wait = retry_after_seconds(response.headers.get("Retry-After"))
                except asyncio.TimeoutError:
                    kind, reason = TIMEOUT, f"no answer from {url}{CHAT_PATH} within timeout_s={s.timeout_s:g} s"
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                    kind, reason = CONNECTION, f"{url}{CHAT_PATH}: {type(exc).__name__}: {exc}"
                if attempt == s.max_retries:
                    tried = f" (after {s.max_retries} retries: {', '.join(retries)})" if retries else ""
                    raise RequestFailed(kind, reason + tried, tuple(retries))
                retries.append(kind)
                if wait is not None:
                    # Honour the server's wait, plus a little jitter so that the actors it told
                    # the same thing do not all come back in the same instant.
                    delay = min(wait, MAX_RETRY_AFTER_S) * (1 + 0.1 * self.rng.random())
                else:
                    delay = backoff_delay(attempt, s.backoff_s, s.backoff_max_s, self.rng)
                log.debug("openai engine: %s, retry %d in %.2f s", reason, attempt + 1, delay)
                await asyncio.sleep(delay)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self._run(self.session.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
            self.loop.close()


async def _raise(error: Exception):
    raise error


def outcome(future: concurrent.futures.Future) -> Caption | Exception:
    """A submitted request's result: its ``Caption``, or the exception it ended with."""
    error = future.exception()
    return error if error is not None else future.result()


class OpenAIEngine(CaptionEngine):
    """One chat completion request per image to an OpenAI-compatible server (see the module)."""

    name = "openai"
    # describe_each returns one result per image: failures are already isolated, no batch retries.
    isolates_failures = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 16,
        max_new_tokens: int = 128,
        options: Mapping[str, Any] | None = None,
    ):
        super().__init__(model=model, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.options = KIND.checked_options(options)
        self.settings = ClientSettings.from_options(self.options)
        self._client: _Client | None = None
        self._client_lock = threading.Lock()  # the caption actor calls from several threads

    @property
    def client(self) -> _Client:
        with self._client_lock:
            if self._client is None:
                self._client = _Client(self.settings, self.settings.headers())
            return self._client

    def describe_each(self, images: Sequence[Image.Image]) -> list[Caption | Exception]:
        """One result per image, in order: its ``Caption`` or the exception that image alone met
        (a ``RequestFailed`` after the retries, or the error encoding it)."""
        urls: list[str | Exception] = []
        for image in images:
            try:
                urls.append(image_data_url(image))
            except Exception as exc:  # noqa: BLE001 - a bad image fails alone
                urls.append(exc)
        return self.describe_urls(urls)

    def submit_url(self, image_url: str | Exception) -> concurrent.futures.Future:
        """Send one image (its ``data:`` URL) now; the future's ``outcome`` is its result.
        Blocks while twice ``max_concurrency`` requests are already in flight or waiting."""
        return self.client.submit(image_url if isinstance(image_url, Exception) else request_body(
            self.model, self.prompt, image_url, self.max_new_tokens, self.settings.temperature))

    def describe_urls(self, image_urls: Sequence[str | Exception]) -> list[Caption | Exception]:
        """``describe_each`` for images already in request form (``file_data_url``: what the
        caption job's actors build as they read each file, so that the engine does only HTTP);
        an exception in the list is that image's result as it is."""
        return [outcome(f) for f in [self.submit_url(url) for url in image_urls]]

    def describe(self, images: Sequence[Image.Image]) -> list[Caption]:
        results = self.describe_each(images)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def check_servers(options: Mapping[str, Any], model: str, timeout_s: float = 10.0) -> list[str]:
    """The configured servers that answer ``GET /v1/models`` (the job calls this before it
    starts, so that a server that is down fails the job at once, not after every retry of every
    image). Raises ``ServerUnavailable`` naming the URLs and the fix when none answers, and
    ``ValueError`` when the key is refused or the servers list models without ``model``."""
    settings = ClientSettings.from_options(options)
    headers = settings.headers()
    live, failures = [], []
    for url in settings.urls:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + MODELS_PATH, headers=headers),
                                        timeout=min(timeout_s, settings.timeout_s)) as response:
                body = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ValueError(f"{url}{MODELS_PATH} refused the API key (HTTP {exc.code}): set the variable "
                                 f"that experiment.caption.openai.api_key_env names "
                                 f"({settings.api_key_env or 'not set'}) to a valid key") from None
            # Some servers do not list models; answering at all is what this checks.
            body = {}
        except (OSError, ValueError) as exc:
            failures.append(f"{url} ({getattr(exc, 'reason', exc)})")
            continue
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
        if served and model not in served:
            served = redact(str(served), secret_forms(headers))
            raise ValueError(f"the server at {url} serves {served}, not {model!r}: set experiment.caption.model "
                             "to the served model's name (vllm serve --served-model-name, llama.cpp --model_alias)")
        live.append(url)
    if not live:
        raise ServerUnavailable(
            f"caption engine 'openai': no server answers: {'; '.join(failures)}. Start the server (for "
            "example `vllm serve llava-hf/llava-v1.6-mistral-7b-hf`) or point "
            "experiment.caption.openai.base_url (or base_urls) at where it runs")
    for failure in failures:
        log.warning("caption engine 'openai': %s does not answer; the run uses %s", failure, live)
    return live
