"""What the gateway reads from Triton's ensemble config and repository index."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gateway.errors import DeadlineExceeded
from gateway.triton_client import TritonPipeline, channel_args, served_state_from_config

CONFIG = """
name: "fashion_pipeline"
platform: "ensemble"
output [
  { name: "TAG_LOGITS" data_type: TYPE_FP32 dims: [ -1, 33 ] },
  { name: "EMBEDDINGS" data_type: TYPE_FP32 dims: [ -1, 128 ] }
]
parameters { key: "max_images_per_request" value: { string_value: "16" } }
parameters { key: "max_crops_per_image" value: { string_value: "12" } }
parameters { key: "min_score" value: { string_value: "0.3" } }
parameters { key: "detector_version" value: { string_value: "2" } }
parameters { key: "tagger_version" value: { string_value: "3" } }
parameters { key: "embedder_version" value: { string_value: "1" } }
parameters { key: "tagger_sha256" value: { string_value: "abc123" } }
parameters { key: "taxonomy_hash" value: { string_value: "feed" } }
parameters { key: "taxonomy_version" value: { string_value: "2026.11.0" } }
"""


def config() -> model_config_pb2.ModelConfig:
    return text_format.Parse(CONFIG, model_config_pb2.ModelConfig())


def test_facts_recorded_by_the_repository_build() -> None:
    state = served_state_from_config(
        config(), {"detector": ["2"], "tagger": ["3"], "embedder": ["1"]}
    )
    assert state.ready and state.taxonomy_hash == "feed" and state.taxonomy_version == "2026.11.0"
    assert (state.max_images_per_request, state.max_crops_per_image) == (16, 12)
    assert state.min_score == 0.3 and state.embedding_dimension == 128
    assert [(m.name, m.version, m.artifact_sha256) for m in state.models] == [
        ("detector", "2", ""),
        ("tagger", "3", "abc123"),
        ("embedder", "1", ""),
    ]


def test_versions_come_from_what_triton_has_loaded() -> None:
    state = served_state_from_config(config(), {"detector": ["2", "10"]})
    assert next(m for m in state.models if m.name == "detector").version == "10"
    # Not in the index: the version the ensemble was built with.
    assert next(m for m in state.models if m.name == "embedder").version == "1"


def test_a_tagger_other_than_the_recorded_one_has_no_known_taxonomy() -> None:
    state = served_state_from_config(config(), {"tagger": ["4"]})
    tagger = next(m for m in state.models if m.name == "tagger")
    assert (tagger.version, tagger.artifact_sha256) == ("4", "")
    assert state.taxonomy_hash == ""  # so the gateway refuses to decode (TAXONOMY_MISMATCH)


def test_message_limits_fit_a_full_batch_of_the_largest_images() -> None:
    args = dict(channel_args(max_batch_size=8, max_image_bytes=20 * 1024 * 1024))
    assert args["grpc.max_send_message_length"] >= 8 * 20 * 1024 * 1024
    assert args["grpc.max_receive_message_length"] >= 8 * 20 * 1024 * 1024
    huge = dict(channel_args(max_batch_size=256, max_image_bytes=2**30))
    assert huge["grpc.max_send_message_length"] == 2**31 - 1  # a C int


def test_a_call_whose_deadline_has_passed_is_not_sent() -> None:
    """No Triton listens at the address: a call that were sent would be UNAVAILABLE."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def call() -> None:
        pipeline = TritonPipeline(
            f"127.0.0.1:{port}", max_batch_size=1, max_image_bytes=1024, request_timeout_seconds=5
        )
        try:
            await pipeline.infer([b"x"], deadline=time.monotonic() - 0.001)
        finally:
            await pipeline.close()

    with pytest.raises(DeadlineExceeded) as info:
        asyncio.run(call())
    assert info.value.reason == "DEADLINE_EXCEEDED"
