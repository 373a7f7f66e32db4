"""``recommend``: top-K lists of a run for users or ad-hoc histories, with explanations (no Spark).

One representation of one run, read from the Delta tables WITHOUT Spark (``udfs.recommender``).

    vlm4rec recommend --run-id RUN --user 42 --user 7 --k 10
    vlm4rec recommend --run-id RUN --representation title --history 12,40,77 --format table
    vlm4rec recommend --dataset ml100k --user 42       # the latest completed pipeline run of ml100k

``--user`` (repeatable, or comma-separated) names users of the run; ``--history ITEM,ITEM,...``
(repeatable) is one ad-hoc history each, for a user the tables have never seen (its items
without a vector are left out and listed under ``unknown_items``). Without ``--run-id`` the
latest completed ``pipeline`` run of the dataset is served (``--dataset``, else the config's
``dataset.name``, else the only dataset with one), and stderr says which. The representation
defaults to ``lvlm`` (the run's LVLM representation, spelt out). Output: one JSON line per
query (``--format jsonl``, default) or a plain table; ``--no-explain`` drops the explanations.
This is the online path: it only reads, so it records no row in ``runs`` (a write per query
would need a Delta writer on the serving path). Exit codes: 0 done, 2 a bad request (no
completed run; an unknown run, user, item or representation; a bad flag value: the message
names the fix), 3 the ``deltalake`` package is missing, 5 a storage failure (a corrupt or missing data
file, a store that stopped answering: one line naming the path and the fix, ``jobs.storage_errors``).

A cold start is most of a one-user answer (docs/BENCHMARKS.md): this module imports only the
config loader at the top, and the recommender (numpy, pandas, pyarrow, delta-rs; never pyspark,
torch or Ray) once the request is known to be well formed; it reads only the asked users' rows.
``--torch-kernel`` imports torch to rank with the ``topk`` job's own arithmetic
(``udfs.recommender``: the numpy default may swap near-tied items).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import json
import sys

from .config import ConfigError, load_config
from .job_run import (EXIT_CONFIG, EXIT_INSTALL, EXIT_OK, EXIT_STORAGE, base_parser, comma_list, run_id_argument,
                      setup_logging)
from .storage_errors import classify


def positive_int(text: str) -> int:
    """argparse type of a count flag: argparse names the flag in the message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="the run whose lists to serve (default: the dataset's latest completed pipeline run)")
    parser.add_argument("--dataset", default=None,
                        help="without --run-id: the dataset whose latest completed pipeline run to serve "
                             "(default: the config's dataset.name, else the only dataset with one)")
    parser.add_argument("--representation", default="lvlm",
                        help="one of the run's representations (default lvlm: the run's LVLM representation)")
    parser.add_argument("--user", action="append", default=[], type=comma_list, metavar="USER[,USER]",
                        help="user id(s) of the run (repeatable)")
    parser.add_argument("--history", action="append", default=[], type=comma_list, metavar="ITEM,ITEM",
                        help="one ad-hoc history of item ids, for a user the tables have never seen (repeatable)")
    parser.add_argument("--k", type=positive_int, default=10, help="list length (default 10)")
    parser.add_argument("--format", choices=["jsonl", "table"], default="jsonl", help="output format")
    parser.add_argument("--no-explain", action="store_true", help="leave out the explanations")
    parser.add_argument("--contributors", type=positive_int, default=3,
                        help="history items per explanation (default 3; --no-explain for none)")
    parser.add_argument("--torch-kernel", action="store_true",
                        help="score with the topk job's torch arithmetic: known users' lists equal the run's "
                             "stored ones bit for bit (default numpy: near-ties within ~1e-6 may swap), "
                             "at about a second more of start-up")


def table_lines(records: list[dict]) -> list[str]:
    lines = []
    for record in records:
        who = record["user_id"] if record["user_id"] is not None else "(history)"
        lines.append(f"{who}  [{record['representation']}, run {record['run_id']}]")
        if record.get("unknown_items"):
            lines.append(f"  left out of the history (no vector): {', '.join(record['unknown_items'])}")
        for entry in record["items"]:
            title = f"  {entry['title']}" if entry.get("title") else ""
            lines.append(f"  {entry['rank']:>3}  {entry['item_id']:<16} {entry['score']:.4f}{title}")
            if entry.get("because"):
                exact = entry["shares_exact"]
                # ``Title [id]``, or the id alone for an item without a title.
                because = ", ".join((f"{c['title']} [{c['item_id']}]" if c.get("title") else c["item_id"])
                                    + f" ({c['share' if exact else 'similarity']:+.3f})" for c in entry["because"])
                lines.append(f"       because: {because}" + (" (share of the score)" if exact else " (cosine)"))
            if entry.get("shared_phrases"):
                lines.append(f"       shared: {', '.join(entry['shared_phrases'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("recommend", __doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    users = [u for group in args.user for u in group]
    if bool(users) == bool(args.history):
        parser.error("pass --user (users of the run) or --history (ad-hoc histories), one of the two")
    try:
        config = load_config(args.conf, args.overrides)
    except ConfigError as exc:
        print(f"vlm4rec recommend: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    try:
        from deltalake.exceptions import DeltaError
        from pyarrow import ArrowException

        from udfs.recommender import RecommendError, Recommender, latest_pipeline_run
        from udfs.io.warehouse_reader import TableMissing
    except ModuleNotFoundError as exc:
        print(f"vlm4rec recommend: {exc.name} is not installed: pip install -e . (it needs the deltalake package)",
              file=sys.stderr)
        return EXIT_INSTALL
    warehouse = config.warehouse_uri()
    try:
        run_id = args.run_id
        if run_id is None:
            served = latest_pipeline_run(warehouse, args.dataset or config.dataset.name or None)
            run_id = served.run_id
            finished = f", finished {served.finished_at:%Y-%m-%d %H:%M:%S} UTC" if served.finished_at else ""
            print(f"vlm4rec recommend: serving run {run_id}, the latest completed pipeline run of dataset "
                  f"'{served.dataset}'{finished} (--run-id RUN serves another)", file=sys.stderr)
        recommender = Recommender.load(warehouse, run_id, args.representation, users=users,
                                       use_torch=args.torch_kernel)
        if args.dataset and recommender.dataset != args.dataset:
            raise RecommendError(f"run '{run_id}' is of dataset '{recommender.dataset}', not '{args.dataset}': "
                                 "pass a run of that dataset, or leave out --run-id to serve its latest")
        result = recommender.recommend(users=users or None, histories=args.history or None, k=args.k,
                                       explain=not args.no_explain, n_contributors=args.contributors)
    except (RecommendError, TableMissing) as exc:
        print(f"vlm4rec recommend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The errors the readers (pyarrow, delta-rs) raise for what is under the tables; any other keeps its traceback.
    except (OSError, ArrowException, DeltaError) as exc:
        if (failure := classify(exc, warehouse)) is None:
            raise
        print(f"vlm4rec recommend: {failure.line()}", file=sys.stderr)
        return EXIT_STORAGE
    records = result.records()
    lines = [json.dumps(record, sort_keys=True) for record in records] if args.format == "jsonl" else table_lines(records)
    if lines:
        print("\n".join(lines))
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
