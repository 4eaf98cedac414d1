"""Gateway settings: defaults, precedence (environment < YAML file < flags), validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fashionserve.gateway.settings import GatewaySettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FASHIONSERVE_GATEWAY_"):
            monkeypatch.delenv(name)


def test_defaults_match_the_documented_table(tmp_path: Path) -> None:
    s = load_settings(api_keys_file=tmp_path / "keys.yaml")
    assert s.listen_address == "127.0.0.1:50051"
    assert s.triton_urls == ["localhost:8001"]
    assert s.auth_enabled is True
    assert (s.max_batch_size, s.max_queue_delay_microseconds, s.max_batches_in_flight) == (
        8,
        0,
        4,
    )
    assert s.max_image_bytes == 20 * 1024 * 1024
    assert s.max_image_pixels == 50_000_000
    assert s.max_message_bytes == 64 * 1024 * 1024
    assert (s.max_images_per_batch_request, s.max_stream_in_flight) == (16, 32)
    assert (s.request_timeout_seconds, s.shutdown_grace_seconds) == (30.0, 10.0)
    assert s.taxonomy_file is None and s.log_format == "text"


def test_every_field_is_described() -> None:
    for name, field in GatewaySettings.model_fields.items():
        assert field.description, name


def test_precedence_environment_then_yaml_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASHIONSERVE_GATEWAY_AUTH_ENABLED", "false")
    monkeypatch.setenv("FASHIONSERVE_GATEWAY_MAX_BATCH_SIZE", "2")
    monkeypatch.setenv("FASHIONSERVE_GATEWAY_MAX_STREAM_IN_FLIGHT", "5")
    monkeypatch.setenv("FASHIONSERVE_GATEWAY_TRITON_URLS", '["env-host:1"]')
    config = tmp_path / "gateway.yaml"
    config.write_text("max_batch_size: 3\ntriton_urls: [yaml-host:2]\n")

    s = load_settings(config, triton_urls=["flag-host:3"])
    assert s.max_stream_in_flight == 5  # environment only
    assert s.max_batch_size == 3  # YAML over environment
    assert s.triton_urls == ["flag-host:3"]  # flag over YAML and environment
    assert s.auth_enabled is False


def test_several_triton_servers_from_the_environment_or_a_dns_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FASHIONSERVE_GATEWAY_TRITON_URLS", '["10.0.0.1:8001", "[::1]:8001"]')
    assert load_settings(auth_enabled=False).triton_urls == ["10.0.0.1:8001", "[::1]:8001"]
    headless = "dns:///triton.fashion.svc.cluster.local:8001"
    assert load_settings(auth_enabled=False, triton_urls=[headless]).triton_urls == [headless]


def test_config_file_from_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("auth_enabled: false\nmax_queue_delay_microseconds: 500\n")
    monkeypatch.setenv("FASHIONSERVE_GATEWAY_CONFIG", str(config))
    assert load_settings().max_queue_delay_microseconds == 500


def test_flags_set_to_none_count_as_not_given(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("auth_enabled: false\nlisten_address: 0.0.0.0:6000\n")
    assert load_settings(config, listen_address=None).listen_address == "0.0.0.0:6000"


def test_relative_paths_in_yaml_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "gateway.yaml"
    config.write_text("api_keys_file: keys.yaml\n")
    assert load_settings(config).api_keys_file == tmp_path / "conf" / "keys.yaml"


def test_auth_on_needs_a_key_file() -> None:
    with pytest.raises(ValidationError, match="api_keys_file"):
        load_settings()
    assert load_settings(auth_enabled=False).api_keys_file is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_queue_delay_microseconds", -1),
        ("max_image_bytes", 0),
        ("max_stream_in_flight", 0),
        ("request_timeout_seconds", 0),
        ("listen_address", "no-port"),
        ("triton_urls", ["host:99999"]),
        ("triton_urls", []),
        ("triton_urls", ["a:1", "a:1"]),
        ("triton_urls", ["dns://a:1"]),
        ("triton_retry_budget_ratio", 1.5),
        ("log_format", "xml"),
    ],
)
def test_out_of_range_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        flags: dict[str, Any] = {field: value}
        load_settings(auth_enabled=False, **flags)
    assert field in str(info.value)


def test_message_limit_must_fit_an_image() -> None:
    with pytest.raises(ValidationError, match="max_message_bytes"):
        load_settings(auth_enabled=False, max_image_bytes=8 << 20, max_message_bytes=4 << 20)


def test_unknown_yaml_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("auth_enabled: false\nmax_bach_size: 4\n")
    with pytest.raises(ValidationError, match="max_bach_size"):
        load_settings(config)


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(bad)


def test_connection_and_stream_defaults_match_the_documented_table() -> None:
    s = load_settings(auth_enabled=False)
    assert s.health_port is None and s.reflection_enabled is True
    assert (s.max_anonymous_streams, s.max_streams_per_connection) == (16, 1024)
    assert (s.max_streams_per_tenant, s.stream_idle_timeout_seconds) == (64, 300.0)
    assert (s.keepalive_time_seconds, s.keepalive_timeout_seconds) == (60.0, 20.0)
    assert s.min_client_ping_interval_seconds == 30.0
    assert (s.max_connection_idle_seconds, s.max_connection_age_seconds) == (300.0, 3600.0)
    assert s.max_connection_age_grace_seconds == 600.0


def test_call_and_image_counts_default_to_what_fits_half_the_memory() -> None:
    # 2 GiB, the Helm chart's limit: 1 GiB for messages of 64 MiB, 1 GiB for images of 20 MiB.
    s = load_settings(auth_enabled=False, memory_limit_bytes=2 << 30)
    assert (s.max_concurrent_rpcs, s.max_images_in_flight) == (16, 51)
    # Smaller messages and images: more of them, up to 1024.
    s = load_settings(
        auth_enabled=False,
        memory_limit_bytes=2 << 30,
        max_message_bytes=4 << 20,
        max_image_bytes=4 << 20,
    )
    assert (s.max_concurrent_rpcs, s.max_images_in_flight) == (256, 256)
    s = load_settings(auth_enabled=False, memory_limit_bytes=1 << 40)
    assert (s.max_concurrent_rpcs, s.max_images_in_flight) == (1024, 1024)


def test_memory_defaults_to_the_container_limit_else_the_machine() -> None:
    from fashionserve.gateway.memory import process_memory_bytes

    memory = process_memory_bytes()
    assert 64 << 20 < memory <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    s = load_settings(auth_enabled=False)
    assert s.max_concurrent_rpcs == max(1, min(1024, memory // 2 // s.max_message_bytes))


@pytest.mark.parametrize(
    ("count", "size", "values"),
    [
        ("max_concurrent_rpcs", "max_message_bytes", {"max_concurrent_rpcs": 1024}),
        ("max_images_in_flight", "max_image_bytes", {"max_images_in_flight": 1024}),
        (
            "max_concurrent_rpcs",
            "max_message_bytes",
            {"max_message_bytes": 512 << 20, "max_concurrent_rpcs": 3},
        ),
    ],
)
def test_limits_that_cannot_fit_the_memory_are_refused(
    count: str, size: str, values: dict[str, Any]
) -> None:
    with pytest.raises(ValidationError) as info:
        load_settings(auth_enabled=False, memory_limit_bytes=2 << 30, **values)
    message = str(info.value)
    assert f"{count} x {size}" in message and "1024 MiB of 2048 MiB" in message
