"""A real cluster on 127.0.0.1 for the cluster tests: a Spark standalone master and one worker,
a two-node Ray cluster (a head without CPUs, so every task and actor runs on the worker node)
and moto's standalone S3 server. Each process is started here, remembered by its pid, and torn
down with its whole process tree by those pids (never by name: other test runs on the machine
run Spark and Ray too).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(what: str, check, timeout: float = 120.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polled until the deadline
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s (last error: {last})")


def http_json(url: str, timeout: float = 10.0, token: str | None = None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, deepest first."""
    import psutil

    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in reversed(children)] + [pid]


def terminate_trees(processes: list[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each process's tree (collected first, so that children reparented when their parent
    exits are still known), SIGKILL whatever is left after ``grace`` seconds, reap our children."""
    import psutil

    tree = [p for process in processes for p in process_tree(process.pid)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + grace
    alive = tree
    while alive and time.monotonic() < deadline:
        for process in processes:
            process.poll()
        time.sleep(0.3)
        alive = [p for p in alive if running(p)]
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LocalCluster:
    root: Path
    env: dict[str, str]
    spark_master: str = ""
    spark_ui: str = ""
    ray_address: str = ""
    ray_dashboard: str = ""
    s3_endpoint: str = ""
    bucket: str = "vlm4rec-cluster"
    processes: list[subprocess.Popen] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        process = subprocess.Popen([str(a) for a in argv], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                   env=env or self.env, cwd=self.root, start_new_session=True)
        self.processes.append(process)
        return process

    def ray_api(self, path: str):
        """A GET on the Ray dashboard's HTTP API, with the cluster's token (token auth covers it too)."""
        return http_json(f"{self.ray_dashboard}{path}", timeout=30, token=self.env["RAY_AUTH_TOKEN"])

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists())

    def stop(self) -> None:
        import shutil

        terminate_trees(self.processes)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def base_env(root: Path) -> dict[str, str]:
    """What every process of the cluster and every client gets: S3 credentials and endpoint of the
    local server, Ray's token, offline models. The Python that executors run is NOT here (no
    PYSPARK_PYTHON, the venv off PATH): delivering it is the job of spark.python."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYSPARK_", "RAY_", "SPARK_", "AWS_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    env.update({"AWS_ACCESS_KEY_ID": "cluster-test", "AWS_SECRET_ACCESS_KEY": "cluster-test-secret",
                "AWS_REGION": "us-east-1", "SPARK_LOCAL_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                "RAY_USAGE_STATS_ENABLED": "0",
                # Ray's OOM killer watches the whole machine's memory: on a shared CI machine other
                # processes' memory would get this cluster's caption workers killed.
                "RAY_memory_monitor_refresh_ms": "0", "SPARK_LOG_DIR": str(root / "spark-logs"),
                "SPARK_WORKER_DIR": str(root / "spark-work")})
    return env


def start_s3(cluster: LocalCluster) -> None:
    port = free_port()
    cluster.spawn("moto", [BIN / "moto_server", "-H", "127.0.0.1", "-p", port])
    cluster.s3_endpoint = f"http://127.0.0.1:{port}"
    cluster.env["AWS_ENDPOINT_URL"] = cluster.s3_endpoint
    wait_for("moto S3 server", lambda: urllib.request.urlopen(cluster.s3_endpoint, timeout=2), timeout=60)


def start_spark(cluster: LocalCluster, cores: int = 2, memory: str = "2g") -> None:
    import pyspark

    home = Path(pyspark.__file__).parent
    spark_class = home / "bin" / "spark-class"
    cluster.env["SPARK_HOME"] = str(home)
    port, ui, worker_ui = free_port(), free_port(), free_port()
    cluster.spawn("spark-master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                   "--port", port, "--webui-port", ui])
    cluster.spark_master = f"spark://127.0.0.1:{port}"
    cluster.spark_ui = f"http://127.0.0.1:{ui}"
    wait_for("Spark master", lambda: http_json(f"{cluster.spark_ui}/json/")["status"] == "ALIVE")
    cluster.spawn("spark-worker", [spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                   "--cores", cores, "--memory", memory, "--webui-port", worker_ui,
                                   cluster.spark_master])
    wait_for("Spark worker", lambda: [w for w in http_json(f"{cluster.spark_ui}/json/")["workers"]
                                      if w["state"] == "ALIVE"])


def start_ray(cluster: LocalCluster, worker_cpus: int = 2) -> None:
    port, dashboard = free_port(), free_port()
    temp = Path(f"/tmp/vlm4rec-ray-{os.getpid()}-{port}")  # Ray's socket paths must stay short
    cluster.temp_dirs.append(temp)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 1024 * 1024),
              "--disable-usage-stats"]
    cluster.spawn("ray-head", [BIN / "ray", "start", "--head", "--port", port, "--num-cpus", "0",
                               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                               "--dashboard-port", dashboard, "--ray-client-server-port", free_port(),
                               "--temp-dir", temp, *common, *agent_ports()])
    cluster.ray_address = f"127.0.0.1:{port}"
    cluster.ray_dashboard = f"http://127.0.0.1:{dashboard}"
    wait_for("Ray head", lambda: cluster.ray_api("/api/version"), timeout=120)
    add_ray_worker(cluster, "ray-worker", worker_cpus)


