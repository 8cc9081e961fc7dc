"""The object layer on its own: every method on local disk and on S3 (moto), create-if-absent races, the S3 probe,
and the claim protocol driven by a fake clock (stale claims ignored, live claims block, a slow claimant gives up).

S3 servers without conditional writes are made for real by the proxy in tests/s3proxy.py.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from cna_dist.store import objects
from cna_dist.store import uri as urimod
from cna_dist.store.objects import (
    AlreadyExists,
    ClaimContended,
    ClaimObjects,
    ConditionalPutObjects,
    LocalObjects,
    Objects,
    open_objects,
    split_uri,
)
from tests.fakeclock import FakeClock
from tests.s3proxy import ProxyState, serve_proxy

S3 = pytest.param("s3", marks=pytest.mark.s3)


@pytest.fixture
def proxy(s3_server: str) -> Iterator[ProxyState]:
    """A proxy in front of moto that drops If-None-Match; s3fs talks to it for the duration of the test."""
    with serve_proxy(s3_server) as state:
        yield state


def root_for(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh root: a folder under tmp_path, or a fresh prefix in the moto bucket (through the proxy if asked)."""
    if where == "local":
        return str(tmp_path / "objects")
    if where.startswith("s3-"):  # s3-drop / s3-reject: a server that ignores or refuses If-None-Match
        request.getfixturevalue("proxy").mode = where.removeprefix("s3-")
    else:
        request.getfixturevalue("s3_server")
    return f"s3://cna/{uuid.uuid4().hex}/objects"


@pytest.fixture(params=["local", S3])
def objs(request: pytest.FixtureRequest, tmp_path: Path) -> Objects:
    return open_objects(root_for(request.param, tmp_path, request))


# -- every method -------------------------------------------------------------------------------------------------


def test_get_put_and_json(objs: Objects) -> None:
    with pytest.raises(FileNotFoundError):
        objs.get("a/b.json")
    objs.put("a/b.bin", b"one")
    objs.put("a/b.bin", b"two")  # put overwrites
    assert objs.get("a/b.bin") == b"two"
    objs.put_json("a/b.json", {"version": 3, "file": "v3.json"})
    assert objs.get("a/b.json") == b'{\n "version": 3,\n "file": "v3.json"\n}\n'
    assert objs.get_json("a/b.json") == {"version": 3, "file": "v3.json"}


def test_list_gives_the_names_of_immediate_children(objs: Objects) -> None:
    assert objs.list() == [] and objs.list("nothing/here") == []
    for key in ("reg/v1.json", "reg/v2.json", "reg/v3.claims/abc", "top"):
        objs.put(key, b"x")
    assert objs.list() == ["reg", "top"]
    assert objs.list("reg") == ["v1.json", "v2.json", "v3.claims"]
    assert objs.list("reg/") == objs.list("reg")
    assert objs.list("reg/v3.claims") == ["abc"]


def test_exists_and_delete(objs: Objects) -> None:
    assert not objs.exists("k")
    objs.delete("k")  # absent is fine
    objs.put("k", b"x")
    assert objs.exists("k")
    objs.delete("k")
    assert not objs.exists("k")
    with pytest.raises(FileNotFoundError):
        objs.get("k")


def test_modified_is_the_servers_write_time(objs: Objects) -> None:
    assert objs.modified("k") is None
    before = time.time()
    objs.put("k", b"x")
    stamp = objs.modified("k")
    assert stamp is not None and before - 5 <= stamp <= time.time() + 5  # S3 rounds to the second


def test_uri_names_the_same_object_for_fsspec(objs: Objects) -> None:
    objs.put("deep/er/k.json", b"payload")
    uri = objs.uri("deep/er/k.json")
    assert uri.startswith(objs.root) and uri.endswith("/deep/er/k.json")
    fs, path = urimod.filesystem(uri)
    assert fs.cat_file(path) == b"payload"
    assert objs.uri("") == objs.root


def test_create_if_absent_never_overwrites(objs: Objects) -> None:
    objs.create_if_absent("reg/v1.json", b"first")
    with pytest.raises(AlreadyExists) as caught:
        objs.create_if_absent("reg/v1.json", b"second")
    assert caught.value.key == "reg/v1.json"
    assert objs.get("reg/v1.json") == b"first"
    objs.put("reg/v2.json", b"put")
    with pytest.raises(AlreadyExists):
        objs.create_if_absent("reg/v2.json", b"created")
    assert objs.get("reg/v2.json") == b"put"
    assert objs.list("reg") == ["v1.json", "v2.json"]  # nothing partial or temporary left beside them


