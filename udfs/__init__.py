"""The logic of vlm4rec, importable without a Spark session: readers, splits, image handling,
caption engines, encoders, fusion, top-k kernels, metrics and significance tests."""