def agent_ports() -> list[str]:
    """Free ports for a node's agents: Ray's fixed defaults (52365 for the dashboard agent, whose
    HTTP server takes job submissions on the head) collide between the nodes of this cluster and
    with any other Ray on the machine, and the agent then runs without its HTTP server."""
    return [str(a) for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                "--metrics-export-port", "--runtime-env-agent-port") for a in (flag, free_port())]


def add_ray_worker(cluster: LocalCluster, name: str, cpus: int = 2) -> subprocess.Popen:
    """One more Ray worker node joined to the running head (``ray start --address --block``)."""
    before = len(alive_ray_nodes(cluster))
    process = cluster.spawn(name, [BIN / "ray", "start", "--address", cluster.ray_address, "--num-cpus", cpus,
                                   "--block", "--node-ip-address", "127.0.0.1", "--object-store-memory",
                                   str(100 * 1024 * 1024), "--disable-usage-stats", *agent_ports()])
    wait_for(f"Ray worker node {name}", lambda: len(alive_ray_nodes(cluster)) == before + 1, timeout=120)
    return process


def alive_ray_nodes(cluster: LocalCluster) -> list[dict]:
    """The cluster's live nodes, from Ray's state API (the dashboard's HTTP server)."""
    nodes = cluster.ray_api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


def ray_actors(cluster: LocalCluster) -> list[dict]:
    return cluster.ray_api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]


def caption_actors(cluster: LocalCluster) -> list[dict]:
    """The caption job's actors (Ray Data names them after the UDF class) in Ray's state API."""
    return [a for a in ray_actors(cluster) if "CaptionActor" in (a.get("class_name") or "")
            or "CaptionActor" in json.dumps(a.get("repr_name") or "")]


def ray_jobs(cluster: LocalCluster) -> list[dict]:
    """Jobs submitted with ``ray job submit``, from the dashboard's job API."""
    return cluster.ray_api("/api/jobs/")


def executor_jvms(worker: subprocess.Popen) -> list:
    """The executor JVMs (``CoarseGrainedExecutorBackend``) a Spark worker process has launched."""
    import psutil

    found = []
    for pid in process_tree(worker.pid):
        try:
            process = psutil.Process(pid)
            if "CoarseGrainedExecutorBackend" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def spark_events(events: Path, app_id: str) -> list[dict]:
    """The event log of one application (``spark.eventLog.dir`` uncompressed, not rolled)."""
    return [json.loads(line) for log in events.glob(f"*{app_id}*") if log.is_file() for line in open(log)]


def spark_apps(cluster: LocalCluster) -> list[dict]:
    """Every application the standalone master has seen, from its JSON API."""
    state = http_json(f"{cluster.spark_ui}/json/")
    return state["completedapps"] + state["activeapps"]


# Columns that a rerun of the same config reproduces (run ids, timings and timestamps differ).
SNAPSHOT_COLUMNS = {
    "items": ["dataset", "item_id", "title", "text", "image_uri", "image_sha256"],
    "interactions": ["dataset", "user_id", "item_id", "ts", "rating", "split"],
    "descriptions": ["image_sha256", "engine", "model", "prompt_id", "item_id", "text", "status"],
    "item_embeddings": ["dataset", "item_id", "representation", "encoder", "dim", "vector"],
}


def snapshot_tables(warehouses: list[str]) -> dict[str, dict[str, list]]:
    """warehouse -> table -> sorted rows of ``SNAPSHOT_COLUMNS`` (floats rounded to 5 places), read
    by one local Spark session (run in a subprocess: it needs the S3 connector on its class path)."""
    from jobs import tables
    from jobs.config import load_config
    from jobs.spark_session import build_spark

    config = load_config(None, ["spark.master=local[1]", "spark.driver_memory=1g", "log_level=WARNING",
                                f"warehouse={warehouses[0]}"])
    spark = build_spark(config, app_name="vlm4rec-cluster-snapshot")

    def plain(value):
        if isinstance(value, float):
            return round(value, 5)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    out = {}
    for warehouse in warehouses:
        out[warehouse] = {}
        for name, columns in SNAPSHOT_COLUMNS.items():
            rows = tables.read(spark, warehouse, name).select(*columns).collect()
            out[warehouse][name] = sorted(([plain(v) for v in row] for row in rows), key=json.dumps)
    spark.stop()
    return out


if __name__ == "__main__":  # python -m tests.local_cluster WAREHOUSE... -> JSON snapshot on stdout
    print(json.dumps(snapshot_tables(sys.argv[1:])))
