"""A tiny random-weight LLaVA written with ``save_pretrained``, so that the ``hf`` engine is
tested from a folder exactly as a user runs it, with no hub access.

Shapes: CLIP vision tower 30x30 pixels in 6x6 patches (25 patches + CLS, 25 image tokens with the
"default" feature strategy that drops CLS), Llama text model with 32 hidden units and 2 layers,
a word-level tokenizer trained here, and a chat template in the LLaVA-1.5 style.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 30
PATCH_SIZE = 6
WORDS = (
    "a an the of in with and for on or this it be what like might is red blue green black white grey "
    "shirt dress shoe bag poster movie photo style color colour casual formal party wedding sport "
    "cotton leather wool silk describe product image detail focusing visual attributes material "
    "occasion suitable short long very please tell me about picture"
).split()
SPECIALS = ("<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> "
    "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_llava(folder: Path, seed: int = 0) -> Path:
    """Write model + processor into ``folder`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(dict.fromkeys(WORDS + [",", "."])))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "USER:", "ASSISTANT:"]})
    tokenizer.chat_template = CHAT_TEMPLATE

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers >= 5 without torchvision
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
            # Larger random weights than the default 0.02 keep greedy choices far from ties, so
            # batch composition cannot flip a token through float rounding.
            initializer_range=0.5,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