def test_bad_keys_are_refused(objs: Objects) -> None:
    for key in ("a/../b", "a//b", "./a"):
        with pytest.raises(ValueError, match="bad object key"):
            objs.put(key, b"x")


def test_local_writes_leave_only_the_objects(tmp_path: Path) -> None:
    objs = open_objects(str(tmp_path / "o"))
    assert isinstance(objs, LocalObjects)
    objs.put("k", b"1")
    objs.put("k", b"2")
    objs.create_if_absent("c", b"3")
    with pytest.raises(AlreadyExists):
        objs.create_if_absent("c", b"4")
    assert sorted(os.listdir(tmp_path / "o")) == ["c", "k"]


@pytest.mark.s3
def test_s3_reads_past_fsspecs_caches(s3_server: str) -> None:
    """A writer elsewhere (another process, another node) is seen at once, even after our own listing was cached."""
    prefix = uuid.uuid4().hex
    objs = open_objects(f"s3://cna/{prefix}")
    objs.put("d/a", b"1")
    assert objs.list("d") == ["a"]
    assert isinstance(objs, ConditionalPutObjects)
    objs.fs.ls(f"cna/{prefix}/d")  # fsspec's listing cache now holds d/ with only `a`
    client = boto3.client("s3", endpoint_url=s3_server)
    client.put_object(Bucket="cna", Key=f"{prefix}/d/b", Body=b"2")
    assert objs.list("d") == ["a", "b"]
    assert objs.exists("d/b") and objs.get("d/b") == b"2"
    client.delete_object(Bucket="cna", Key=f"{prefix}/d/a")
    assert objs.list("d") == ["b"] and not objs.exists("d/a") and objs.modified("d/a") is None


def test_split_uri() -> None:
    assert split_uri("s3://b/runs/r1/lease.json") == ("s3://b/runs/r1", "lease.json")
    assert split_uri("/tmp/x/report.json") == ("/tmp/x", "report.json")
    assert split_uri("/report.json") == ("/", "report.json")
    assert split_uri("report.json") == (".", "report.json")
    with pytest.raises(ValueError):
        split_uri("s3://b/folder/")


# -- picking the implementation -----------------------------------------------------------------------------------


@pytest.mark.s3
def test_open_probes_lazily_and_picks_claims_where_the_header_is_ignored(proxy: ProxyState) -> None:
    root = f"s3://cna/{uuid.uuid4().hex}/reg"
    objects.forget_probes()
    objs = open_objects(root)
    assert isinstance(objs, ConditionalPutObjects)
    assert objs.list() == [] and proxy.seen_conditional == 0  # opening and reading write no probe
    objs.create_if_absent("v1.json", b"x")  # probes: the proxy drops the header, so claims create it
    assert proxy.seen_conditional == 1 and objs.get("v1.json") == b"x"
    assert isinstance(open_objects(root), ClaimObjects)  # the cached answer picks claims from now on
    assert objs.list() == ["v1.json"] and objs.list("v1.claims") == []  # no probe or claim left behind
    objects.forget_probes()
    assert isinstance(open_objects(root), ConditionalPutObjects)


