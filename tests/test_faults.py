"""Issue C's must-shows on real Ray: a killed replica, a killed driver, and `ray job submit` with token auth.

The head is started with `ray start --head` on 127.0.0.1 in its own process session, so teardown can end
every process it spawned (and only those).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from cna_dist import manifest as manifestmod
from cna_dist.circuit import file as circuitmod
from cna_dist.commands.demo import write_inputs
from cna_dist.commands.mine import mine
from cna_dist.runtime.calls import capture_shards
from cna_dist.runtime.executor import RayExecutor
from cna_dist.runtime.replica import ReplicaSpec
from cna_dist.store.activations import ActivationStore
from tests.conftest import start_local_ray, stop_local_ray

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_manifest(out: Path, *, shard_rows: int = 4, max_batch_size: int = 64, engine: str = "auto") -> Path:
    manifest, _ = write_inputs(out)
    text = manifest.read_text().replace(
        "capture:\n  dtype: float32",
        f"capture:\n  dtype: float32\n  shard_rows: {shard_rows}\n  max_batch_size: {max_batch_size}",
    )
    extra = {"pipeline": "  engine: pipeline\n  stages: [[0, 3], [3, 5], [5, 8]]\n", "stream": "  engine: stream\n"}
    if engine in extra:  # into the model section (the first `dtype:`): stages of the planted model's 8 layers
        text = text.replace("  dtype: float32\n", "  dtype: float32\n" + extra[engine], 1)
    manifest.write_text(text)
    return manifest


def assert_same_circuit(a: circuitmod.Circuit, b: circuitmod.Circuit) -> None:
    assert a.pairs() == b.pairs()
    for x, y in zip(a.neurons, b.neurons, strict=True):
        assert abs(x.delta - y.delta) <= 1e-9


def assert_each_row_once(manifest: Path) -> None:
    """Every prompt of the run is in exactly one committed shard, and nothing else is."""
    m = manifestmod.load(manifest)
    store = ActivationStore(m.output.store)
    (run_name,) = store.runs()
    run = store.open_run(store.load_meta(run_name), create=False)
    rows = [h for hashes in run.committed().values() for h in hashes]
    assert len(rows) == len(set(rows)) == 72  # 24 positive + 24 negative + 24 diverse, all distinct


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} survived SIGKILL")


@pytest.fixture(scope="class")
def fault_free(_local_ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> circuitmod.Circuit:
    """The demo's circuit mined on two Ray replicas with no fault: what every engine's faulty run must give."""
    start_local_ray()
    # The reference runs on Ray replicas too: they use one BLAS thread, and float32 sums depend on that.
    manifest = manifestmod.load(demo_manifest(tmp_path_factory.mktemp("reference")))
    with RayExecutor(replicas=2, max_in_flight=4, backoff_s=0.1, num_cpus=2) as executor:
        return mine(manifest, executor, progress=False).circuit


@pytest.mark.usefixtures("local_ray")
class TestOnOneLocalRay:
    """Faults inside one run, on a local Ray shared by these tests (none of them kills a node)."""

    @pytest.mark.parametrize("engine", ["auto", "pipeline", "stream"])
    def test_killed_replica_mid_capture_gives_the_fault_free_circuit(
        self, tmp_path: Path, engine: str, fault_free: circuitmod.Circuit
    ) -> None:
        manifest = demo_manifest(tmp_path / "faulty", engine=engine)
        killed: list[int] = []

        def kill_first_writer(result: dict) -> None:
            # The driver loop waits here, so the victim still has queued shards when it dies.
            if not killed:
                killed.append(int(result.replica.rsplit(":", 1)[1]))
                kill_and_wait(killed[0])

        with RayExecutor(replicas=2, max_in_flight=4, backoff_s=0.1, num_cpus=2) as executor:
            executor.on_shard = kill_first_writer
            result = mine(manifestmod.load(manifest), executor, progress=False)
        s = result.summary
        assert killed and s.capture.retries >= 1 and s.capture.replica_deaths >= 1
        assert len(s.capture.replicas) >= 2  # the victim committed one shard before it died; the others did the rest
        assert sum(s.capture.replicas.values()) == s.shards_captured == 18
        assert_same_circuit(result.circuit, fault_free)
        assert_each_row_once(manifest)
        store = ActivationStore(manifestmod.load(manifest).output.store)
        markers = store.open_run(store.load_meta(store.runs()[0]), create=False).markers().values()
        assert {m["made_by"]["engine"] for m in markers} == {"single" if engine == "auto" else engine}

    def test_a_shard_that_keeps_failing_is_reported_by_name(self, tmp_path: Path) -> None:
        from cna_dist.errors import RunFailure
        from cna_dist.store.activations import RunMeta

        m = manifestmod.load(demo_manifest(tmp_path / "bad"))
        meta = RunMeta(
            fingerprint="f" * 64,
            model_uri=m.model.uri,
            n_layers=8,
            intermediate_size=256,
            dtype="float32",
            model_dtype="float32",
            chat_template=True,
            shard_rows=4,
        )
        run = ActivationStore(m.output.store).open_run(meta)
        plans = run.plan(["a" * 64, "b" * 64])
        token_ids = {"a" * 64: [10**6], "b" * 64: [1, 2]}  # an id beyond the vocabulary fails inside the replica
        with RayExecutor(replicas=1, backoff_s=0.05, num_cpus=2) as executor:
            with pytest.raises(RunFailure, match=r"shard 0 failed after 3 retries: RayTaskError.*IndexError"):
                capture_shards(executor, ReplicaSpec.from_manifest(m), run, plans, token_ids, progress=False)
        assert not run.committed()


# -- a real head: `ray start --head` with token authentication ------------------------------------------------


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def end_session(sid: int) -> None:
    procs = session_processes(sid)
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """`ray start --head` on 127.0.0.1 with RAY_AUTH_MODE=token; yields the env a client needs."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the `ray` CLI is not installed beside this Python")
    stop_local_ray()  # one Ray per test process
    token = secrets.token_hex(16)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dash = free_port(), free_port()
    # The agents' ports too: their defaults (52365 for the job agent) are taken by any other Ray on this machine,
    # and a head whose job agent cannot bind refuses every `ray job submit` ("No available agent").
    agents = [
        (flag, str(free_port()))
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        )
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    starter = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash),
            "--num-cpus",
            "3",
            "--temp-dir",
            temp,
            "--disable-usage-stats",
            *[part for pair in agents for part in pair],
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sid = starter.pid
    try:
        out, _ = starter.communicate(timeout=120)
        if starter.returncode != 0:
            raise AssertionError(f"ray start failed:\n{out}")
        yield {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}", "GCS_ADDRESS": f"127.0.0.1:{port}"}
    finally:
        end_session(sid)
        shutil.rmtree(temp, ignore_errors=True)
    assert not session_processes(sid), "processes of the Ray head outlived the test"


