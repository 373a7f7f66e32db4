"""The caption job with the ``openai`` engine against the real llama.cpp server (a tiny random
LLaVA written as GGUF), on real Ray, Spark and Delta: the round trip into ``descriptions``, the
server killed mid-run and started again, a proxy injecting 429s, 500s, a 400 and a stall, and
no server at all.

One synthetic catalog of 12 images is ingested once for the module; each test describes it
under its own prompt (its own cache slice), so tests do not see each other's descriptions.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs import caption, ingest, tables
from tests.fault_proxy import FaultProxy
from tests.llama_server import MODEL_NAME, free_port

pytestmark = [pytest.mark.spark, pytest.mark.ray, pytest.mark.server]

N_IMAGES = 12
# The API key of the echo test, with characters JSON escapes (its escaped form differs), set in
# the environment at collection, before any module of the session starts Ray, as on a real node:
# the workers inherit it (a Ray that an earlier module started would otherwise lack it).
KEY_ENV, KEY = "VLM4REC_TEST_CAPTION_KEY", 'sk-echo"7\\' + "k" * 24
os.environ[KEY_ENV] = KEY


@pytest.fixture(scope="module")
def ray_running():
    """Ray for the jobs of this module (its session folder): the session's when a module before started it."""
    import ray

    if ray.is_initialized():
        yield ray._private.worker._global_node.get_session_dir_path()
        return
    context = ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                       configure_logging=False)
    yield context.address_info["session_dir"]
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog(spark, tmp_path_factory, ray_running):
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("openai-data")
    wh = tmp_path_factory.mktemp("openai-wh")
    generate(root, seed=1, n_items=N_IMAGES, n_users=6)
    assert ingest.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}",
                        "--set", f"dataset.paths.root={root}", "--set", "log_level=WARNING"]) == 0
    return wh, root


def argv(wh, root, url: str, prompt: str, *extra: str) -> list[str]:
    return ["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}", "--set", f"dataset.paths.root={root}",
            "--set", "log_level=WARNING", "--set", "experiment.caption.engine=openai",
            "--set", f"experiment.caption.model={MODEL_NAME}", "--set", f"experiment.caption.prompt={prompt}",
            "--set", "experiment.caption.max_new_tokens=6", "--set", "experiment.caption.batch_size=4",
            "--set", f"experiment.caption.openai.base_url={url}", *extra]


def run_caption(capsys, args: list[str]) -> dict:
    assert caption.main(args) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])["counts"]


def rows(spark, wh, prompt: str) -> dict:
    df = tables.read(spark, wh, "descriptions").filter((F.col("engine") == "openai") & (F.col("prompt") == prompt))
    return {r.image_sha256: r for r in df.collect()}


def test_round_trip_into_descriptions_and_a_cached_rerun_sends_nothing(spark, catalog, llama_server, capsys):
    wh, root = catalog
    prompt = "Describe this product image."
    with FaultProxy(llama_server.base_url) as proxy:
        counts = run_caption(capsys, argv(wh, root, proxy.base_url, prompt))
        first_requests = proxy.counts["requests"]
        assert counts["to_describe"] == N_IMAGES and counts["described"] == N_IMAGES and counts["failed"] == 0
        described = rows(spark, wh, prompt)
        assert len(described) == N_IMAGES
        # n_tokens is the server's count: a random model may stop at once (0), and llama-cpp-python
        # counts the tokens it decodes past max_tokens to finish a multi-byte character.
        bad = [(r.status, r.error, r.n_tokens, r.latency_ms) for r in described.values()
               if not (r.status == "ok" and r.model == MODEL_NAME and r.error is None and r.text is not None
                       and r.n_tokens >= 0 and r.latency_ms > 0)]
        assert not bad
        # The server's usage, summed: completion tokens are the rows' n_tokens; every prompt
        # carries the image's 16 tokens and the chat template.
        assert counts["completion_tokens"] == sum(r.n_tokens for r in described.values())
        assert counts["prompt_tokens"] > 16 * N_IMAGES
        assert counts["retries"] == 0 and counts["described_after_retry"] == 0
        assert sorted(proxy.ok_per_image.values()) == [1] * N_IMAGES

        counts = run_caption(capsys, argv(wh, root, proxy.base_url, prompt))
        assert counts["to_describe"] == 0 and counts["cached"] == N_IMAGES
        # Only the first run's requests (its start-up check included) reached the server.
        assert proxy.counts["requests"] == first_requests


