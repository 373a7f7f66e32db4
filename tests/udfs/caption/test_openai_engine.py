"""The ``openai`` engine against the real llama.cpp server (tiny random LLaVA), directly and
through the fault-injecting proxy; and its pure parts (Retry-After, backoff, response parsing,
settings) in milliseconds."""
from __future__ import annotations

import base64
import io
import json
import logging
import random
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.fault_proxy import FaultProxy
from tests.llama_server import MODEL_NAME, V_IMAGE, V_PATCH
from udfs.caption import Caption, describe_isolated, make_engine
from udfs.caption.openai_engine import (
    BAD_RESPONSE,
    CONNECTION,
    RATE_LIMITED,
    REJECTED,
    SERVER_ERROR,
    TIMEOUT,
    ClientSettings,
    RequestFailed,
    ServerUnavailable,
    backoff_delay,
    check_servers,
    parse_completion,
    retry_after_seconds,
)


def pictures(n: int, seed: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40 + 8 * i, 56, 3)) * 255).astype(np.uint8)) for i in range(n)]


def engine_at(url: str, **options):
    return make_engine("openai", model=MODEL_NAME, prompt="Describe this product image.", max_new_tokens=8,
                       options={"base_url": url, **options})


# --- the pure parts ---------------------------------------------------------------------------

def test_retry_after_is_seconds_or_an_http_date():
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0  # already past
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_backoff_is_full_jitter_under_a_cap():
    rng = random.Random(0)
    delays = [[backoff_delay(a, 0.5, 4.0, rng) for _ in range(400)] for a in range(6)]
    for attempt, seen in enumerate(delays):
        bound = min(4.0, 0.5 * 2 ** attempt)
        assert 0 <= min(seen) and max(seen) <= bound
        assert max(seen) > 0.8 * bound and min(seen) < 0.2 * bound  # spread over the whole range


def test_a_completion_parses_with_its_usage_and_a_non_completion_does_not():
    caption = parse_completion({"choices": [{"message": {"content": " a red shirt "}}],
                                "usage": {"prompt_tokens": 40, "completion_tokens": 3}})
    assert caption == Caption("a red shirt", 3, 40)
    assert parse_completion({"choices": [{"message": {"content": "x"}}]}) == Caption("x", None, None)
    with pytest.raises(ValueError, match="not a chat completion"):
        parse_completion({"error": "nope"})


def test_settings_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"base URL 'localhost:8000' must start with http://"):
        ClientSettings.from_options({"base_url": "localhost:8000"})
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        ClientSettings.from_options({"max_concurrency": 0})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_tokens'\]"):
        ClientSettings.from_options({"max_tokens": 5})
    settings = ClientSettings.from_options({"base_urls": ["http://a:1/", "http://b:2/v1", "https://c/v1beta/openai/"]})
    # A bare address gets /v1; an OpenAI-SDK style base_url (with a path) is kept as it is.
    assert settings.urls == ("http://a:1/v1", "http://b:2/v1", "https://c/v1beta/openai")


def test_config_errors_name_the_key():
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"experiment\.caption\.openai\.max_concurrency"):
        load_config(None, ["experiment.caption.openai.max_concurrency=0"])
    with pytest.raises(ConfigError, match=r"experiment\.caption\.openai\.max_tokens"):
        load_config(None, ["experiment.caption.openai.max_tokens=5"])
    config = load_config(None, ["experiment.caption.engine=openai",
                                "experiment.caption.openai.base_urls=[http://a:1, http://b:2]"])
    assert config.experiment.caption.openai.base_urls == ["http://a:1", "http://b:2"]


def test_a_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("VLM4REC_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="api_key_env names 'VLM4REC_TEST_KEY', which is not set"):
        ClientSettings.from_options({"api_key_env": "VLM4REC_TEST_KEY"}).headers()


def test_no_server_is_a_clear_error_naming_the_url():
    from tests.llama_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnavailable, match=rf"no server answers: {url}/v1 \(.*Connection refused.*Start the server.*base_url"):
        check_servers({"base_url": url}, MODEL_NAME, timeout_s=2)


def encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def data_url_bytes(url: str) -> tuple[str, bytes]:
    header, payload = url.split(",", 1)
    return header, base64.b64decode(payload)


def test_a_file_the_server_can_take_goes_as_its_own_bytes_and_others_are_reencoded():
    from udfs.caption.openai_engine import file_data_url

    picture = pictures(1)[0]
    jpeg, png = encoded(picture, "JPEG", quality=80), encoded(picture, "PNG")
    for data, mime in ((jpeg, "image/jpeg"), (png, "image/png"), (encoded(picture.convert("L"), "PNG"), "image/png")):
        url, as_is = file_data_url(data, "poster.x", max_side=1344)
        assert as_is and data_url_bytes(url) == (f"data:{mime};base64", data)
    # Too large for the engine, alpha, a palette with transparency, WebP (llama.cpp cannot read
    # it), an EXIF rotation: decoded, flattened, rotated, shrunk, sent as a JPEG.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    wide = Image.new("RGB", (3000, 100), (200, 10, 10))
    cases = {"big": (encoded(wide, "PNG"), (1344, 45)),
             "rgba": (encoded(picture.convert("RGBA"), "PNG"), picture.size),
             "webp": (encoded(picture, "WEBP"), picture.size),
             "rotated": (encoded(picture, "JPEG", exif=exif.tobytes()), picture.size[::-1])}
    for name, (data, size) in cases.items():
        url, as_is = file_data_url(data, name, max_side=1344)
        header, sent = data_url_bytes(url)
        assert not as_is and header == "data:image/jpeg;base64", name
        assert Image.open(io.BytesIO(sent)).size == size, name


