"""Secrets stay secret: planted credentials appear in no output file, object, log or error message; no code runs
from data (no pickle, no unsafe YAML, no eval), and remote code runs only where a manifest asks for it.

The credentials are fake and recognisable: the AWS variables, the manifest's `output.storage_options` key and
secret (moto accepts any), and a Ray token. Every command runs as a real process, so its stdout and stderr are what
a user or a CI log would keep.
"""

from __future__ import annotations

import ast
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

import cna_dist

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "SeCrEt-env-7f3a91c2d4e5b6a8",
    "storage_options.secret": "SeCrEt-opt-0b1c2d3e4f5a6b7c",
    "RAY_AUTH_TOKEN": "SeCrEt-ray-9e8d7c6b5a4f3e2d",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEENV000000001",
    "storage_options.key": "AKIAFAKEOPT000000002",
}
PACKAGE = Path(cna_dist.__file__).parent


def cli(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cna_dist.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def with_output(manifest: Path, name: str, change) -> Path:
    data = yaml.safe_load(manifest.read_text())
    change(data)
    path = manifest.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, s3_server: str) -> dict:
    """mine, eval, inspect, nightly and two failing runs, with every credential planted; what each left behind."""
    from cna_dist.commands.demo import write_inputs

    root = tmp_path_factory.mktemp("secrets")
    base, _ = write_inputs(root / "inputs")
    prefix = f"s3://cna/{uuid.uuid4().hex}"
    options = {
        "key": SECRETS["storage_options.key"],
        "secret": SECRETS["storage_options.secret"],
        "client_kwargs": {"endpoint_url": s3_server},
    }

    def s3_outputs(d: dict) -> None:
        d["output"] = {"store": f"{prefix}/store", "registry": f"{prefix}/circuits", "storage_options": options}
        d["eval"].update(multipliers=[0.0, 1.0], max_new_tokens=4, caa=False)

    manifest = with_output(base, "s3", s3_outputs)
    wrong_bucket = with_output(base, "wrong-bucket", lambda d: (s3_outputs(d), d["output"].update(store="s3://nope/s")))
    bad_options = with_output(
        base, "bad-options", lambda d: d["output"].update(storage_options=f"secret={SECRETS['storage_options.secret']}")
    )
    (root / "nightly.yaml").write_text(yaml.safe_dump({"manifests": ["inputs/s3.yaml", "inputs/wrong-bucket.yaml"]}))
    env = {
        **os.environ,
        "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"],
        "AWS_ACCESS_KEY_ID": SECRETS["AWS_ACCESS_KEY_ID"],
        "RAY_AUTH_TOKEN": SECRETS["RAY_AUTH_TOKEN"],
        "CNA_DIST_CACHE": str(root / "cache"),
    }
    procs = {"mine": cli("mine", manifest, "--in-process", "--quiet", "--summary", root / "summary.json", env=env)}
    assert procs["mine"].returncode == 0, procs["mine"].stderr
    circuit = procs["mine"].stdout.strip().splitlines()[-1]
    rest = {  # independent of each other (only the nightly takes the run's lease): run side by side
        "eval": ("eval", manifest, "--circuit", circuit, "--out", root / "eval", "--in-process"),
        "eval-s3": ("eval", manifest, "--circuit", circuit, "--out", f"{prefix}/eval", "--in-process"),
        "inspect-store": ("inspect", f"{prefix}/store", "--verify"),
        "inspect-circuit": ("inspect", circuit),
        "nightly": ("nightly", root / "nightly.yaml", "--report", f"{prefix}/reports/", "--in-process"),
        "wrong-bucket": ("mine", wrong_bucket, "--in-process", "--quiet"),
        "bad-options": ("validate", bad_options),
    }
    with cf.ThreadPoolExecutor(4) as pool:
        done = {name: pool.submit(cli, *args, env=env) for name, args in rest.items()}
    procs.update({name: future.result() for name, future in done.items()})
    return {"root": root, "prefix": prefix, "procs": procs, "manifests": {manifest, wrong_bucket, bad_options}}


def leaks(data: bytes) -> list[str]:
    return [name for name, value in SECRETS.items() if value.encode() in data]


