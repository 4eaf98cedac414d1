"""A model version rolled out, and back, under load: no failed call, and the gateway follows.

Real Triton (explicit model control) serves the oracle models, a real gateway is in front,
a few threads call Analyze without pause. A tagger version 2 whose taxonomy adds a colour
is published and rolled out with ``fashionserve repo versions rollout --triton``, then
rolled back (forced: going back removes that colour). Every call must succeed, and
GetServingInfo / GetTaxonomy must report what is served after each switch.

Over two Tritons reading one repository (the cluster's case, one pod each), the rollout
switches both, one after the other, and a caller's stream never gets answers from both
versions: each stream's answers come from one tagger (told apart by the colour table,
which only version 2 has "beige" in), or the stream ends with SERVED_VERSION_CHANGED.
A Triton that cannot be reached stops a rollout, and the one already changed is put back.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from conftest import (
    ORACLE_CROP,
    Gateway,
    Load,
    Oracle,
    error_reason,
    own_repository,
    publish_taxonomy,
    start_gateway,
)
from grpc_health.v1 import health_pb2
from onnx import TensorProto, helper, numpy_helper

from fashionserve.model_repository.python_models import ORT_RUNNER
from fashionserve.model_repository.versions import rollback, rollout
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
from fashionserve.repository import RepositoryError, ensemble_versions
from fashionserve.taxonomy import Taxonomy, load_taxonomy
from fashionserve.triton import TritonServer


@dataclass
class Stack:
    repo: Path
    triton: TritonServer
    gateway: Gateway


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, triton_runtime: Path) -> Iterator[Stack]:
    del triton_runtime
    root = tmp_path_factory.mktemp("rollout")
    repo = own_repository(root)  # version 1 declares the packaged taxonomy
    triton = TritonServer(
        repo, log_file=root / "triton.log", ready_timeout=120, model_control_mode="explicit"
    ).start()
    try:
        gateway = start_gateway(triton.grpc_url, root / "gw")
        try:
            gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
            yield Stack(repo, triton, gateway)
        finally:
            gateway.stop()
    finally:
        triton.stop()


def publish_tagger(repo: Path, version: int, taxonomy: Taxonomy) -> None:
    """A tagger version laid out for ``taxonomy`` (mean colour -> logits, a linear map)."""
    width = taxonomy.num_logits
    weights = np.random.default_rng(version).standard_normal((3, width)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["crops"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Mul", ["flat", "scale"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "w"], ["logits"]),
        ],
        "tagger",
        [
            helper.make_tensor_value_info(
                "crops", TensorProto.FLOAT, ["batch", 3, ORACLE_CROP, ORACLE_CROP]
            )
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array([1 / 255], np.float32), "scale"),
        ],
    )
    version_dir = repo / "tagger" / str(version)
    staging = repo / "tagger" / f".staging-{version}"  # published atomically, as export does
    staging.mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        staging / "model.onnx",
    )
    (staging / "model.py").write_bytes(ORT_RUNNER.read_bytes())
    (staging / "manifest.json").write_text(
        json.dumps({"model": {"name": "tagger", "kind": "tagger", "version": version}})
    )
    publish_taxonomy(staging, taxonomy)
    staging.rename(version_dir)


def serving_info(gateway: Gateway) -> tuple[dict[str, str], str]:
    reply = gateway.stub.GetServingInfo(
        pb.GetServingInfoRequest(), metadata=gateway.auth, timeout=10
    )
    return {m.name: m.version for m in reply.models}, reply.taxonomy_hash


def wait_for(gateway: Gateway, tagger: str, taxonomy_hash: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        versions, served_hash = serving_info(gateway)
        if versions.get("tagger") == tagger and served_hash == taxonomy_hash:
            return
        assert time.monotonic() < deadline, f"still serving {versions} {served_hash[:12]}"
        time.sleep(0.1)


def test_a_version_switch_under_load_fails_no_call(stack: Stack, oracle: Oracle) -> None:
    old = load_taxonomy()
    doc = copy.deepcopy(old.to_dict())
    doc["tag_groups"][0]["labels"].append("beige")  # adding a label: compatible
    new = Taxonomy.from_dict(doc)
    publish_tagger(stack.repo, 2, new)
    image = oracle.scene(320, 240, [((20, 20, 140, 200), 0), ((170, 40, 300, 220), 2)])
    assert serving_info(stack.gateway)[0]["tagger"] == "1"  # publishing alone changes nothing

    with Load(stack.gateway, image) as load:
        while load.ok() < 5:
            time.sleep(0.05)
        rollout(stack.repo, "tagger", tritons=[stack.triton.grpc_url], drain_seconds=0.5)
        wait_for(stack.gateway, "2", new.hash)
        taxonomy = stack.gateway.stub.GetTaxonomy(
            pb.GetTaxonomyRequest(), metadata=stack.gateway.auth, timeout=10
        )
        assert "beige" in next(g for g in taxonomy.tag_groups if g.name == "colour").labels
        after_rollout = load.ok()
        while load.ok() < after_rollout + 5:  # calls decoded with the new layout
            time.sleep(0.05)

        # Going back removes "beige": a caller may already count it, so it takes --force.
        rollback(
            stack.repo, "tagger", force=True, tritons=[stack.triton.grpc_url], drain_seconds=0.5
        )
        wait_for(stack.gateway, "1", old.hash)
        after_rollback = load.ok()
        while load.ok() < after_rollback + 5:
            time.sleep(0.05)

    assert load.failures() == []
    assert load.ok() >= 15
    loaded = {
        (m.name, m.version)
        for m in _repository_index(stack.triton.grpc_url)
        if m.name == "tagger" and m.state == "READY"
    }
    assert loaded == {("tagger", "1")}  # the old version was unloaded after the drain


def _repository_index(url: str) -> list[Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return list(client.get_model_repository_index().models)
    finally:
        client.close()


@dataclass
class TwoTritons:
    repo: Path
    tritons: list[TritonServer]
    gateway: Gateway

    @property
    def urls(self) -> list[str]:
        return [t.grpc_url for t in self.tritons]


@pytest.fixture
def two_tritons(tmp_path: Path, triton_runtime: Path) -> Iterator[TwoTritons]:
    del triton_runtime
    repo = own_repository(tmp_path)
    tritons: list[TritonServer] = []
    try:
        for name in ("a", "b"):
            tritons.append(
                TritonServer(
                    repo,
                    log_file=tmp_path / f"triton-{name}.log",
                    ready_timeout=120,
                    model_control_mode="explicit",
                ).start()
            )
        gateway = start_gateway([t.grpc_url for t in tritons], tmp_path / "gw")
        try:
            gateway.wait_health(health_pb2.HealthCheckResponse.SERVING)
            yield TwoTritons(repo, tritons, gateway)
        finally:
            gateway.stop()
    finally:
        for triton in tritons:
            triton.stop()


class Streams:
    """Streams of ``per_stream`` requests opened one after another on a thread: for each,
    which taggers answered (1 or 2, by the colour table) and how it ended."""

    def __init__(self, gateway: Gateway, image: bytes, per_stream: int = 24) -> None:
        self.gateway, self.image, self.per_stream = gateway, image, per_stream
        self.seen: list[tuple[set[int], str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _requests(self) -> Iterator[pb.StreamAnalyzeRequest]:
        options = pb.AnalyzeOptions(include_probability_tables=True)
        for i in range(self.per_stream):
            yield pb.StreamAnalyzeRequest(
                request_id=f"r{i}", image=pb.Image(data=self.image), options=options
            )
            time.sleep(0.02)  # a stream that lasts about as long as a switch

    def _run(self) -> None:
        while not self._stop.is_set():
            taggers: set[int] = set()
            ended = "OK"
            try:
                for answer in self.gateway.stub.StreamAnalyze(
                    self._requests(), metadata=self.gateway.auth, timeout=60
                ):
                    if answer.WhichOneof("outcome") != "result":
                        ended = f"an answer failed: {answer.error.reason}"
                        continue
                    for garment in answer.result.garments:
                        colour = next(t for t in garment.probability_tables if t.name == "colour")
                        taggers.add(2 if any(lb.name == "beige" for lb in colour.labels) else 1)
            except grpc.RpcError as err:
                ended = error_reason(err) or str(err.code())
            self.seen.append((taggers, ended))

    def __enter__(self) -> Streams:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_a_rollout_switches_every_triton_and_no_stream_mixes_versions(
    two_tritons: TwoTritons, oracle: Oracle
) -> None:
    stack = two_tritons
    old = load_taxonomy()
    doc = copy.deepcopy(old.to_dict())
    doc["tag_groups"][0]["labels"].append("beige")
    new = Taxonomy.from_dict(doc)
    publish_tagger(stack.repo, 2, new)
    image = oracle.scene(320, 240, [((20, 20, 140, 200), 0), ((170, 40, 300, 220), 2)])

    report: list[str] = []
    with Streams(stack.gateway, image) as streams:
        while len(streams.seen) < 2:
            time.sleep(0.05)
        switch = rollout(
            stack.repo, "tagger", tritons=stack.urls, drain_seconds=0.5, echo=report.append
        )
        wait_for(stack.gateway, "2", new.hash)
        before = len(streams.seen)
        while len(streams.seen) < before + 2:  # streams opened after the switch
            time.sleep(0.05)

    assert switch.replicas == tuple(stack.urls)
    for url in stack.urls:  # each step reported for each Triton
        assert f"{url}: tagger 2 loaded beside 1" in report
        assert f"{url}: ensemble switched to tagger 2" in report
        assert f"{url}: unloaded 1; serving tagger 2" in report
        assert _ready_taggers(url) == {"2"}
    for taggers, ended in streams.seen:
        assert len(taggers) <= 1, f"a stream got answers of taggers {taggers}"
        assert ended in ("OK", "SERVED_VERSION_CHANGED"), ended
    assert streams.seen[0] == ({1}, "OK") and streams.seen[-1] == ({2}, "OK")


def test_a_triton_that_fails_stops_the_rollout_and_the_others_are_put_back(
    two_tritons: TwoTritons,
) -> None:
    stack = two_tritons
    publish_tagger(stack.repo, 2, load_taxonomy())
    report: list[str] = []
    unreachable = "127.0.0.1:1"
    with pytest.raises(RepositoryError, match="stopped at step 1") as stopped:
        rollout(
            stack.repo,
            "tagger",
            tritons=[stack.urls[0], unreachable],
            drain_seconds=0,
            echo=report.append,
        )
    assert unreachable in str(stopped.value)
    assert f"{stack.urls[0]}: tagger 2 unloaded" in report
    assert ensemble_versions(stack.repo)["tagger"] == 1  # the configs are back as well
    for url in stack.urls:
        assert _ready_taggers(url) == {"1"}
    assert serving_info(stack.gateway)[0]["tagger"] == "1"


def _ready_taggers(url: str) -> set[str]:
    return {m.version for m in _repository_index(url) if m.name == "tagger" and m.state == "READY"}