def submit(env: dict[str, str], manifest: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is still starting (a loaded machine takes a while)."""
    for _ in range(24):
        done = _submit_once(env, manifest, *extra, timeout=timeout)
        if "No available agent to submit job" not in done.stderr + done.stdout:
            return done
        time.sleep(5)
    return done


def _submit_once(env: dict[str, str], manifest: Path, *extra: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            env["RAY_ADDRESS"],
            "--working-dir",
            str(ROOT),
            "--",
            sys.executable,
            "jobs/mine_circuit.py",
            str(manifest),
            "--quiet",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def mine_command(env: dict[str, str], manifest: Path, *extra: str) -> list[str]:
    """`cna-dist mine` against the test head with one replica."""
    return [
        str(BIN / "cna-dist"),
        "mine",
        str(manifest),
        "--quiet",
        "--replicas",
        "1",
        "--address",
        env["GCS_ADDRESS"],
        *extra,
    ]


def mine_on_head(env: dict[str, str], manifest: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(mine_command(env, manifest, *extra), env=env, capture_output=True, text=True, timeout=300)


def reference_circuit(env: dict[str, str], out: Path, max_batch_size: int = 64) -> circuitmod.Circuit:
    """The fault-free circuit from the same head, replicas and batching (float32 sums depend on all three)."""
    done = mine_on_head(env, demo_manifest(out, max_batch_size=max_batch_size))
    assert done.returncode == 0, done.stdout + done.stderr
    return circuitmod.load(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def head_reference(
    ray_head: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], circuitmod.Circuit]:
    """reference_circuit on the head, mined once per max_batch_size for all the tests that compare with it."""
    made: dict[int, circuitmod.Circuit] = {}

    def get(max_batch_size: int) -> circuitmod.Circuit:
        if max_batch_size not in made:
            made[max_batch_size] = reference_circuit(ray_head, tmp_path_factory.mktemp("reference"), max_batch_size)
        return made[max_batch_size]

    return get


def test_job_submit_publishes_the_circuit_and_a_wrong_token_is_refused(
    ray_head: dict[str, str], head_reference: Callable[[int], circuitmod.Circuit], tmp_path: Path
) -> None:
    manifest = demo_manifest(tmp_path / "job")
    refused = submit({**ray_head, "RAY_AUTH_TOKEN": "not-the-token"}, manifest, timeout=120)
    assert refused.returncode != 0
    assert not (tmp_path / "job" / "store").exists()  # the job never ran
    done = submit(ray_head, manifest)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    uri = next(ln.strip() for ln in reversed(lines) if ln.strip().endswith(".json"))
    assert uri.endswith("/circuits/refusal-demo/model/v1.json")
    circuit = circuitmod.load(uri)
    assert_same_circuit(circuit, head_reference(64))


def test_killed_driver_then_rerun_reuses_committed_shards(
    ray_head: dict[str, str], head_reference: Callable[[int], circuitmod.Circuit], tmp_path: Path
) -> None:
    # One prompt per forward pass and one replica, so capture runs long enough to be interrupted.
    manifest = demo_manifest(tmp_path / "driver", max_batch_size=1)
    commits = tmp_path / "driver" / "store"
    driver = subprocess.Popen(
        mine_command(ray_head, manifest),
        env=ray_head,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:
            if len(list(commits.rglob("commits/*.json"))) >= 2:
                break
            time.sleep(0.01)
        assert driver.poll() is None, "the driver finished before it could be killed"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    committed = len(list(commits.rglob("commits/*.json")))
    assert 2 <= committed < 18
    summary = tmp_path / "summary.json"
    rerun = mine_on_head(ray_head, manifest, "--summary", str(summary))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    s = json.loads(summary.read_text())
    assert s["shards_reused"] >= committed and s["shards_reused"] + s["shards_captured"] == 18
    assert_same_circuit(circuitmod.load(rerun.stdout.strip().splitlines()[-1]), head_reference(1))
    assert_each_row_once(manifest)


def job_driver(manifest: Path) -> psutil.Process | None:
    """The job's entrypoint process on the head: `python jobs/mine_circuit.py MANIFEST` (not its shell, not the
    `ray job submit` client, whose command line holds the same words further on)."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) > 2 and cmd[1].endswith("mine_circuit.py") and cmd[2] == str(manifest):
            return p
    return None


