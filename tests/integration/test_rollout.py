"""A model version rolled out, and back, under load: no failed call, and the gateway follows.

Real Triton (explicit model control) serves the oracle models, a real gateway is in front,
a few threads call Analyze without pause. A tagger version 2 whose taxonomy adds a colour
is published and rolled out with ``fashionserve repo versions rollout --triton``, then
rolled back (forced: going back removes that colour). Every call must succeed, and
GetServingInfo / GetTaxonomy must report what is served after each switch.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import (
    ORACLE_CROP,
    Gateway,
    Load,
    Oracle,
    own_repository,
    publish_taxonomy,
    start_gateway,
)
from grpc_health.v1 import health_pb2
from onnx import TensorProto, helper, numpy_helper

from fashionserve.model_repository.python_models import ORT_RUNNER
from fashionserve.model_repository.versions import rollback, rollout
from fashionserve.protos.fashion.v1 import analysis_service_pb2 as pb
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
