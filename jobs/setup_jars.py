"""``setup``: resolve the Delta Lake connector JARs once from Maven Central into a local folder
(``~/.cache/vlm4rec/jars``, or ``$VLM4REC_JARS``, or ``spark.jars_dir``), so that every later
job starts offline.

``--with s3`` also fetches the S3A connector (``hadoop-aws`` of the Hadoop version PySpark ships,
and the AWS SDK bundle it needs, about 560 MB) into ``<jars>/s3``, for a warehouse or images
on ``s3a://``. Sessions put those JARs on the class path of the driver and of the executors at
the same path, so on a cluster they must be at that path on every node (or given to
``spark-submit --packages org.apache.hadoop:hadoop-aws:<version>``)."""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import sys

from .config import ConfigError, load_config
from .job_run import EXIT_CONFIG, EXIT_INSTALL, base_parser, setup_logging
from .spark_session import (DELTA_PACKAGES, jars_dir, resolve_connector, resolve_s3_connector, resolved_jars,
                            s3_jars_dir, s3_packages)

def main(argv: list[str] | None = None) -> int:
    parser = base_parser("setup", __doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="resolve again even if the JARs are present")
    parser.add_argument("--print-jars", action="store_true",
                        help="print the resolved JARs comma-separated, for `spark-submit --jars` (the "
                             "JVM that spark-submit starts needs them on its classpath from the start)")
    parser.add_argument("--with", dest="extras", action="append", default=[], choices=("s3",),
                        help="also fetch a storage connector: s3 (hadoop-aws + the AWS SDK, for s3a:// URIs)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.conf, args.overrides)
    except ConfigError as exc:
        print(f"vlm4rec setup: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(config.log_level)
    jars = resolved_jars(config.spark)
    if args.print_jars:
        if not jars:
            print("vlm4rec setup: no Delta JARs resolved yet: run `vlm4rec setup` first", file=sys.stderr)
            return EXIT_INSTALL
        print(",".join(str(j) for j in jars))
        return 0
    if jars and not args.force:
        print(f"setup: Delta connector already in {jars_dir(config.spark)} ({len(jars)} JARs)")
    else:
        try:
            jars = resolve_connector(config.spark)
        except Exception as exc:  # noqa: BLE001 - report any resolution failure with the fix
            print(f"vlm4rec setup: could not resolve {DELTA_PACKAGES} from Maven Central: {exc}\n"
                  "Check that Maven Central is reachable (proxy settings) or copy the JARs into "
                  f"{jars_dir(config.spark)} by hand.", file=sys.stderr)
            return EXIT_INSTALL
        print(f"setup: resolved {len(jars)} JARs into {jars_dir(config.spark)}: " + ", ".join(j.name for j in jars))
    if "s3" in args.extras:
        target = s3_jars_dir(config.spark)
        present = sorted(target.glob("org.apache.hadoop_hadoop-aws-*.jar")) if target.is_dir() else []
        if present and not args.force:
            print(f"setup: S3 connector already in {target} ({present[0].name})")
            return 0
        try:
            s3 = resolve_s3_connector(config.spark)
        except Exception as exc:  # noqa: BLE001 - report any resolution failure with the fix
            print(f"vlm4rec setup: could not resolve {s3_packages()} from Maven Central: {exc}\n"
                  f"Check that Maven Central is reachable or copy the JARs into {target} by hand.", file=sys.stderr)
            return EXIT_INSTALL
        print(f"setup: resolved {len(s3)} S3 connector JARs into {target}: " + ", ".join(j.name for j in s3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