def test_a_job_whose_driver_dies_resubmitted_reuses_shards_and_takes_the_lease_at_once(
    ray_head: dict[str, str], head_reference: Callable[[int], circuitmod.Circuit], tmp_path: Path
) -> None:
    """The head's loss as a RayJob sees it: the driver SIGKILLed mid-capture, then the same job submitted again (what
    the RayJob's retry does). Its lease names a process that is gone from this host: taken over at once, not after
    the ttl; the committed shards are reused and the circuit is the fault-free one."""
    manifest = demo_manifest(tmp_path / "job-driver", max_batch_size=1)
    store = tmp_path / "job-driver" / "store"
    client = subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head["RAY_ADDRESS"], "--working-dir", str(ROOT), "--",
         sys.executable, "jobs/mine_circuit.py", str(manifest), "--quiet"],
        env=ray_head, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and client.poll() is None:
            if len(list(store.rglob("commits/*.json"))) >= 2:
                break
            time.sleep(0.01)
        driver = job_driver(manifest)
        assert driver is not None, "no job driver to kill: the job ended or never started"
        kill_and_wait(driver.pid)
        client.wait(timeout=120)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=30)
    (lease,) = store.rglob("lease.json")  # left behind by the killed driver, naming it
    assert json.loads(lease.read_text())["pid"] == driver.pid
    committed = len(list(store.rglob("commits/*.json")))
    assert 2 <= committed < 18
    summary = tmp_path / "summary.json"
    again = submit(ray_head, manifest, "--summary", str(summary))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "waiting for" not in again.stdout + again.stderr  # the holder is dead: no wait for the lease's ttl
    s = json.loads(summary.read_text())
    assert s["shards_reused"] >= committed and s["shards_reused"] + s["shards_captured"] == 18
    uri = next(ln.strip() for ln in reversed(again.stdout.splitlines()) if ln.strip().endswith(".json"))
    assert_same_circuit(circuitmod.load(uri), head_reference(1))
    assert_each_row_once(manifest)
    assert not list(store.rglob("lease.json"))  # released by the run that finished
