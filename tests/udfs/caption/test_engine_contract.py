"""What every caption engine must do, one suite run against each (in the manner of LensKit's
shared component tests): ``tags`` on the real EfficientNet-Lite0 weights, ``hf`` on the tiny
random LLaVA, ``openai`` against the real llama.cpp server serving a tiny random LLaVA (GGUF).
An engine added later joins by adding its name and model to ``ENGINES``.

- a bad image fails alone and the rest of its batch is described as without it;
- an empty batch is an empty result;
- the options an engine runs with are its config section, key for key;
- its identity (name, model, prompt, prompt_id), which keys the ``descriptions`` cache, is the
  same in another process."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.config import CaptionConf
from udfs.caption import Caption, describe_isolated, make_engine
from udfs.caption.kinds import KINDS

ROOT = Path(__file__).resolve().parents[3]
# Engine name -> options to set away from their defaults, so that the round trip is not
# satisfied by defaults alone.
ENGINES = {"tags": {"top_k": 2, "colours": 2}, "hf": {"device": "cpu", "min_new_tokens": 2},
           "openai": {"max_concurrency": 2, "timeout_s": 60.0}}


def section(name: str) -> dict:
    """The engine's section of ``experiment.caption`` as a user would set it."""
    return dataclasses.asdict(dataclasses.replace(getattr(CaptionConf(), name), **ENGINES[name]))


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.server) if name == "openai" else name
                        for name in sorted(ENGINES)], scope="module")
def built(request, tiny_llava) -> tuple[str, str | None, dict]:
    name = request.param
    if name == "openai":
        from tests.llama_server import MODEL_NAME

        server = request.getfixturevalue("llama_server")
        return name, MODEL_NAME, {**section(name), "base_url": server.base_url}
    return name, (str(tiny_llava) if name == "hf" else None), section(name)


@pytest.fixture(scope="module")
def engine(built):
    name, model, options = built
    return make_engine(name, model=model, batch_size=4, max_new_tokens=6, options=options)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    noise = Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8))
    return [Image.new("RGB", (64, 48), (220, 20, 20)), noise]


def truncated_jpeg() -> Image.Image:
    """Opened but not decoded, as a file cut while being read: decoding is where it breaks."""
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(5).random((160, 160, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    return Image.open(io.BytesIO(data[: len(data) // 2]))


def test_a_bad_image_fails_alone(engine):
    red, noise = images()
    results = describe_isolated(engine, [red, truncated_jpeg(), noise])
    assert isinstance(results[1], OSError) and "truncated" in str(results[1])
    assert [results[0], results[2]] == engine.describe([red, noise])
    assert all(isinstance(r, Caption) and r.text for r in (results[0], results[2]))


def test_an_empty_batch_is_an_empty_result(engine):
    assert engine.describe([]) == []
    assert describe_isolated(engine, []) == []


def test_options_are_the_config_section_key_for_key(engine, built):
    name, _, options = built
    assert engine.options == options
    assert set(options) == set(dataclasses.asdict(getattr(CaptionConf(), name)))
    # The section's defaults are the engine's: a config that sets nothing runs the defaults.
    default = dataclasses.asdict(getattr(CaptionConf(), name))
    assert KINDS[name].defaults() == default


def test_identity_is_the_same_in_another_process(engine, built):
    name, model, options = built
    script = ("import json, sys\n"
              "from udfs.caption import make_engine\n"
              "name, model, options = json.loads(sys.argv[1])\n"
              "e = make_engine(name, model=model, batch_size=4, max_new_tokens=6, options=options)\n"
              "print(json.dumps([e.name, e.model, e.prompt, e.prompt_id]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, json.dumps([name, model, options])], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other == [engine.name, engine.model, engine.prompt, engine.prompt_id]
