"""The thin wrappers Spark ships to its executors: mapInPandas/mapInArrow functions and
Spark-expression builders over the pure logic in ``udfs``.

Only this subpackage of ``udfs`` imports pyspark (``tests/test_layers.py`` checks it), so
everything else in ``udfs`` is testable without a session.
"""
