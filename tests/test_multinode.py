"""Many nodes on one machine: Ray's own `Cluster` with a head (no CPUs: the driver's node) and two worker nodes.

Each worker node has 4 CPUs, room for both replicas: Ray's default placement packs two 1-CPU actors onto one such
node, so replicas on both nodes show the pool's SPREAD strategy at work, and after a node is removed Ray has room
to restart the lost replica on the survivor (which must not copy the model again).

Each worker node has its own model cache (`CNA_DIST_CACHE`) and reaches the S3 server through its own counting
proxy (`AWS_ENDPOINT_URL_S3`), both set in the node's environment, which its worker processes inherit; so the test
sees which node a replica ran on and how many times each node downloaded the weights. The model is on S3, the store
too (its own endpoint, past the proxies), as on a cluster whose nodes share no disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from cna_dist import manifest as manifestmod
from cna_dist.commands.demo import write_inputs
from cna_dist.commands.mine import MineResult, mine
from cna_dist.runtime.executor import RayExecutor
from cna_dist.runtime.replica import ShardResult
from cna_dist.store import uri as urimod
from cna_dist.store.activations import ActivationStore
from tests.conftest import free_port
from tests.s3proxy import ForwardingHandler, ProxyState

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WORKERS = ("w0", "w1")
WEIGHTS = ".safetensors"


class CountingHandler(ForwardingHandler):
    """Forwards to moto and records each request's method and path."""

    seen: list[tuple[str, str]]

    def _forward(self) -> None:
        with self.state.lock:
            self.seen.append((self.command, self.path))
        super()._forward()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@dataclass
