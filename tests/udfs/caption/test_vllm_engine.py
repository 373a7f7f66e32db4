"""The ``vllm`` engine without vLLM installed: it imports, it fails with the install command,
and the row mapping it hands to Ray is right."""
from __future__ import annotations

import base64
import importlib.util
import io
import sys

import pytest
from PIL import Image

from udfs.caption import make_engine
from udfs.caption.vllm_engine import (
    KIND,
    build_vllm_processor,
    chat_messages,
    engine_args,
    image_data_url,
    sampling_params,
    vllm_processor_config,
    vllm_request_row,
    vllm_result_row,
)

needs_no_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="checks the message shown when vLLM is missing"
)


@needs_no_vllm
def test_building_without_vllm_names_the_install_command():
    assert "vllm" not in sys.modules  # the module imported above without it
    with pytest.raises(ImportError, match=r"pip install 'vlm4rec\[gpu\]'"):
        build_vllm_processor(model="/models/llava")
    with pytest.raises(ImportError, match=r"pip install 'vlm4rec\[gpu\]'"):
        make_engine("vllm")


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_file_bytes_travel_unchanged_in_a_data_url():
    data = _png_bytes()
    url = image_data_url(data)
    header, payload = url.split(",", 1)
    assert header == "data:image/png;base64"
    assert base64.b64decode(payload) == data


def test_pil_images_become_jpeg_data_urls():
    url = image_data_url(Image.new("RGB", (6, 6), (0, 0, 255)))
    assert url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (6, 6)


def test_request_row_is_one_user_turn_with_the_image_then_the_prompt():
    row = {"image_sha256": "abc", "item_id": "7", "image_bytes": _png_bytes()}
    request = vllm_request_row(row, prompt="Describe it.", image_column="image_bytes", max_new_tokens=64, min_new_tokens=None)
    assert request["image_bytes"] is None
    (message,) = request["messages"]
    assert message["role"] == "user"
    assert [part["type"] for part in message["content"]] == ["image_url", "text"]
    assert message["content"][1]["text"] == "Describe it."
    assert request["sampling_params"] == {"temperature": 0.0, "max_tokens": 64}
    assert chat_messages(row["image_bytes"], "Describe it.") == request["messages"]


def test_benchmark_length_sets_min_tokens():
    assert sampling_params(128, 128) == {"temperature": 0.0, "max_tokens": 128, "min_tokens": 128}


def test_result_rows_have_one_schema_for_success_and_failure():
    keep = ("image_sha256", "item_id")
    ok = vllm_result_row(
        {"image_sha256": "a", "item_id": "1", "generated_text": " a red dress ", "num_generated_tokens": 4,
         "messages": "dropped"},
        keep,
    )
    assert ok == {"image_sha256": "a", "item_id": "1", "text": "a red dress", "n_tokens": 4, "error": ""}
    failed = vllm_result_row(
        {"image_sha256": "b", "item_id": "2", "generated_text": "", "__inference_error__": "prompt too long"}, keep
    )
    assert failed == {"image_sha256": "b", "item_id": "2", "text": None, "n_tokens": None, "error": "prompt too long"}
    assert set(ok) == set(failed)


def test_engine_args_are_ours_then_vllms_own():
    options = KIND.checked_options({"max_model_len": 4096, "gpu_memory_utilization": 0.8,
                                    "engine_kwargs": {"gpu_memory_utilization": 0.9}})
    assert engine_args(options) == {"tensor_parallel_size": 1, "limit_mm_per_prompt": {"image": 1},
                                    "max_model_len": 4096, "gpu_memory_utilization": 0.9}


def _ray_llm_importable() -> bool:
    try:
        import ray.data.llm  # noqa: F401
    except ImportError:
        return False
    return True


def test_processor_config_or_a_clear_install_error():
    """With Ray's LLM extra the config validates against Ray's own schema; without it the
    error names the install command."""
    args = dict(model="/models/llava", batch_size=32, concurrency=(1, 4), accelerator_type="H100",
                options={"tensor_parallel_size": 2, "max_model_len": 4096,
                         "engine_kwargs": {"enable_prefix_caching": True}})
    if not _ray_llm_importable():
        with pytest.raises(ImportError, match=r"pip install 'vlm4rec\[gpu\]'"):
            vllm_processor_config(**args)
        return
    config = vllm_processor_config(**args)
    assert config.model_source == "/models/llava" and config.batch_size == 32
    # The multimodal stage as Ray itself resolves it (its schema changed across releases).
    from ray.llm._internal.batch.stages.configs import PrepareMultimodalStageConfig, resolve_stage_config

    stage = resolve_stage_config(config.prepare_multimodal_stage, PrepareMultimodalStageConfig)
    assert stage.enabled and stage.chat_template_content_format == "openai"
    assert config.engine_kwargs["tensor_parallel_size"] == 2 and config.engine_kwargs["max_model_len"] == 4096
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert config.engine_kwargs["enable_prefix_caching"] is True
    assert config.should_continue_on_error is True


def test_ray_and_vllm_are_pinned_together():
    from udfs.caption.vllm_engine import RAY_VERSION, VLLM_VERSION, check_versions

    check_versions(RAY_VERSION, VLLM_VERSION)
    with pytest.raises(ImportError, match=r"Ray 2\.60\.0 with vLLM 0\.29\.0 .*found Ray 2\.60\.0 and vLLM 0\.11\.0"):
        check_versions("2.60.0", "0.11.0")
    # The pin is Ray's own requirement, so the two cannot drift apart unnoticed.
    from importlib.metadata import requires

    assert f"vllm[audio]=={VLLM_VERSION}; extra == \"llm\"" in requires("ray")