def test_faults_become_counts_and_error_rows_never_a_failed_job(spark, catalog, llama_server, capsys):
    wh, root = catalog
    prompt = "Describe the image (faults)."
    scripts = [["429"], ["500", "500"], ["stall"], ["400"], ["500*"]]
    faults = ("--set", "experiment.caption.openai.max_retries=3", "--set", "experiment.caption.openai.backoff_s=0.05",
              "--set", "experiment.caption.openai.timeout_s=2", "--set", "experiment.caption.openai.max_concurrency=2")
    with FaultProxy(llama_server.base_url, scripts, retry_after=1.0, stall_s=5.0) as proxy:
        counts = run_caption(capsys, argv(wh, root, proxy.base_url, prompt, *faults))
    assert counts["described"] == N_IMAGES - 2 and counts["failed"] == 2
    assert counts["failed_rejected"] == 1 and counts["failed_server_error"] == 1
    assert counts["described_after_retry"] == 3
    assert counts["retries_rate_limited"] == 1 and counts["retries_timeout"] == 1
    assert counts["retries_server_error"] == 2 + 3 and counts["retries"] == 7
    errors = [r for r in rows(spark, wh, prompt).values() if r.status == "error"]
    assert sorted(r.error.split(":")[0] for r in errors) == ["rejected", "server_error"]
    assert all(r.text is None and "/v1/chat/completions" in r.error for r in errors)

    # Request faults are retried by the next run, which describes only those two.
    with FaultProxy(llama_server.base_url) as proxy:
        counts = run_caption(capsys, argv(wh, root, proxy.base_url, prompt))
    assert counts["retried"] == 2 and counts["to_describe"] == 2 and counts["described"] == 2
    assert proxy.counts["ok"] == 2
    assert all(r.status == "ok" for r in rows(spark, wh, prompt).values())


@pytest.mark.faults
def test_server_killed_mid_run_then_restarted_describes_each_image_once(spark, catalog, llama_server, capsys):
    """The server dies after 4 answers: the images in flight and after fail as connection errors
    (error rows; the job still succeeds); once the server is back, the rerun describes exactly
    those, and across both runs every image got exactly one answer."""
    wh, root = catalog
    prompt = "Describe the image (server killed)."
    budget = ("--set", "experiment.caption.openai.max_retries=1", "--set", "experiment.caption.openai.backoff_s=0.05",
              "--set", "experiment.caption.openai.max_concurrency=2")
    proxy = FaultProxy(llama_server.base_url, kill_after=4, on_kill=llama_server.kill).start()
    try:
        counts = run_caption(capsys, argv(wh, root, proxy.base_url, prompt, *budget))
        assert llama_server.process.poll() is not None  # it really died mid-run
        assert counts["described"] >= 4 and counts["failed"] == N_IMAGES - counts["described"] >= 1
        assert counts["failed_connection"] == counts["failed"]
        first = {sha: r.created_at for sha, r in rows(spark, wh, prompt).items() if r.status == "ok"}

        llama_server.start()
        proxy.reset()
        counts = run_caption(capsys, argv(wh, root, proxy.base_url, prompt, *budget))
        assert counts["cached_ok"] == len(first) and counts["to_describe"] == N_IMAGES - len(first)
        assert counts["described"] == N_IMAGES - len(first) and counts["failed"] == 0
    finally:
        proxy.stop()
        llama_server.start()
    after = rows(spark, wh, prompt)
    assert len(after) == N_IMAGES and all(r.status == "ok" for r in after.values())
    assert all(after[sha].created_at == created for sha, created in first.items())
    assert sorted(proxy.ok_per_image.values()) == [1] * N_IMAGES


def test_no_server_fails_fast_with_the_url_and_the_fix(spark, catalog, capsys):
    wh, root = catalog
    url = f"http://127.0.0.1:{free_port()}"
    assert caption.main(argv(wh, root, url, "Describe the image (no server).")) == caption.EXIT_SERVER_DOWN == 4
    err = capsys.readouterr().err
    assert f"no server answers: {url}" in err and "Start the server" in err and "base_url" in err
    assert rows(spark, wh, "Describe the image (no server).") == {}
    failed = (tables.read(spark, wh, "runs").filter("job = 'caption' AND status = 'failed'")
              .orderBy(F.col("started_at").desc()).first())
    assert failed is not None and url in failed.error


@pytest.mark.faults
def test_a_key_the_server_echoes_is_stored_and_logged_nowhere(spark, catalog, ray_running, llama_server, capsys,
                                                             caplog):
    """issue 26.4: the server echoes the Authorization header in its 500s; the key, as sent or
    JSON-escaped, is in neither the warehouse's bytes, the logs nor Ray's session folder."""
    wh, root = catalog
    prompt = "Describe the image (echoed key)."
    keyed = ("--set", f"experiment.caption.openai.api_key_env={KEY_ENV}", "--set", "log_level=DEBUG",
             "--set", "experiment.caption.openai.max_retries=1", "--set", "experiment.caption.openai.backoff_s=0.05")
    with caplog.at_level(logging.DEBUG), FaultProxy(llama_server.base_url, [["echo", "echo"], ["echo"]]) as proxy:
        assert caption.main(argv(wh, root, proxy.base_url, prompt, *keyed)) == 0
    shown = capsys.readouterr()
    assert proxy.counts["echo"] == 3
    counts = json.loads(shown.out.strip().splitlines()[-1])["counts"]
    assert counts["failed_server_error"] == 1 and counts["described_after_retry"] == 1
    (error,) = [r.error for r in rows(spark, wh, prompt).values() if r.status == "error"]
    assert error.startswith("server_error: HTTP 500") and "bad credentials Bearer [redacted]" in error

    forms = {KEY, json.dumps(KEY)[1:-1]}
    assert len(forms) == 2
    texts = {"stdout": shown.out, "stderr": shown.err, "logs": caplog.text}
    assert not [(where, form) for where, text in texts.items() for form in forms if form in text]
    stored = [path for folder in (wh, Path(ray_running) / "logs") for path in Path(folder).rglob("*")
              if path.is_file() and any(form.encode() in path.read_bytes() for form in forms)]
    assert not stored