@pytest.mark.s3
def test_a_server_that_starts_refusing_the_header_falls_back_to_claims(
    proxy: ProxyState, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy.mode = "reject"
    monkeypatch.setattr(objects, "conditional_put_supported", lambda *args, **kwargs: True)  # an old probe said yes
    root = f"s3://cna/{uuid.uuid4().hex}/reg"
    objs = open_objects(root)
    objs.create_if_absent("v1.json", b"x")  # 501 NotImplemented: done by claims instead
    assert objs.get("v1.json") == b"x" and proxy.seen_conditional == 1
    assert isinstance(open_objects(root), ClaimObjects)
    with pytest.raises(AlreadyExists):
        open_objects(root).create_if_absent("v1.json", b"y")


# -- races --------------------------------------------------------------------------------------------------------


def race(objs: Objects, key: str, n: int) -> tuple[list[int], list[int]]:
    """n threads create `key` at once, each with its own bytes; contended claims back off and retry."""
    won: list[int] = []
    lost: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def create(i: int) -> None:
        try:
            barrier.wait()
            for attempt in range(200):
                try:
                    objs.create_if_absent(key, f"writer {i}".encode())
                    won.append(i)
                    return
                except ClaimContended:
                    time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
                except AlreadyExists:
                    lost.append(i)
                    return
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return won, lost


@pytest.mark.parametrize(
    "where",
    ["local", S3, pytest.param("s3-drop", marks=pytest.mark.s3), pytest.param("s3-reject", marks=pytest.mark.s3)],
)
def test_create_if_absent_race_has_one_winner(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    root = root_for(where, tmp_path, request)
    objects.forget_probes()
    for key in ("reg/v1.json", "reg/v2.json", "lease.json"):
        won, lost = race(open_objects(root), key, n=6)
        assert len(won) == 1 and sorted(won + lost) == list(range(6))
        assert open_objects(root).get(key) == f"writer {won[0]}".encode()  # the winner's bytes, never overwritten
    objs = open_objects(root)
    assert isinstance(objs, ClaimObjects) == where.startswith("s3-")
    assert objs.list() == ["lease.json", "reg"]  # no probe, claim or temporary object left behind
    assert objs.list("reg") == ["v1.json", "v2.json"]


# -- the claim protocol, on a fake clock ----------------------------------------------------------------------------


@pytest.fixture(params=["local", S3])
def claim_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The claim protocol needs no proxy: it never sends the header. Local disk lets a test date a claim back."""
    return root_for(request.param, tmp_path, request)


def test_a_live_claim_blocks_and_is_left_alone(claim_root: str) -> None:
    objs = ClaimObjects(claim_root, clock=FakeClock(), ttl_s=60)
    objs.put("v1.claims/rival", b"{}")
    with pytest.raises(ClaimContended):
        objs.create_if_absent("v1.json", b"x")
    assert objs.list("v1.claims") == ["rival"]  # ours withdrawn, the rival's kept
    assert not objs.exists("v1.json")
    objs.delete("v1.claims/rival")  # the rival gave up
    objs.create_if_absent("v1.json", b"mine")
    assert objs.get("v1.json") == b"mine" and objs.list("v1.claims") == []
    with pytest.raises(AlreadyExists) as caught:  # v1 exists now: nobody else may write it
        objs.create_if_absent("v1.json", b"other")
    assert type(caught.value) is AlreadyExists and objs.get("v1.json") == b"mine"


def test_a_stale_claim_is_ignored_and_cleared(tmp_path: Path) -> None:
    """A claim older than ttl (server time against server time) is a crashed claimant's; one younger is live."""
    objs = ClaimObjects(str(tmp_path), clock=FakeClock(), ttl_s=60)
    objs.put("v1.claims/recent", b"{}")
    aged = tmp_path / "v1.claims" / "recent"
    os.utime(aged, (time.time() - 50, time.time() - 50))
    with pytest.raises(ClaimContended):
        objs.create_if_absent("v1.json", b"x")
    os.utime(aged, (time.time() - 70, time.time() - 70))  # now more than ttl older than any new claim
    objs.create_if_absent("v1.json", b"mine")
    assert objs.get("v1.json") == b"mine"
    assert objs.list("v1.claims") == []  # the winner removed its claim and the stale one


class SlowClaims(ClaimObjects):
    """A claimant whose LIST takes `delay` seconds on its (fake) monotonic clock."""

    delay = 0.0

    def _stale_rivals(self, claims: str, mine: str, key: str) -> list[str] | None:
        self.clock.advance(self.delay)  # a FakeClock
        return super()._stale_rivals(claims, mine, key)


def test_a_claimant_past_a_quarter_ttl_gives_up(claim_root: str) -> None:
    objs = SlowClaims(claim_root, clock=FakeClock(), ttl_s=60)
    objs.delay = 15.001
    with pytest.raises(ClaimContended, match="too long"):
        objs.create_if_absent("v1.json", b"late")
    assert not objs.exists("v1.json") and objs.list("v1.claims") == []  # gave its claim up, wrote nothing
    objs.delay = 15.0  # exactly ttl/4 is still in time
    objs.create_if_absent("v1.json", b"in time")
    assert objs.get("v1.json") == b"in time"


def test_a_claimant_whose_claim_was_cleared_by_the_winner_loses(claim_root: str) -> None:
    class Overtaken(ClaimObjects):
        def _stale_rivals(self, claims: str, mine: str, key: str) -> list[str] | None:
            self.put(key, b"winner")  # a rival won meanwhile and cleared the claims folder, ours with it
            self.fs.rm_file(mine)
            return super()._stale_rivals(claims, mine, key)

    objs = Overtaken(claim_root, clock=FakeClock(), ttl_s=60)
    with pytest.raises(AlreadyExists):
        objs.create_if_absent("v1.json", b"loser")
    assert objs.get("v1.json") == b"winner"
