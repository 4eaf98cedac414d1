"""What the gateway reads from Triton's ensemble config, and its verdict whether it can
serve."""

from __future__ import annotations

import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from fashionserve.gateway.served_state import assess, served_state_from_config, serving_problem
from fashionserve.gateway.triton_client import EnsembleStatus
from fashionserve.taxonomy import Taxonomy, load_taxonomy

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
    state = served_state_from_config(config())
    assert state.ready and state.taxonomy_hash == "feed" and state.taxonomy_version == "2026.11.0"
    assert (state.max_images_per_request, state.max_crops_per_image) == (16, 12)
    assert state.min_score == 0.3 and state.embedding_dimension == 128
    assert [(m.name, m.version, m.artifact_sha256) for m in state.models] == [
        ("detector", "2", ""),
        ("tagger", "3", "abc123"),
        ("embedder", "1", ""),
    ]


def test_the_version_an_ensemble_step_is_pinned_to_is_the_served_one() -> None:
    pinned = config()
    step = pinned.ensemble_scheduling.step.add()
    step.model_name, step.model_version = "tagger", 4
    # Built for tagger 3, the ensemble now calls 4 (as in a half-finished rollout): 4 is
    # served, and what its logits mean is not known from the recorded hash.
    state = served_state_from_config(pinned)
    tagger = next(m for m in state.models if m.name == "tagger")
    assert (tagger.version, tagger.artifact_sha256) == ("4", "")
    assert state.taxonomy_hash == ""  # so the gateway refuses to decode (TAXONOMY_MISMATCH)


def test_a_published_taxonomy_is_used_only_when_it_matches_the_recorded_hash() -> None:
    taxonomy = load_taxonomy()
    published = config()
    published.parameters["taxonomy_hash"].string_value = taxonomy.hash
    published.parameters["taxonomy_document"].string_value = json.dumps(taxonomy.to_dict())
    state = served_state_from_config(published)
    assert state.taxonomy is not None and state.taxonomy.hash == taxonomy.hash
    other = Taxonomy.from_dict({**taxonomy.to_dict(), "version": "9.9"})
    # The gateway's own taxonomy differs, but the served one is published: it can decode.
    assert serving_problem(state, other) == ""

    published.parameters["taxonomy_hash"].string_value = "f00d"  # document does not match
    state = served_state_from_config(published)
    assert state.taxonomy is None
    assert "the gateway decodes with 9.9" in serving_problem(state, other)


def test_the_verdict_is_part_of_the_assessed_state() -> None:
    taxonomy = load_taxonomy()
    assert assess(EnsembleStatus("Triton is not live"), taxonomy).problem == "Triton is not live"
    matching = config()
    matching.parameters["taxonomy_hash"].string_value = taxonomy.hash
    state = assess(EnsembleStatus(config=matching), taxonomy)
    assert state.ready and state.problem == ""
    state = assess(EnsembleStatus(config=config()), taxonomy)
    assert state.ready and "the served tagger was exported with taxonomy 2026.11.0" in state.problem
