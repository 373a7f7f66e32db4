"""YAML files merged in order (``extends`` first), then ``--set key=value`` overrides, each key
remembered with the file or flag that set it, so that an error can name it."""
from pathlib import Path
from typing import Any

import yaml

from .sections import Config
from .validation import ConfigError

CONF_ROOT = Path(__file__).resolve().parents[2] / "conf"


def _merge(into: dict, new: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        # options/paths/extra are free-form maps; everything else merges key by key.
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, sources, dotted)
        else:
            into[key] = value
            sources[dotted] = source


def resolve_conf_path(name: str) -> Path:
    """A path as given, else relative to the packaged ``conf/`` folder (``datasets/ml100k.yaml``)."""
    found = [path for path in (Path(name).expanduser(), CONF_ROOT / name, CONF_ROOT / f"{name}.yaml") if path.exists()]
    if found:
        return found[0]
    raise ConfigError(
        f"config file '{name}' not found (looked in the current folder and in {CONF_ROOT}); "
        "pass an existing YAML path to --conf"
    )


def _load_file(path: Path, data: dict, sources: dict[str, str], seen: tuple[Path, ...]) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself through {[str(p) for p in seen]}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    # ``extends`` names files (relative to this one, or to conf/) merged before this one.
    parents = loaded.pop("extends", []) or []
    for parent in [parents] if isinstance(parents, str) else parents:
        local = path.parent / parent
        _load_file(local if local.exists() else resolve_conf_path(parent), data, sources, seen + (path,))
    _merge(data, loaded, str(path), sources)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set '{text}' must look like key=value, e.g. --set spark.master=local[2]")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value == raw.strip() != raw:
        # YAML trims a bare value; trimming silently would accept what the same value quoted in a
        # file refuses, and keeping it would make ' /tmp/x' a relative path: say so instead.
        raise ConfigError(f"--set '{text}': the value {raw!r} starts or ends with white space; remove it, "
                          f"or quote the value to keep it (--set '{key.strip()}=\"{raw}\"')")
    return key.strip(), value


def load_config(conf_files: list[str] | None = None, overrides: list[str] | None = None,
                origins: dict[str, str] | None = None) -> Config:
    """``base.yaml``, then each ``--conf`` file in order, then each ``--set`` override.
    ``origins`` names how an override was given when it was not a ``--set`` (a job's flag)."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    _load_file(CONF_ROOT / "base.yaml", data, sources, ())
    for name in conf_files or []:
        _load_file(resolve_conf_path(name), data, sources, ())
    for text in overrides or []:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = value
        sources[key] = (origins or {}).get(text, f"--set {text}")
    return Config.from_dict(data, sources)
