"""The ``vlm4rec`` console script: one subcommand per job, plus ``setup`` and ``doctor``.

``vlm4rec ingest --conf datasets/ml100k.yaml`` is the same as ``python -m jobs.ingest ...``
and as ``spark-submit jobs/ingest.py ...``.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import sys
from importlib import import_module

COMMANDS = {
    "setup": ("jobs.setup_jars", "fetch the Delta connector JARs once (Maven Central) so jobs start offline"),
    "doctor": ("jobs.doctor", "check Java, Spark, Delta, Ray, torch, the bundled models and the GPU"),
    "synth": ("jobs.synth", "generate the synthetic demo dataset"),
    "ingest": ("jobs.ingest", "dataset files -> items, interactions, rejects tables"),
    "caption": ("jobs.caption", "item images -> descriptions table (Ray Data + a caption engine)"),
    "embed": ("jobs.embed", "descriptions, titles, texts, images -> item_embeddings table"),
    "fuse": ("jobs.fuse", "train attention/gating/crossmodal/smore fusions -> item_embeddings, fusion_models"),
    "profiles": ("jobs.profiles", "train histories -> user_profiles table"),
    "topk": ("jobs.topk", "blockwise top-k similarity join -> recommendations table"),
    "evaluate": ("jobs.evaluate", "recommendations + test split -> user_metrics, metrics, comparisons"),
    "report": ("jobs.report", "a run's tables -> HTML report + PNG figures under <warehouse>/reports/<run_id>/"),
    "recommend": ("jobs.recommend", "top-K for users or ad-hoc histories of a run, with explanations (no Spark)"),
    "pipeline": ("jobs.pipeline", "run an experiment config end to end"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: vlm4rec COMMAND [--conf FILE ...] [--set key=value ...]", "", "commands:",
                      *(f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()),
                      "", "Run `vlm4rec COMMAND --help` for a command's options."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlm4rec: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    return int(import_module(COMMANDS[name][0]).main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
