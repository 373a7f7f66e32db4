"""The table contract written twice must say the same thing twice."""
from __future__ import annotations

from pyspark.sql.pandas.types import from_arrow_schema

from jobs import tables
from jobs.adapters.base import REJECT_SCHEMA
from udfs.caption_udfs import STAGING_SCHEMA


def test_caption_staging_files_have_the_descriptions_table_schema():
    # The Ray workers write Arrow without Spark; the merge reads those files as the table's rows.
    assert from_arrow_schema(STAGING_SCHEMA) == tables.SCHEMAS["descriptions"]


def test_adapters_emit_the_rejects_table_without_its_dataset_column():
    table = tables.SCHEMAS["rejects"]
    assert ["dataset", *REJECT_SCHEMA.names] == table.names
    assert all(table[f.name] == f for f in REJECT_SCHEMA.fields)