def test_a_corrupt_file_is_an_error_row_that_names_it_never_a_failed_batch(tmp_path):
    """Unverified bytes are decoded before they are sent; in the job, a file that no longer
    hashes to what ingest decoded in full is a ``changed`` error saying what it is now."""
    from udfs.caption.openai_engine import file_data_url
    from udfs.caption.caption_udfs import image_url_of
    from udfs.io.images import ImageError, sha256_bytes

    good = encoded(pictures(1)[0], "JPEG")
    with pytest.raises(ImageError, match="'cut.jpg' is truncated") as error:
        file_data_url(good[: len(good) // 2], "cut.jpg", max_side=1344)
    assert error.value.kind == "truncated"
    files = {"good.jpg": good, "cut.jpg": good[: len(good) // 2], "text.jpg": b"not an image at all"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    # Ingest hashed the good poster; two of the files were damaged since.
    urls, errors = zip(*(image_url_of(str(tmp_path / n), sha256_bytes(good), max_side=1344) for n in files))
    assert data_url_bytes(urls[0])[1] == good and errors[0] is None
    assert urls[1:] == (None, None)
    assert errors[1].startswith("changed: image ") and "cut.jpg" in errors[1]
    assert "it is now truncated" in errors[1] and "rerun ingest" in errors[1]
    assert "text.jpg" in errors[2] and "it is now not_image" in errors[2]


# --- against the real server ------------------------------------------------------------------

@pytest.mark.server
def test_images_go_through_the_vision_encoder(llama_server):
    """Each image adds exactly the projector's 16 tokens (4 x 4 patches) to the prompt the server
    counts: the image reached the CLIP tower and the MLP projector. (Text-only vs one image also
    differs by how the text around the image splits into tokens, so the exact count compares one
    image with two.)"""
    from udfs.caption.openai_engine import image_data_url, request_body

    engine = engine_at(llama_server.base_url)
    (caption,) = engine.describe(pictures(1))
    assert 1 <= caption.n_tokens <= 8 and caption.retries == () and caption.text == caption.text.strip()
    engine.close()

    def prompt_tokens(n_images: int) -> int:
        body = request_body(MODEL_NAME, "Describe it.", image_data_url(pictures(1)[0]), 1, 0.0)
        body["messages"][0]["content"] = body["messages"][0]["content"][:1] * n_images + body["messages"][0]["content"][1:]
        request = urllib.request.Request(llama_server.base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["usage"]["prompt_tokens"]

    one, two, three = prompt_tokens(1), prompt_tokens(2), prompt_tokens(3)
    assert two - one == three - two == (V_IMAGE // V_PATCH) ** 2
    assert prompt_tokens(0) < one


@pytest.mark.server
def test_a_jpeg_and_a_png_sent_as_their_own_bytes_reach_the_vision_encoder(llama_server):
    """The bytes path (``file_data_url`` -> ``describe_urls``): llama.cpp decodes both formats
    itself, so each prompt carries the same image tokens; an exception in the list stays that
    image's result."""
    from udfs.caption.openai_engine import file_data_url

    picture = pictures(1)[0]
    urls = [file_data_url(encoded(picture, fmt), fmt, max_side=1344) for fmt in ("JPEG", "PNG")]
    assert [as_is for _, as_is in urls] == [True, True]
    engine = engine_at(llama_server.base_url)
    failed = ValueError("could not be read")
    jpeg, png, kept = engine.describe_urls([urls[0][0], urls[1][0], failed])
    engine.close()
    assert isinstance(jpeg, Caption) and isinstance(png, Caption) and kept is failed
    assert jpeg.prompt_tokens == png.prompt_tokens > (V_IMAGE // V_PATCH) ** 2


@pytest.mark.server
def test_the_server_is_checked_and_the_model_must_be_served(llama_server):
    assert check_servers({"base_url": llama_server.base_url}, MODEL_NAME) == [llama_server.base_url + "/v1"]
    with pytest.raises(ValueError, match=r"serves \['tiny-llava'\], not 'llava-7b'.*experiment\.caption\.model"):
        check_servers({"base_url": llama_server.base_url}, "llava-7b")


@pytest.mark.server
def test_faults_are_retried_or_final_per_image(llama_server):
    """One image per fault script: a 429 with Retry-After, two 500s and a stall are retried and
    succeed; a 400 fails at once; a server that always answers 500 fails after the budget."""
    scripts = [["429"], ["500", "500"], ["stall"], ["400"], ["500*"]]
    with FaultProxy(llama_server.base_url, scripts, retry_after=1.0, stall_s=4.0) as proxy:
        engine = engine_at(proxy.base_url, max_retries=3, backoff_s=0.05, timeout_s=1.5, max_concurrency=3)
        results = describe_isolated(engine, pictures(6))
        engine.close()
    outcomes = sorted((r.kind if isinstance(r, RequestFailed) else "ok", r.retries) for r in results)
    assert outcomes == sorted([
        ("ok", (RATE_LIMITED,)), ("ok", (SERVER_ERROR, SERVER_ERROR)), ("ok", (TIMEOUT,)),
        (REJECTED, ()), (SERVER_ERROR, (SERVER_ERROR,) * 3), ("ok", ()),
    ])
    rejected = next(r for r in results if isinstance(r, RequestFailed) and r.kind == REJECTED)
    assert "HTTP 400" in str(rejected) and "injected bad request" in str(rejected)
    exhausted = next(r for r in results if isinstance(r, RequestFailed) and r.kind == SERVER_ERROR)
    assert "after 3 retries" in str(exhausted)
    # 5 requests of the image that always fails (1 + 3 retries), and one per retry of the others.
    assert proxy.counts["500"] == 2 + 4 and proxy.counts["429"] == 1 and proxy.counts["stall"] == 1
    assert sorted(proxy.ok_per_image.values()) == [1, 1, 1, 1]


@pytest.mark.server
def test_retry_after_is_honoured(llama_server):
    """The retry of a 429 comes after the server's Retry-After (a lower bound the engine waits
    on purpose, not a speed figure), not after the 0.01 s backoff."""
    import time

    with FaultProxy(llama_server.base_url, [["429"]], retry_after=1.0) as proxy:
        engine = engine_at(proxy.base_url, backoff_s=0.01, max_retries=2)
        started = time.monotonic()
        (caption,) = engine.describe(pictures(1))
        waited = time.monotonic() - started
        engine.close()
    assert caption.retries == (RATE_LIMITED,) and waited >= 1.0


@pytest.mark.server
def test_qps_spaces_the_request_starts(llama_server):
    """qps=4 with 8 requests allowed in flight: the fifth request cannot start before 4 intervals
    of 1/4 s have passed (a wait the engine imposes on purpose: a lower bound, not a speed
    figure)."""
    import time

    with FaultProxy(llama_server.base_url) as proxy:
        engine = engine_at(proxy.base_url, qps=4.0, max_concurrency=8)
        started = time.monotonic()
        assert len(engine.describe(pictures(5))) == 5
        elapsed = time.monotonic() - started
        engine.close()
    assert proxy.counts["requests"] == 5 and elapsed >= 1.0


@pytest.mark.server
def test_the_api_key_is_sent_and_never_shown(llama_server, monkeypatch, caplog):
    secret = "sk-test-" + "7" * 24
    monkeypatch.setenv("VLM4REC_TEST_KEY", secret)
    seen = []

    class Recording(FaultProxy):
        async def _handle(self, request):
            seen.append(request.headers.get("Authorization"))
            return await super()._handle(request)

    with caplog.at_level(logging.DEBUG), Recording(llama_server.base_url, [["400"], ["500*"]]) as proxy:
        engine = engine_at(proxy.base_url, api_key_env="VLM4REC_TEST_KEY", max_retries=1, backoff_s=0.01)
        results = describe_isolated(engine, pictures(2))
        engine.close()
    assert seen and all(h == f"Bearer {secret}" for h in seen)
    assert all(isinstance(r, RequestFailed) for r in results)
    shown = " ".join([*(str(r) for r in results), repr(engine), json.dumps(engine.options), caplog.text])
    assert secret not in shown and "VLM4REC_TEST_KEY" in json.dumps(engine.options)


@pytest.mark.server
def test_requests_are_balanced_over_servers_and_a_dead_one_is_skipped(llama_server):
    from tests.llama_server import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with FaultProxy(llama_server.base_url) as first, FaultProxy(llama_server.base_url) as second:
        urls = [first.base_url, second.base_url, dead]
        assert check_servers({"base_urls": urls}, MODEL_NAME) == [u + "/v1" for u in urls[:2]]
        engine = make_engine("openai", model=MODEL_NAME, max_new_tokens=4,
                             options={"base_urls": urls, "backoff_s": 0.01})
        results = engine.describe(pictures(6))
        engine.close()
    assert len(results) == 6
    # Round robin over three: two each to the live ones, and the dead one's two go to the next.
    assert first.counts["ok"] + second.counts["ok"] == 6 and min(first.counts["ok"], second.counts["ok"]) >= 2
    assert sum(CONNECTION in r.retries for r in results) == 2


@pytest.mark.server
def test_a_body_that_is_not_a_completion_is_a_bad_response_not_retried(llama_server):
    with FaultProxy(llama_server.base_url, [["junk"]]) as proxy:
        engine = engine_at(proxy.base_url, backoff_s=0.01)
        (result,) = describe_isolated(engine, pictures(1))
        engine.close()
    assert isinstance(result, RequestFailed) and result.kind == BAD_RESPONSE and "not a chat completion" in str(result)
    assert proxy.counts["requests"] == 1