@pytest.mark.slow
def test_the_commands_did_what_they_were_asked(runs: dict) -> None:
    procs = runs["procs"]
    for name in ("eval", "eval-s3", "inspect-store", "inspect-circuit"):
        assert procs[name].returncode == 0, (name, procs[name].stderr)
    assert "verified" in procs["inspect-store"].stdout
    assert procs["nightly"].returncode == 1  # one of its two manifests names a bucket that does not exist
    assert procs["wrong-bucket"].returncode == 2 and "s3://nope/s" in procs["wrong-bucket"].stderr
    assert procs["bad-options"].returncode == 2 and "output.storage_options" in procs["bad-options"].stderr


@pytest.mark.slow
def test_no_secret_in_stdout_or_stderr(runs: dict) -> None:
    for name, proc in runs["procs"].items():
        assert not leaks((proc.stdout + proc.stderr).encode()), (name, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_no_secret_in_any_file_or_object_written(runs: dict) -> None:
    import s3fs

    local = [p for p in runs["root"].rglob("*") if p.is_file() and p not in runs["manifests"]]
    fs = s3fs.S3FileSystem()
    remote = fs.find(runs["prefix"].removeprefix("s3://"))
    names = {p.name for p in local} | {r.rsplit("/", 1)[-1] for r in remote}
    assert {"summary.json", "eval.json", "run.json", "00000000.json", "v1.json", "latest"} <= names, names
    assert any(r.split("/")[-2] == "reports" for r in remote), remote  # the nightly report
    for manifest in runs["manifests"]:  # the planted values are there to be found: the search itself works
        assert "storage_options.secret" in leaks(manifest.read_bytes())
    for path in local:
        assert not leaks(path.read_bytes()), path
    for key in remote:
        assert not leaks(fs.cat_file(key)), key


def test_storage_options_are_never_echoed_in_manifest_errors(tmp_path: Path) -> None:
    from cna_dist import manifest as manifestmod
    from cna_dist.errors import BadInput

    for value in (["secret", SECRETS["storage_options.secret"]], SECRETS["storage_options.secret"]):
        data = {"name": "x", "model": {"uri": "/m", "storage_options": value}, "prompts": {}, "output": {}}
        with pytest.raises(BadInput) as info:
            manifestmod.parse(data, "m.yaml")
        assert "model.storage_options" in str(info.value) and not leaks(str(info.value).encode()), str(info.value)
    spec = manifestmod.PromptSet(uri="s3://b/p.jsonl", storage_options={"secret": SECRETS["storage_options.secret"]})
    assert not leaks(repr(spec).encode())


# -- no code runs from data -----------------------------------------------------------------------------------


def sources() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))]


def call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute):
        base = f.value.id if isinstance(f.value, ast.Name) else "?"
        return f"{base}.{f.attr}"
    return f.id if isinstance(f, ast.Name) else "?"


UNSAFE_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "pickle.load",
    "pickle.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.load_all",
    "torch.load",
    "marshal.loads",
    "dill.load",
    "cloudpickle.loads",
    "np.load",
}
UNSAFE_MODULES = {"pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def test_no_code_runs_from_data_anywhere_in_the_package() -> None:
    """No pickle, marshal or shelve; YAML only through safe_load; no eval/exec; no torch.load or np.load."""
    found = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_name(node) in UNSAFE_CALLS:
                found.append(f"{path}:{node.lineno} {call_name(node)}(")
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path}:{node.lineno} import {m}" for m in mods if m.split(".")[0] in UNSAFE_MODULES]
    assert not found, found
    text = "\n".join(p.read_text() for p, _ in sources())
    assert "yaml.safe_load(" in text and not re.search(r"yaml\.(load|full_load|unsafe_load)\(", text)


def keyword(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_remote_code_only_where_a_manifest_turns_it_on() -> None:
    """Every from_pretrained passes trust_remote_code from the manifest (or False); the manifest's default is off."""
    from cna_dist.manifest import ModelSpec

    assert ModelSpec(uri="/m").trust_remote_code is False
    calls = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and call_name(node).endswith(("from_pretrained", "from_config", "for_model")):
                calls.append((path, node))
    assert len(calls) >= 4, [f"{p}:{n.lineno}" for p, n in calls]
    for path, node in calls:
        where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
        value = keyword(node, "trust_remote_code")
        spread = [k for k in node.keywords if k.arg is None]  # **kwargs: must carry the flag itself
        if value is None and spread:
            assert "trust_remote_code" in path.read_text(), where
            continue
        if value is None:
            continue  # transformers' default is False
        assert not (isinstance(value, ast.Constant) and value.value is True), where
        if not isinstance(value, ast.Constant):
            text = ast.unparse(value)
            assert "trust_remote_code" in text, (where, text)  # passed along from the caller, not computed