class Proxy:
    endpoint: str
    seen: list[tuple[str, str]]
    server: ThreadingHTTPServer
    thread: threading.Thread

    def weight_downloads(self) -> int:
        return sum(1 for method, path in self.seen if method == "GET" and path.split("?")[0].endswith(WEIGHTS))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def start_proxy(s3_server: str) -> Proxy:
    host, port = s3_server.removeprefix("http://").split(":")
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (CountingHandler,), {"state": ProxyState(upstream=(host, int(port))), "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return Proxy(f"http://127.0.0.1:{server.server_address[1]}", seen, server, thread)


@dataclass
class Nodes:
    """The cluster, its worker nodes by name, each node's cache folder and S3 proxy."""

    cluster: Any  # ray.cluster_utils.Cluster
    workers: dict[str, Any]  # ray._private.node.Node
    caches: dict[str, Path]  # head, w0, w1 and the driver (this process)
    proxies: dict[str, Proxy]
    tag: str  # in every node's environment: finds the cluster's processes at teardown
    removed: list[str] = field(default_factory=list)

    def node_of(self, replica: str) -> str:
        """The node a replica ("host:pid") runs on, from its process's environment; "removed" when the process is
        gone (only a removed node's processes die here: a call it finished before the node went is read later)."""
        try:
            cache = psutil.Process(int(replica.rsplit(":", 1)[1])).environ()["CNA_DIST_CACHE"]
        except psutil.NoSuchProcess:
            return "removed"
        return next(name for name, folder in self.caches.items() if str(folder) == cache)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process started by the cluster's raylets (their environment carries the tag)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("CNA_TEST_CLUSTER") == tag:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def node_processes(node: Any) -> list[psutil.Process]:
    out = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                out.append(psutil.Process(info.process.pid))
            except psutil.NoSuchProcess:
                continue
    return out


def end_cluster(nodes: Nodes) -> list[str]:
    """Shut the cluster down; returns what outlived it (then killed), which the fixture reports."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster: Any = nodes.cluster
    procs = tagged_processes(nodes.tag)
    if cluster is not None:
        procs += [p for n in cluster.list_all_nodes() for p in node_processes(n)]
        cluster.shutdown()
    _, alive = psutil.wait_procs(procs, timeout=20)
    alive += [p for p in tagged_processes(nodes.tag) if p not in alive]
    left = []
    for p in alive:
        try:
            left.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
    return left


@pytest.fixture(scope="module")
def nodes(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # left connected by an earlier test: the executors would use that Ray, not this cluster
        ray.shutdown()

    root = tmp_path_factory.mktemp("nodes")
    tag = uuid.uuid4().hex
    caches = {name: root / f"cache-{name}" for name in ("driver", "head", *WORKERS)}
    proxies = {name: start_proxy(s3_server) for name in WORKERS}
    ray_tmp = tempfile.mkdtemp(prefix="raymn", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    left: list[str] = []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CNA_DIST_CACHE", str(caches["driver"]))  # the driver's own cache (tokenizer files only)
        # Ray's session files and its "current cluster" address file, which a bare ray.init() on this machine
        # would connect to: kept apart from any other Ray here.
        env.setenv("RAY_TMPDIR", ray_tmp)
        env.delenv("RAY_ADDRESS", raising=False)
        made = Nodes(None, {}, caches, proxies, tag)
        try:
            made.cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0,  # replicas and reduce tasks run on the worker nodes only
                    "include_dashboard": False,
                    "env_vars": {"CNA_DIST_CACHE": str(caches["head"]), "CNA_TEST_CLUSTER": tag},
                },
            )
            for name in WORKERS:
                node_env = {"CNA_DIST_CACHE": str(caches[name]), "AWS_ENDPOINT_URL_S3": proxies[name].endpoint}
                made.workers[name] = made.cluster.add_node(num_cpus=4, env_vars={**node_env, "CNA_TEST_CLUSTER": tag})
            made.cluster.wait_for_nodes()
            assert tagged_processes(tag), "the nodes' processes do not carry the tag: teardown would check nothing"
            yield made
        finally:
            left = end_cluster(made)
            for proxy in proxies.values():
                proxy.close()
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the cluster outlived it: {left}"


@pytest.fixture(scope="module")
def model_uri(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The planted demo model on S3."""
    out = tmp_path_factory.mktemp("inputs")
    write_inputs(out)
    uri = f"s3://cna/{uuid.uuid4().hex}/model"
    fs, path = urimod.filesystem(uri)
    fs.put(str(out / "model"), path, recursive=True)
    return uri


def s3_manifest(out: Path, model: str, s3_server: str) -> manifestmod.Manifest:
    """The demo job with its model and store on S3, 18 shards of 4 prompts, float32 rows."""
    path, _ = write_inputs(out)
    data = yaml.safe_load(path.read_text())
    data["model"]["uri"] = model
    data["capture"] = {"dtype": "float32", "shard_rows": 4}
    data["output"] = {
        "store": f"s3://cna/{uuid.uuid4().hex}/store",
        "registry": str(out / "circuits"),
        "storage_options": {"endpoint_url": s3_server},  # the store's own endpoint, past the nodes' proxies
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifestmod.load(path)


def committed_rows(m: manifestmod.Manifest) -> list[str]:
    """The row hashes of every committed shard, in shard order, repeats kept."""
    store = ActivationStore(m.output.store, m.output.storage_options)
    (run_name,) = store.runs()
    run = store.open_run(store.load_meta(run_name), create=False)
    return [h for _, hashes in sorted(run.committed().items()) for h in hashes]


@dataclass
class Mined:
    manifest: manifestmod.Manifest
    result: MineResult
    shards_by_node: dict[str, int]


def mine_on(nodes: Nodes, m: manifestmod.Manifest, on_first_shard: Callable[[str], None] | None = None) -> Mined:
    """`mine` on the cluster with two replicas; counts each node's committed shards as they come back."""
    by_node: dict[str, int] = {}

    def seen(result: ShardResult) -> None:
        node = nodes.node_of(result.replica)
        by_node[node] = by_node.get(node, 0) + 1
        if on_first_shard is not None and sum(by_node.values()) == 1:
            on_first_shard(node)

    with RayExecutor(nodes.cluster.address, replicas=2, max_in_flight=4, backoff_s=0.1) as executor:
        executor.on_shard = seen
        result = mine(m, executor, progress=False)
    return Mined(m, result, by_node)


@pytest.fixture(scope="module")
def reference(nodes: Nodes, model_uri: str, s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Mined:
    """A fault-free run on both nodes: the circuit the run that loses a node must give."""
    return mine_on(nodes, s3_manifest(tmp_path_factory.mktemp("reference"), model_uri, s3_server))


def cached_models(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "models").glob("*") if p.is_dir()) if (cache / "models").exists() else []


def assert_each_node_copied_once(nodes: Nodes, model_uri: str) -> None:
    """Each worker node downloaded the weights once (its proxy's count) and holds one complete copy; the head and
    the driver hold none."""
    fs, path = urimod.filesystem(model_uri)
    weights = {Path(p).name: fs.cat_file(p) for p in fs.ls(path, detail=False) if p.endswith(WEIGHTS)}
    assert weights
    for name in WORKERS:
        assert nodes.proxies[name].weight_downloads() == len(weights), name
        (copy,) = cached_models(nodes.caches[name])
        assert (copy / ".complete").exists() and not list(copy.parent.glob("*.partial"))
        assert {n: (copy / n).read_bytes() for n in weights} == weights
    assert cached_models(nodes.caches["head"]) == [] and cached_models(nodes.caches["driver"]) == []
    assert not any(p.name.endswith(WEIGHTS) for p in nodes.caches["driver"].rglob("*"))


def test_replicas_on_both_nodes_each_node_copies_the_model_once(nodes: Nodes, reference: Mined, model_uri: str) -> None:
    s = reference.result.summary
    assert s.shards_captured == 18 and s.capture.replica_deaths == 0
    assert set(reference.shards_by_node) == set(WORKERS)  # one replica per node (SPREAD), both working
    assert sum(reference.shards_by_node.values()) == 18
    rows = committed_rows(reference.manifest)
    assert len(rows) == len(set(rows)) == s.prompts_captured == 72
    assert_each_node_copied_once(nodes, model_uri)


def test_a_node_removed_mid_capture_gives_the_fault_free_circuit(
    nodes: Nodes, reference: Mined, model_uri: str, s3_server: str, tmp_path: Path
) -> None:
    def remove(node: str) -> None:
        # The driver loop waits here: the victim's replica still has calls in flight when its node goes.
        nodes.removed.append(node)
        nodes.cluster.remove_node(nodes.workers.pop(node))

    faulty = mine_on(nodes, s3_manifest(tmp_path / "faulty", model_uri, s3_server), on_first_shard=remove)
    s = faulty.result.summary
    (victim,) = nodes.removed
    (survivor,) = set(WORKERS) - {victim}
    assert s.capture.replica_deaths >= 1 and s.capture.retries >= 1
    lost = faulty.shards_by_node.pop(victim) + faulty.shards_by_node.pop("removed", 0)
    assert 1 <= lost < 18 and faulty.shards_by_node == {survivor: 18 - lost}  # the rest all on the survivor
    assert s.shards_captured == 18
    rows = committed_rows(faulty.manifest)
    assert len(rows) == len(set(rows)) and set(rows) == set(committed_rows(reference.manifest))
    a, b = faulty.result.circuit, reference.result.circuit
    assert a.pairs() == b.pairs() and a.universal == b.universal
    for x, y in zip(a.neurons, b.neurons, strict=True):
        assert abs(x.delta - y.delta) <= 1e-9
    assert_each_node_copied_once(nodes, model_uri)  # the second run's replicas, and any restarted, used the caches


def announced(fn: Callable[..., Any], folder: str) -> Callable[..., Any]:
    """A reduce task that first says on which node it runs (a file named after its process) and then lingers a
    second, so the test can remove that node while the task is running on it."""

    def task(*args: Any) -> Any:
        import time

        Path(folder, uuid.uuid4().hex).write_text(os.environ["CNA_DIST_CACHE"])  # one file per attempt
        time.sleep(1.0)
        return fn(*args)

    return task


class NodeLosingExecutor(RayExecutor):
    """Removes the node that runs the first reduce task, once, while that task runs (Ray then retries the lost
    tasks on the node left)."""

    def __init__(self, nodes: Nodes, folder: Path, **kwargs: Any):
        super().__init__(nodes.cluster.address, **kwargs)
        self.nodes, self.folder = nodes, folder
        self.lost: str | None = None
        self.tasks = 0  # in the map that lost the node

    def map(self, fn: Callable[..., Any], args: Any) -> Any:
        if self.lost is not None:
            return super().map(fn, args)
        self.tasks = len(args)
        results = super().map(announced(fn, str(self.folder)), args)  # every task submitted by now
        for _ in range(6000):
            started = sorted(self.folder.iterdir())
            if started:
                break
            threading.Event().wait(0.01)
        cache = started[0].read_text()
        self.lost = next(name for name, folder in self.nodes.caches.items() if str(folder) == cache)
        self.nodes.removed.append(self.lost)
        self.nodes.cluster.remove_node(self.nodes.workers.pop(self.lost))
        return results


def test_a_node_removed_during_the_reduce_gives_the_same_circuit(
    nodes: Nodes, reference: Mined, s3_server: str, tmp_path: Path
) -> None:
    """The reference run's store (every shard committed: nothing to capture) reduced again on two nodes, one of
    which goes while a reduce task runs on it, into a fresh registry: the circuit of the reduce that lost nothing."""
    while len(nodes.workers) < 2:  # a node removed by an earlier test: add one with its own cache
        name = f"w{len(nodes.caches)}"
        nodes.caches[name] = tmp_path / f"cache-{name}"
        env = {"CNA_DIST_CACHE": str(nodes.caches[name]), "AWS_ENDPOINT_URL_S3": s3_server}
        env["CNA_TEST_CLUSTER"] = nodes.tag
        nodes.workers[name] = nodes.cluster.add_node(num_cpus=4, env_vars=env)
    nodes.cluster.wait_for_nodes()
    m = reference.manifest
    again = m.model_copy(update={"output": m.output.model_copy(update={"registry": str(tmp_path / "circuits")})})
    (tmp_path / "started").mkdir()
    with NodeLosingExecutor(nodes, tmp_path / "started", replicas=2, backoff_s=0.1) as executor:
        result = mine(again, executor, progress=False)
    assert executor.lost is not None and executor.lost not in nodes.workers
    s = result.summary
    assert s.shards_captured == 0 and s.shards_reused == 18 and result.published.version == 1
    a, b = result.circuit, reference.result.circuit
    assert a.pairs() == b.pairs() and a.universal == b.universal
    for x, y in zip(a.neurons, b.neurons, strict=True):
        assert abs(x.delta - y.delta) <= 1e-9
    attempts = len(list((tmp_path / "started").iterdir()))  # one file per attempt: a retried task leaves two
    assert attempts > executor.tasks >= 1, "no reduce task ran again after its node was removed"
