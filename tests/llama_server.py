"""A real OpenAI-compatible vision server for tests and benchmarks: llama-cpp-python's server
serving a tiny random-weight LLaVA-style model written here with ``gguf``'s ``GGUFWriter``.

No weights are downloaded. The text model is a LLaMA (64 hidden units, 2 layers) with a
SentencePiece-style vocabulary of byte tokens plus a few words; the projector is a CLIP ViT
(32 x 32 pixels in 8 x 8 patches, 2 layers) with LLaVA-1.5's two-layer MLP, so a request with
an image goes through the real vision encoder (16 image tokens) into the text model. The output
is gibberish; the HTTP protocol, the image path, the concurrency and the token counts are real.

``LlamaServer`` starts ``python -m llama_cpp.server`` on 127.0.0.1, waits for ``/v1/models``,
and can be killed and started again on the same port (the restart tests).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

MODEL_NAME = "tiny-llava"
TEXT_FILE, PROJECTOR_FILE = "tiny-llava-text.gguf", "tiny-llava-mmproj.gguf"
INSTALL_HINT = "pip install 'llama-cpp-python[server]' gguf (compiles llama.cpp: about 5 minutes on 2 cores)"

# Text model: small enough that a request costs milliseconds, big enough to be a real LLaMA.
N_EMBD, N_LAYER, N_HEAD, N_FF, N_CTX = 64, 2, 4, 128, 512
WORDS = ("▁a ▁the ▁red ▁blue ▁shirt ▁dress ▁poster ▁movie ▁photo ▁style ▁colour ▁cotton ▁leather "
         "▁casual ▁formal ▁party ▁image ▁product ▁detail ▁USER ▁ASSISTANT :").split()
# Vision tower: 32 x 32 pixels in 8 x 8 patches, 16 patches + CLS.
V_IMAGE, V_PATCH, V_EMBD, V_FF, V_LAYER, V_HEAD = 32, 8, 32, 64, 2, 4


def require_llama_cpp() -> None:
    try:
        import gguf  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the real caption server needs llama-cpp-python's server and gguf ({exc}): "
                          f"{INSTALL_HINT}") from exc


def _weights(rng: np.random.Generator, *shape: int, scale: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def write_text_model(path: Path, seed: int = 0) -> Path:
    """A LLaMA GGUF with random weights and a byte-fallback SentencePiece vocabulary."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + WORDS
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (1 + len(WORDS)))
    scores = [0.0] * 259 + [-float(i) for i in range(1 + len(WORDS))]
    vocab = len(tokens)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(MODEL_NAME)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    writer.add_tensor("token_embd.weight", _weights(rng, vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    writer.add_tensor("output.weight", _weights(rng, vocab, N_EMBD))
    for i in range(N_LAYER):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", _weights(rng, N_EMBD, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", _weights(rng, N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", _weights(rng, N_FF, N_EMBD))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", _weights(rng, N_EMBD, N_FF))
    _finish(writer)
    return path


def write_projector(path: Path, seed: int = 1) -> Path:
    """A CLIP vision tower + LLaVA-1.5 MLP projector GGUF (``clip.projector_type`` ``mlp``)
    whose output width is the text model's."""
    import gguf

    rng = np.random.default_rng(seed)
    n_pos = (V_IMAGE // V_PATCH) ** 2 + 1
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{MODEL_NAME}-mmproj")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", False)
    writer.add_uint32("clip.vision.image_size", V_IMAGE)
    writer.add_uint32("clip.vision.patch_size", V_PATCH)
    writer.add_uint32("clip.vision.embedding_length", V_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", V_FF)
    writer.add_uint32("clip.vision.projection_dim", N_EMBD)
    writer.add_uint32("clip.vision.block_count", V_LAYER)
    writer.add_uint32("clip.vision.attention.head_count", V_HEAD)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    writer.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])

    writer.add_tensor("v.class_embd", _weights(rng, V_EMBD))
    writer.add_tensor("v.patch_embd.weight", _weights(rng, V_EMBD, 3, V_PATCH, V_PATCH))
    writer.add_tensor("v.position_embd.weight", _weights(rng, n_pos, V_EMBD))
    writer.add_tensor("v.pre_ln.weight", np.ones(V_EMBD, np.float32))
    writer.add_tensor("v.pre_ln.bias", np.zeros(V_EMBD, np.float32))
    for i in range(V_LAYER):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", _weights(rng, V_EMBD, V_EMBD))
            writer.add_tensor(f"v.blk.{i}.{name}.bias", np.zeros(V_EMBD, np.float32))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", np.ones(V_EMBD, np.float32))
            writer.add_tensor(f"v.blk.{i}.{name}.bias", np.zeros(V_EMBD, np.float32))
        writer.add_tensor(f"v.blk.{i}.ffn_up.weight", _weights(rng, V_FF, V_EMBD))
        writer.add_tensor(f"v.blk.{i}.ffn_up.bias", np.zeros(V_FF, np.float32))
        writer.add_tensor(f"v.blk.{i}.ffn_down.weight", _weights(rng, V_EMBD, V_FF))
        writer.add_tensor(f"v.blk.{i}.ffn_down.bias", np.zeros(V_EMBD, np.float32))
    writer.add_tensor("mm.0.weight", _weights(rng, N_EMBD, V_EMBD))
    writer.add_tensor("mm.0.bias", np.zeros(N_EMBD, np.float32))
    writer.add_tensor("mm.2.weight", _weights(rng, N_EMBD, N_EMBD))
    writer.add_tensor("mm.2.bias", np.zeros(N_EMBD, np.float32))
    _finish(writer)
    return path


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_llava(folder: Path) -> tuple[Path, Path]:
    """(text model, projector) GGUF files in ``folder`` (written once; about 0.3 MB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text, projector = folder / TEXT_FILE, folder / PROJECTOR_FILE
    if not text.exists():
        write_text_model(text.with_suffix(".tmp"))
        os.replace(text.with_suffix(".tmp"), text)
    if not projector.exists():
        write_projector(projector.with_suffix(".tmp"))
        os.replace(projector.with_suffix(".tmp"), projector)
    return text, projector


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` with the tiny LLaVA on 127.0.0.1:``port``."""

    def __init__(self, folder: Path, port: int | None = None, threads: int = 1, log: Path | None = None):
        require_llama_cpp()
        self.folder = Path(folder)
        self.text, self.projector = write_tiny_llava(self.folder)
        self.port = port or free_port()
        self.threads = threads
        self.log = log or self.folder / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.text),
                "--clip_model_path", str(self.projector), "--chat_format", "llava-1-5",
                "--model_alias", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                "--n_ctx", str(N_CTX), "--n_threads", str(self.threads),
                "--n_threads_batch", str(self.threads), "--verbose", "false"]

    def start(self, timeout: float = 120.0) -> LlamaServer:
        if self.process is not None and self.process.poll() is None:
            return self
        with open(self.log, "ab") as sink:
            self.process = subprocess.Popen(self.command(), stdout=sink, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama.cpp server not ready on {self.base_url} after {timeout:.0f} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL, as a crashed server: no graceful shutdown, connections cut."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
