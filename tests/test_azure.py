"""az:// and abfs:// through adlfs against Azurite on 127.0.0.1 (tests/azurite.py): conditional create (`If-None-Match:
*`), racing registry publishers, the run lease and its takeover, and `cna-dist mine` with its store and registry on
Azure Blob Storage."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cna_dist.cli import main
from cna_dist.store import objects
from cna_dist.store import uri as urimod
from tests import test_lease
from tests.azurite import azurite
from tests.test_gcs import LEASE_TESTS
from tests.test_registry import check_race, race, racers

pytestmark = pytest.mark.azure


@pytest.fixture(scope="module")
def azure() -> Iterator[str]:
    with azurite() as endpoint:
        yield endpoint


def fresh(what: str, scheme: str = "az") -> str:
    return f"{scheme}://cna/{uuid.uuid4().hex}/{what}"


@pytest.mark.parametrize("scheme", ["az", "abfs"])
def test_conditional_create_never_overwrites(azure: str, scheme: str) -> None:
    store = objects.open_objects(fresh("registry", scheme))
    assert type(store) is objects.ConditionalPutObjects
    store.create_if_absent("a/v1.json", b"first")
    with pytest.raises(objects.AlreadyExists):
        store.create_if_absent("a/v1.json", b"second")
    assert store.get("a/v1.json") == b"first"
    store.create_if_absent("a/v1.json", b"first")  # a retried create that finds its own bytes: done
    store.put("a/latest", b"1")
    assert store.list("a") == ["latest", "v1.json"] and store.exists("a/v1.json") and not store.exists("a/v2.json")
    assert store.modified("a/v1.json") is not None


def test_racing_publishers_each_get_their_own_version(azure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_claims(*args: object, **kwargs: object) -> None:
        raise AssertionError("the claim protocol ran on Azure, which has conditional writes")

    monkeypatch.setattr(objects.ClaimObjects, "create_if_absent", no_claims)
    reg = fresh("circuits")
    circuits = racers()
    check_race(circuits, race(circuits, reg), reg)


@pytest.mark.parametrize("check", LEASE_TESTS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_run_lease_on_azure(azure: str, check: Callable[[str], None]) -> None:
    check(fresh("runs/r1/lease.json"))


def test_azure_timeouts_are_set_and_the_users_win() -> None:
    assert urimod.effective_options("az://c/x") == {"connection_timeout": 5, "read_timeout": 20}
    assert urimod.effective_options("abfs://c/x", {"read_timeout": 300, "account_name": "a"}) == {
        "connection_timeout": 5,
        "read_timeout": 300,
        "account_name": "a",
    }


def test_mine_into_azure(azure: str, workspace: Path, tmp_path: Path) -> None:
    root = fresh("out")
    data = yaml.safe_load(workspace.read_text())
    data["output"] = {"store": f"{root}/store", "registry": f"{root}/circuits"}
    data["capture"] = {"dtype": "float32"}
    workspace.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["mine", str(workspace), "--quiet", "--in-process"])
    assert result.exit_code == 0, result.output
    uri = result.output.strip().splitlines()[-1]
    assert uri == f"{root}/circuits/refusal/tiny-instruct/v1.json"
    fs, path = urimod.filesystem(uri)
    circuit = json.loads(fs.cat_file(path))
    assert circuit["provenance"]["store"] == f"{root}/store" and circuit["neurons"]
    again = CliRunner().invoke(main, ["mine", str(workspace), "--quiet", "--in-process"])
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == uri  # unchanged: nothing new published


assert test_lease  # the lease checks run here come from test_lease.py
