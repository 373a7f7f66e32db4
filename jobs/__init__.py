"""Orchestration: one module per job, each with ``main(argv)``; the logic lives in ``udfs``."""
