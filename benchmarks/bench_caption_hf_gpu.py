"""The ``hf`` caption engine on a GPU: items/s at batch 8/32/128 against plain ``model.generate``.

Models are built from configs with random weights (no download: random weights cost the same
to run), in bf16 on the GPU, and wrapped with ``HFEngine.from_model``:

- ``llava-1.5-7b``: CLIP ViT-L/14 at 336 px (576 image tokens) + a Llama-2-7B text model;
- ``llava-next-7b``: the same tower with anyres tiling (672 x 672 grid: base + 4 tiles,
  about 2,900 image tokens for the benchmark's 600 x 800 images) + a Mistral-7B text model.

Every caption has exactly ``--new-tokens`` (128) new tokens: ``min_new_tokens`` equals
``max_new_tokens``, so random weights cannot stop early. For each model and batch size, the
same images go through (a) ``HFEngine.describe`` (chat template, processor, sort by length,
generate, decode) and (b) ``model.generate`` on inputs processed beforehand (the baseline),
each after a warm-up batch. ``engine_overhead_share`` = 1 - baseline time / engine time.

Needs torch + transformers only (no Spark, Ray or network). Prints JSON (and writes it with
``--out``). ``--quick``: one measured batch per size; ``--tiny``: tiny shapes on the CPU, a
check that the script runs, not a measurement.

    python benchmarks/bench_caption_hf_gpu.py --quick
    python benchmarks/bench_caption_hf_gpu.py --tiny --quick
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the GPU machine runs this from a bare checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from udfs.caption.hf_engine import HFEngine  # noqa: E402
from udfs.caption.prompts import PAPER_PROMPT  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
REAL_VOCAB = 32064  # LLaVA's Llama/Mistral vocabulary with the image and pad tokens
SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "full": {
        "vision": dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                       num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
        "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768),
    },
    "tiny": {
        "vision": dict(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, projection_dim=32),
        "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096),
        "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
    },
}


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with ``vocab_size`` entries (the prompt's words, then fillers), so
    that every id the random model generates decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
    words = list(dict.fromkeys(PAPER_PROMPT.replace(",", " ,").replace(".", " .").split()))
    fillers = [f"w{i}" for i in range(vocab_size - len(specials) - len(words))]
    vocab = {token: i for i, token in enumerate(specials + words + fillers)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "USER:", "ASSISTANT:"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(kind: str, size: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model with random weights on ``device``, processor) for ``llava-1.5-7b`` / ``llava-next-7b``."""
    import transformers as tf

    shapes = SHAPES[size]
    vocab = REAL_VOCAB if size == "full" else 256
    tokenizer = build_tokenizer(vocab)
    vision = tf.CLIPVisionConfig(**shapes["vision"])
    side, patch = shapes["vision"]["image_size"], shapes["vision"]["patch_size"]
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    common = dict(image_token_id=image_token, vision_feature_select_strategy="default",
                  vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id)
    processor_common = dict(tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    crop = {"height": side, "width": side}
    if kind == "llava-1.5-7b":
        text = tf.LlamaConfig(vocab_size=vocab, **shapes["llama"], **special)
        config = tf.LlavaConfig(vision_config=vision, text_config=text, **common)
        processor = tf.LlavaProcessor(
            image_processor=tf.CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=crop), **processor_common)
        model_cls = tf.LlavaForConditionalGeneration
    elif kind == "llava-next-7b":
        text = tf.MistralConfig(vocab_size=vocab, **shapes["mistral"], **special)
        grid = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
        config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=grid, **common)
        processor = tf.LlavaNextProcessor(
            image_processor=tf.LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size=crop,
                                                          image_grid_pinpoints=grid), **processor_common)
        model_cls = tf.LlavaNextForConditionalGeneration
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def product_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Smooth random colour fields (JPEG-like content; the pixels do not change the cost)."""
    rng = np.random.default_rng(seed)
    w, h = size
    images = []
    for _ in range(n):
        small = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))
    return images


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(engine: HFEngine, images: list[Image.Image], batch: int, repeats: int, new_tokens: int) -> dict[str, Any]:
    """Engine vs plain ``generate`` on the same ``batch * repeats`` images (after a warm-up batch)."""
    model, processor, device = engine.network, engine.processor, engine.device
    text = engine.render_prompt(engine.prompt)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=engine.tokenizer.pad_token_id)
    chunks = [images[i * batch:(i + 1) * batch] for i in range(repeats)]
    prepared = []
    for chunk in chunks:
        inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
        prepared.append({k: (v.to(device, engine.dtype) if torch.is_floating_point(v) else v.to(device))
                         for k, v in inputs.items() if isinstance(v, torch.Tensor)})

    def plain():
        with torch.inference_mode():
            for inputs in prepared:
                out = model.generate(**inputs, **kwargs)
                assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens

    def through_engine():
        for chunk in chunks:
            captions = engine.describe(chunk)
            assert all(c.n_tokens <= new_tokens for c in captions)

    engine.batch_size = batch
    try:
        with torch.inference_mode():
            model.generate(**prepared[0], **kwargs)  # warm-up: kernels, allocator, caches
        t_plain = timed(plain, device)
        t_engine = timed(through_engine, device)
    except torch.OutOfMemoryError as exc:
        return {"batch": batch, "error": f"out of memory: {str(exc).splitlines()[0]}"}
    finally:
        prepared.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n = batch * repeats
    result = {
        "batch": batch, "items": n, "image_tokens": int((chunks[0] and _image_tokens(engine, chunks[0][0])) or 0),
        "generate_items_per_s": round(n / t_plain, 3), "engine_items_per_s": round(n / t_engine, 3),
        "ratio_engine_to_generate": round(t_plain / t_engine, 3),
        "engine_overhead_share": round(1 - t_plain / t_engine, 3),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return result


def _image_tokens(engine: HFEngine, image: Image.Image) -> int:
    inputs = engine.processor(images=[image], text=[engine.render_prompt(engine.prompt)], return_tensors="pt")
    image_id = engine.network.config.image_token_id
    return int((inputs["input_ids"] == image_id).sum())


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device)}
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one measured batch per size")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--models", default="llava-1.5-7b,llava-next-7b")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 8,32,128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per caption (default 128)")
    parser.add_argument("--image-size", default="600x800", help="WIDTHxHEIGHT of the input images")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, eager)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    if args.tiny:
        device, dtype, size = torch.device("cpu"), torch.float32, "tiny"
        batches = [int(b) for b in (args.batches or "2,4").split(",")]
        new_tokens = args.new_tokens or 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run on the GPU machine, or pass --tiny for a CPU smoke run")
        device, dtype, size = torch.device("cuda"), torch.bfloat16, "full"
        batches = [int(b) for b in (args.batches or "8,32,128").split(",")]
        new_tokens = args.new_tokens or 128
    repeats = 1 if args.quick else 3
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    images = product_images(max(batches) * repeats, (width, height))

    report: dict[str, Any] = {"benchmark": "caption_hf_gpu", "tiny": args.tiny, "quick": args.quick,
                              "new_tokens": new_tokens, "dtype": str(dtype).replace("torch.", ""),
                              "image_size": [width, height], "machine": machine(device), "models": {}}
    for kind in args.models.split(","):
        started = time.perf_counter()
        model, processor = build_model(kind, size, device, dtype)
        options = {"device": str(device), "dtype": report["dtype"], "min_new_tokens": new_tokens}
        engine = HFEngine.from_model(model, processor, model=f"random-{kind}", batch_size=batches[0],
                                     max_new_tokens=new_tokens, options=options)
        if args.attn:
            engine.network.set_attn_implementation(args.attn)
        entry: dict[str, Any] = {"build_seconds": round(time.perf_counter() - started, 1),
                                 "parameters_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
                                 "runs": []}
        for batch in batches:
            entry["runs"].append(measure(engine, images, batch, repeats, new_tokens))
            print(json.dumps({kind: entry["runs"][-1]}), file=sys.stderr, flush=True)
        report["models"][kind] = entry
        del engine, model, processor
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
