"""The caption job's Ray Data stages: the engine actor pool (or Ray's vLLM processor) between
the image loading and the staged files' writing (``jobs.caption``, ``udfs.caption.caption_udfs``)."""
from __future__ import annotations

import logging
from typing import Any

from udfs.caption import caption_udfs as cu
from udfs.io.images import ReadLimits

from .caption_plan import CaptionSpec

log = logging.getLogger(__name__)

# Said once per run, just before Ray's own error-level line, which reads as a failure and is
# not one. Its cause is inside Ray Data, not in our arguments (they are a few small settings):
# every actor of a ``map_batches`` pool gets Ray Data's own DataContext and the batch function
# as object references (``ray.put`` whatever their size; ray-project/ray#57733), and the pool
# keeps restarts on. Turning the restarts off is the only way to silence it, and we keep them.
RAY_ACTOR_ARGS_NOTE = (
    "Ray logs an error-level line 'Actor with class name: MapWorker(MapBatches(CaptionActor)) ... has "
    "constructor arguments in the object store and max_restarts > 0' for each engine actor: it is not a "
    "failure. Ray Data passes every pool actor its own context and batch function through the object "
    "store, and Ray warns that a restart needs them there; they stay there while this job runs "
    "(ray-project/ray#57733)")


def describe_with_ray(ray: Any, todo: Any, spec: CaptionSpec, folder: str,
                      limits: ReadLimits | None = None) -> list[dict[str, Any]]:
    """Run the Ray Data pipeline over ``todo``; returns one summary row per staged file.
    ``limits``: how image files are read (``dataset.images``)."""
    import ray.data

    kind, conf = spec.kind, spec.conf
    per_block = conf.rows_per_file
    cluster = ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    # Only a GPU actor gets loading tasks of its own, so that decoding overlaps its model.
    # A CPU actor reads its own files (a millisecond an image against tens for the model)
    # and writes its own staged files: the loading and writing tasks would take those very
    # cores from its torch threads (docs/BENCHMARKS.md, "Eleventh session": the slowest
    # twentieth of its batches went from 69 to 35 ms an image).
    own_io = kind.reads_own_files(spec.engine_options, gpus)
    if own_io:
        # Such an actor takes a whole block per call: blocks small enough that every actor
        # gets two, so none idles while another works through the rest.
        per_block = max(1, min(conf.rows_per_file, -(-todo.num_rows // (2 * conf.num_workers))))
    ds = ray.data.from_arrow([todo.slice(start, per_block) for start in range(0, todo.num_rows, per_block)])
    write_kwargs = dict(staging_dir=str(folder), engine=spec.engine, model=spec.model,
                        prompt_id=spec.prompt_id, prompt=spec.prompt)
    write = dict(fn_kwargs=write_kwargs, batch_size=conf.rows_per_file, batch_format="pandas", num_cpus=0.25)
    if kind.runs_own_pipeline:
        ds = describe_with_vllm(ds, spec, limits).map_batches(cu.write_staging, **write)
    else:
        actor = kind.actor_resources(spec.engine_options, conf.num_workers, conf.actor_num_cpus, conf.torch_threads,
                                     cpus, gpus)
        log.info("caption engine %s: %d actor(s), %.2f CPU + %.0f GPU each, %d torch thread(s)",
                 spec.engine, conf.num_workers, actor.num_cpus, actor.num_gpus, actor.torch_threads)
        log.info(RAY_ACTOR_ARGS_NOTE)
        load = {"max_side": kind.max_side, "limits": limits}
        if not own_io:
            ds = ds.map_batches(cu.load_images, fn_kwargs=load, batch_size=conf.batch_size, batch_format="pandas",
                                num_cpus=conf.load_num_cpus,
                                compute=ray.data.TaskPoolStrategy(size=max(1, int(cpus))))
        ds = ds.map_batches(
            cu.CaptionActor,
            fn_constructor_kwargs=dict(engine=spec.engine, model=spec.model, prompt=spec.prompt,
                                       batch_size=conf.batch_size, max_new_tokens=conf.max_new_tokens,
                                       options=spec.engine_options,
                                       torch_threads=conf.torch_threads if actor.torch_threads else 0,
                                       max_torch_threads=actor.torch_threads, expected_prompt_id=spec.prompt_id,
                                       load=load if own_io else None,
                                       staging=write_kwargs if own_io else None),
            compute=kind.actor_pool(ray, conf.num_workers),
            # A whole block per call for an actor doing its own I/O: openai streams it
            # (CaptionActor._send_as_read), the others describe it an engine batch at a time
            # (CaptionActor._describe_by_engine_batch).
            batch_size=None if own_io else conf.batch_size,
            batch_format="pandas", num_cpus=actor.num_cpus, num_gpus=actor.num_gpus)
        if not own_io:
            ds = ds.map_batches(cu.write_staging, **write)
    return ds.take_all()


def describe_with_vllm(ds: Any, spec: CaptionSpec, limits: ReadLimits | None = None) -> Any:
    """The ``vllm`` branch: Ray's vLLM processor replaces the actor pool (needs GPUs and vLLM;
    not exercised on CPU-only machines). Images that fail to load bypass the engine."""
    from udfs.caption.vllm_engine import build_vllm_processor

    caption = build_vllm_processor(
        model=spec.model, prompt=spec.prompt, batch_size=spec.conf.batch_size,
        max_new_tokens=spec.conf.max_new_tokens, concurrency=spec.conf.num_workers, image_column="image_bytes",
        keep_columns=("image_sha256", "item_id", "image_uri"),
        accelerator_type=spec.conf.accelerator_type, options=spec.engine_options)
    loaded = ds.map_batches(cu.load_image_bytes, fn_kwargs={"limits": limits}, batch_format="pandas",
                            batch_size=spec.conf.batch_size).materialize()
    failed = loaded.filter(expr="error IS NOT NULL").map_batches(cu.failed_rows, batch_format="pandas")
    described = caption(loaded.filter(expr="error IS NULL")).map_batches(cu.vllm_rows, batch_format="pandas")
    return described.union(failed)
