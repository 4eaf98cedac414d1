"""The gateway's settings: one validated model, read from three places.

Precedence, lowest to highest: environment variables (``FASHIONSERVE_GATEWAY_<FIELD>``),
then a YAML file (``--config FILE`` or ``FASHIONSERVE_GATEWAY_CONFIG``), then command-line
flags. A flag wins over the YAML file, which wins over the environment; a field set
nowhere takes its default. The same field names are used in all three places (the Helm
chart renders the YAML file). Relative paths in the YAML file are relative to that file.

The batcher fields are named like Triton's dynamic batcher (``max_batch_size``,
``max_queue_delay_microseconds``) because they mean the same thing.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from fashionserve.ensemble import GRPC_MAX_MESSAGE_BYTES
from fashionserve.errors import InvalidInput
from fashionserve.gateway.memory import CALLER_SHARE, caller_budget_bytes

ENV_PREFIX = "FASHIONSERVE_GATEWAY_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
MIB = 1024 * 1024

DNS_SCHEME = "dns:///"
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]*):\d{1,5}$")

# The YAML layer for the settings being built; a ContextVar rather than a class attribute
# so two settings objects built at once (tests) do not see each other's file.
_yaml_layer: ContextVar[dict[str, Any] | None] = ContextVar("_yaml_layer", default=None)


# The defaults of max_concurrent_rpcs and max_images_in_flight where memory allows more.
_MAX_DEFAULT_COUNT = 1024


def _fitting(data: dict[str, Any], size_field: str) -> int:
    """How many items of ``data[size_field]`` bytes fit the callers' share of memory (at
    least 1, at most 1024): the default of the count that goes with that size."""
    size = data.get(size_field) or MIB  # absent when it failed validation: reported already
    fitting = caller_budget_bytes(data.get("memory_limit_bytes")) // size
    return max(1, min(_MAX_DEFAULT_COUNT, fitting))


class SettingsError(InvalidInput):
    """The settings file could not be read."""


class TenantQuota(BaseModel):
    """What one tenant may use, counted in images: a BatchAnalyze call of n images costs n."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images_per_second: float = Field(
        default=500.0,
        gt=0,
        le=1_000_000,
        description="Sustained rate of images a tenant may send (the token bucket's refill).",
    )
    burst_images: int = Field(
        default=1000,
        ge=1,
        le=10_000_000,
        description="Images a tenant may send at once after being idle (the bucket's size).",
    )
    max_concurrent_images: int = Field(
        default=512,
        ge=1,
        le=1_000_000,
        description="Images of one tenant being served at once (admitted, not yet answered).",
    )


class TenantQuotaOverride(BaseModel):
    """One tenant's exceptions to ``tenant_quota``; a field left out keeps the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    images_per_second: float | None = Field(
        default=None, gt=0, le=1_000_000, description="See TenantQuota."
    )
    burst_images: int | None = Field(
        default=None, ge=1, le=10_000_000, description="See TenantQuota."
    )
    max_concurrent_images: int | None = Field(
        default=None, ge=1, le=1_000_000, description="See TenantQuota."
    )


class CaptureSettings(BaseModel):
    """Capture of served results for active learning (``fashionserve.gateway.capture``).
    Off unless ``directory`` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str | None = Field(
        default=None,
        max_length=2048,
        description="Where capture Parquet files go: a local directory, or object storage "
        "through fsspec (s3://bucket/prefix..., the cloud extra). Unset: capture is off.",
    )
    sample_rate: float = Field(
        default=0.01, ge=0, le=1, description="Share of each tenant's served images captured."
    )
    tenant_sample_rates: dict[str, float] = Field(
        default_factory=dict,
        description="Per-tenant exceptions to sample_rate, by tenant name (0 captures none).",
    )
    include_images: bool = Field(
        default=False,
        description="Keep the image bytes in the records (else only their sha256): only "
        "where the tenants' terms allow keeping their images.",
    )
    max_queued_records: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="Records waiting for the writer; past it records are dropped and "
        'counted (fashionserve_capture_records_total{outcome="dropped"}), never waited for.',
    )
    max_queued_bytes: int = Field(
        default=64 * MIB,
        ge=MIB,
        le=16 * 1024 * MIB,
        description="Bytes the waiting records hold (their images, outputs); past it too "
        "records are dropped.",
    )
    max_file_bytes: int = Field(
        default=32 * MIB, ge=1, le=4096 * MIB, description="A capture file is written at this size."
    )
    max_file_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="...or when its first record is this old (and at shutdown).",
    )

    @field_validator("tenant_sample_rates")
    @classmethod
    def _rates(cls, value: dict[str, float]) -> dict[str, float]:
        for tenant, rate in value.items():
            if not 0 <= rate <= 1:
                raise ValueError(f"the rate of tenant {tenant!r} must be in [0, 1], got {rate}")
        return value


class GatewaySettings(BaseSettings):
    """Everything the gateway can be told. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    listen_address: str = Field(
        "127.0.0.1:50051",
        description="host:port the gRPC server listens on; port 0 picks a free port. "
        "Use 0.0.0.0:50051 in containers.",
    )
    triton_urls: list[str] = Field(
        ["localhost:8001"],
        min_length=1,
        max_length=64,
        description="Triton servers' gRPC addresses; calls are spread over every one that is "
        "ready. Each is host:port (one server), or dns:///host:port for every address the "
        "name resolves to, re-resolved every triton_dns_refresh_seconds (a Kubernetes "
        "headless Service).",
    )
    triton_dns_refresh_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often dns:/// entries of triton_urls are resolved again.",
    )
    triton_retry_budget_ratio: float = Field(
        0.2,
        ge=0,
        le=1,
        description="A Triton call that fails because of its server (unreachable, or past "
        "request_timeout_seconds) is retried on another within the caller's deadline; retries "
        "are at most this fraction of calls (a token bucket, as gRPC and Envoy retry budgets).",
    )
    triton_retry_budget_burst: int = Field(
        10,
        ge=0,
        le=10_000,
        description="Retries allowed beyond triton_retry_budget_ratio when calls are few "
        "(the token bucket's size).",
    )
    triton_eject_after_timeouts: int = Field(
        3,
        ge=1,
        le=1000,
        description="A Triton server whose calls time out this many times in a row (the call "
        "was sent and not answered within request_timeout_seconds or the caller's shorter "
        "deadline) takes no more calls until a canary inference passes: a hung server that "
        "still passes the readiness probes is ejected.",
    )
    triton_canary_backoff_seconds: float = Field(
        1.0,
        gt=0,
        le=60,
        description="An ejected Triton server is sent its first canary inference (one tiny "
        "image through the ensemble) this long after the ejection, and after each failed "
        "canary the wait doubles, up to a minute: a server that comes back is not re-admitted "
        "until it really serves, and one that does not is not hammered.",
    )
    auth_enabled: bool = Field(
        True,
        description="Require an API key (metadata x-api-key) on every analysis call. "
        "Turn off for local use only: the gateway logs a warning.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="YAML file of salted API-key hashes (`fashionserve keys create`). "
        "Required when auth_enabled; re-read when it changes.",
    )
    max_batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Most images in one ensemble call; must not exceed the ensemble's "
        "max_images_per_request.",
    )
    max_queue_delay_microseconds: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="How long the first request of a batch waits for others to join it. "
        "0: a batch leaves as soon as a slot is free, and batches grow only while every slot "
        "is busy, so a lone caller never waits and a crowd is batched (measured in "
        "BENCHMARKS.md: a 2 ms delay added 2 ms to one caller's p50 and no throughput).",
    )
    max_batches_in_flight: int = Field(
        4, ge=1, le=256, description="Most ensemble calls outstanding at once."
    )
    memory_limit_bytes: int | None = Field(
        None,
        ge=64 * MIB,
        description="Memory the gateway process may use. Unset: its cgroup's limit (a "
        "container's), else the machine's memory. Received messages (max_concurrent_rpcs x "
        "max_message_bytes) and, apart, admitted images (max_images_in_flight x "
        "max_image_bytes) may each take half of it: those two counts default to what fits, "
        "and values that do not fit are refused at startup.",
    )
    max_image_bytes: int = Field(
        20 * MIB,
        ge=1,
        le=GRPC_MAX_MESSAGE_BYTES,
        description="Largest encoded image accepted, bytes.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest image accepted, width x height (read from the header, "
        "before any decode).",
    )
    max_jpeg_scans: int = Field(
        100,
        ge=1,
        le=100_000,
        description="Most scans (SOS markers) a JPEG may have; a progressive photo has about "
        "ten. Each scan is a full pass over the image, so many nearly empty scans would "
        "make decoding take minutes (TOO_MANY_SCANS).",
    )
    max_png_chunks: int = Field(
        10_000,
        ge=3,
        le=10_000_000,
        description="Most chunks a PNG may have (image data is usually split in 8-64 KiB "
        "chunks). Chunks are parsed one by one, so millions of empty ones would stall the "
        "gateway for seconds (TOO_MANY_CHUNKS).",
    )
    max_png_metadata_bytes: int = Field(
        4 * MIB,
        ge=1,
        le=GRPC_MAX_MESSAGE_BYTES,
        description="Most metadata a PNG may carry: its ancillary chunks (text, colour "
        "profile, EXIF...), compressed ones counted inflated and inflated no further than "
        "this. A few kilobytes of compressed text can inflate to gigabytes when the image "
        "is opened (METADATA_TOO_LARGE).",
    )
    image_check_workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Threads of the pool that checks images (format, header, structure), "
        "off the event loop and apart from asyncio's default executor (DNS lookups); "
        "unset: the CPU limit (the cgroup's cpu.max quota, else the CPUs the process may "
        "run on).",
    )
    max_queued_image_checks: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="Images waiting for an image-check thread, all tenants together; past "
        "it calls get RESOURCE_EXHAUSTED (IMAGE_CHECKS_BUSY) at once, with a retry delay, "
        "so images that are slow to check queue a bounded amount of work.",
    )
    max_message_bytes: int = Field(
        64 * MIB,
        ge=MIB,
        le=GRPC_MAX_MESSAGE_BYTES,
        description="Largest gRPC message the gateway receives or sends; larger ones are "
        "refused by gRPC itself with RESOURCE_EXHAUSTED.",
    )
    max_images_per_batch_request: int = Field(
        16, ge=1, le=1024, description="Most images in one BatchAnalyze call."
    )
    max_stream_in_flight: int = Field(
        32,
        ge=1,
        le=4096,
        description="Most requests of one StreamAnalyze call read but not yet answered; the "
        "gateway stops reading the stream until one is answered (flow control).",
    )
    max_stream_requests: int = Field(
        100_000,
        ge=1,
        le=2**31 - 1,
        description="Most requests one StreamAnalyze call may carry. The gateway answers "
        "the requests it has read, then ends the call with RESOURCE_EXHAUSTED "
        "(STREAM_TOO_LONG); the caller opens a new stream (which may land on another "
        "gateway replica).",
    )
    max_stream_duration_seconds: float = Field(
        3600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Longest a StreamAnalyze call may stay open: idle, busy, or blocked on "
        "a caller that stops reading answers. Past it the call ends at once with "
        "RESOURCE_EXHAUSTED (STREAM_TOO_LONG); requests not answered by then are not served.",
    )
    request_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="Deadline of each ensemble call to Triton."
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, le=3600, description="On SIGTERM, how long in-flight calls may finish."
    )
    health_check_interval_seconds: float = Field(
        1.0,
        gt=0,
        le=300,
        description="How often the gateway checks Triton's readiness and the served "
        "taxonomy hash for the health service.",
    )
    taxonomy_file: Path | None = Field(
        None,
        description="Taxonomy YAML (default: the packaged one) decoded with until Triton is "
        "reached, and with a repository whose ensemble does not publish its tagger's "
        "taxonomy (its hash must then match the served tagger's); otherwise the gateway "
        "decodes with the taxonomy the served ensemble publishes.",
    )
    search_index_dir: Path | None = Field(
        None,
        description="The folder of search index versions SearchSimilar serves: "
        "`<model repository>/embedder/search_index`, as `fashionserve catalog build` writes "
        "it (the pinned version, else the newest). Unset: SearchSimilar answers "
        "FAILED_PRECONDITION (NO_SEARCH_INDEX).",
    )
    search_index_check_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often the gateway looks for a newly published or pinned search "
        "index version (loaded without a restart).",
    )
    max_search_k: int = Field(
        100,
        ge=1,
        le=10_000,
        description="The most matches one SearchSimilar call may ask for (its k).",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log line format. `json` lines carry the request id, tenant, trace id "
        "and span id of the request being served.",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics over HTTP at /metrics on this port, on the "
        "host of listen_address; 0 picks a free port. Off (null) by default: the port must "
        "not collide with another process, and the metrics name tenants, so a deployment "
        "opens it deliberately (the Helm chart does with gateway.metrics.enabled).",
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^https?://[^\s/]+/?$",
        description="OpenTelemetry collector to export traces to over OTLP/gRPC, e.g. "
        "http://otel-collector:4317 (http:// plaintext, https:// TLS). Unset: the standard "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, else no export "
        "(the caller's traceparent is still passed on to Triton).",
    )
    jwks_file: Path | None = Field(
        None,
        description="JWKS (JSON) of the public keys that sign bearer tokens (metadata "
        "'authorization: Bearer <jwt>', RS256 or ES256); re-read when it changes. Unset: "
        "no JWT auth. Needs jwt_issuer and jwt_audience.",
    )
    jwt_issuer: str | None = Field(
        None, min_length=1, description="Required 'iss' claim of bearer tokens."
    )
    jwt_audience: str | None = Field(
        None, min_length=1, description="Required 'aud' claim of bearer tokens (this gateway)."
    )
    jwt_leeway_seconds: float = Field(
        30.0, ge=0, le=600, description="Clock skew allowed when checking 'exp' and 'nbf'."
    )
    jwt_tenant_claim: str = Field(
        "tenant",
        min_length=1,
        description="Claim naming the caller's tenant; a token without it, or whose tenant "
        "is not 1-64 of A-Z a-z 0-9 . _ -, is refused.",
    )
    jwt_max_lifetime_seconds: float = Field(
        86400.0,
        gt=0,
        description="Longest lifetime of a bearer token ('exp' minus 'iat', or minus now "
        "without 'iat'); a longer-lived token is refused, so a stolen one is not good for "
        "years.",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain): serve TLS. Needs tls_key_file."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle: require every client to present a certificate it "
        "signed (mutual TLS). Needs tls_cert_file. The api_keys_file's 'certificates' "
        "entries map a client certificate (CN, DNS or URI SAN) to a tenant and scopes.",
    )
    tenant_quota: TenantQuota = Field(
        TenantQuota(),
        description="Default quota of every tenant (token bucket and concurrency, in images).",
    )
    tenant_quotas: dict[str, TenantQuotaOverride] = Field(
        default_factory=dict,
        description="Per-tenant exceptions to tenant_quota, by tenant name, e.g. "
        "{acme: {images_per_second: 2000, burst_images: 4000}}.",
    )
    quota_backend_url: str | None = Field(
        None,
        max_length=2048,
        pattern=r"^rediss?://(?:[^:@/\s]*@)?[^:@/\s]+(?::\d{1,5})?(?:/\d{1,5})?$",
        description="Redis or Valkey server that keeps the tenant quotas (token buckets and "
        "images in flight) for every gateway replica together, so a tenant's limit does not "
        "multiply with the replicas: redis://host:port[/db] (plaintext) or rediss://... "
        "(TLS), a user name allowed, the password never (quota_backend_password_file). "
        "Unset: each gateway keeps its own quotas in memory. Stream counts and the "
        "gateway-wide bounds (max_images_in_flight...) stay per replica.",
    )
    quota_backend_password_file: Path | None = Field(
        None,
        description="File holding the quota backend's password (a mounted secret); read at "
        "start, never logged. Unset: no password.",
    )
    quota_backend_failure_policy: Literal["open", "closed"] = Field(
        "open",
        description="What a call gets while the quota backend cannot be reached (an error, or "
        "no answer within quota_backend_timeout_seconds; the backend is then tried again "
        "after a second): `open` admits it against this replica's own in-memory quotas (a "
        "tenant may then get its limit once per replica), `closed` refuses it with "
        "UNAVAILABLE (QUOTA_BACKEND_UNAVAILABLE). Each failure counts in "
        "fashionserve_quota_backend_errors_total.",
    )
    quota_backend_timeout_seconds: float = Field(
        0.5,
        gt=0,
        le=10,
        description="Longest a quota decision waits for the backend (connecting included) "
        "before quota_backend_failure_policy applies.",
    )
    quota_backend_lease_seconds: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="The backend counts a call's images in flight under a lease the gateway "
        "renews every third of this while the call runs: the images of a gateway that dies "
        "are freed this long after its last renewal.",
    )
    max_images_in_flight: int = Field(
        default_factory=lambda data: _fitting(data, "max_image_bytes"),
        ge=1,
        le=1_000_000,
        description="Images being served at once, all tenants together; past it calls get "
        "RESOURCE_EXHAUSTED (GATEWAY_OVERLOADED) at once. Default: as many images of "
        "max_image_bytes as fit half of memory_limit_bytes, at most 1024.",
    )
    max_queued_images: int = Field(
        512,
        ge=1,
        le=1_000_000,
        description="Images waiting for a batch slot, all tenants together; past it calls get "
        "RESOURCE_EXHAUSTED (GATEWAY_OVERLOADED) at once instead of queueing.",
    )
    max_concurrent_rpcs: int = Field(
        default_factory=lambda data: _fitting(data, "max_message_bytes"),
        ge=1,
        le=1_000_000,
        description="Calls of the analysis service (a stream counts once) open at once; "
        "more are refused with RESOURCE_EXHAUSTED (TOO_MANY_CALLS). Health and reflection "
        "calls have budgets of their own. Default: as many messages of max_message_bytes as "
        "fit half of memory_limit_bytes, at most 1024.",
    )
    max_anonymous_streams: int = Field(
        16,
        ge=1,
        le=10_000,
        description="Health Watch and reflection streams (they need no credentials) open at "
        "once on each port; more are refused with RESOURCE_EXHAUSTED (TOO_MANY_CALLS). A budget "
        "of their own, so that anonymous streams never take the slots of max_concurrent_rpcs "
        "or of health checks.",
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve grpc.health.v1 alone on this port, on the host of "
        "listen_address: plaintext, no credentials, a call budget of its own, so that callers "
        "of the main port can never starve the readiness probe, and a Kubernetes gRPC probe "
        "works when the main port serves TLS. 0 picks a free port; unset: health only on "
        "the main port.",
    )
    reflection_enabled: bool = Field(
        True,
        description="Serve gRPC reflection on the main port (buf curl and grpcurl discover "
        "the API through it, without credentials). Turn off in production.",
    )
    max_streams_per_connection: int = Field(
        1024,
        ge=1,
        le=100_000,
        description="HTTP/2 streams (calls) one connection may have open at once "
        "(grpc.max_concurrent_streams). A client past it waits for a free stream, but a call "
        "it starts as one closes can be refused (UNAVAILABLE, REFUSED_STREAM) unless it "
        "retries transparently: keep it above the calls one client keeps in flight.",
    )
    max_streams_per_tenant: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="StreamAnalyze calls one tenant may have open at once; more are refused "
        "with RESOURCE_EXHAUSTED (TENANT_STREAM_LIMITED), so one tenant's open streams "
        "cannot take every call slot.",
    )
    stream_idle_timeout_seconds: float = Field(
        300.0,
        gt=0,
        le=7 * 24 * 3600,
        description="A StreamAnalyze call whose caller sends no request for this long, while "
        "the gateway waits for one, is ended after its answers with RESOURCE_EXHAUSTED "
        "(STREAM_IDLE).",
    )
    keepalive_time_seconds: float = Field(
        60.0,
        gt=0,
        le=24 * 3600,
        description="The gateway pings a connection that has been silent this long "
        "(grpc.keepalive_time_ms), and closes it when the ping goes unanswered for "
        "keepalive_timeout_seconds.",
    )
    keepalive_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=3600,
        description="How long a keepalive ping may go unanswered before the connection and "
        "its calls are closed (grpc.keepalive_timeout_ms): dead peers are reaped.",
    )
    min_client_ping_interval_seconds: float = Field(
        30.0,
        gt=0,
        le=24 * 3600,
        description="Shortest interval between a client's keepalive pings "
        "(grpc.http2.min_recv_ping_interval_without_data_ms); a client that pings more "
        "often is disconnected (GOAWAY too_many_pings). The client library pings every 60 s.",
    )
    max_connection_idle_seconds: float = Field(
        300.0,
        gt=0,
        le=7 * 24 * 3600,
        description="A connection with no call for this long is closed "
        "(grpc.max_connection_idle_ms); clients reconnect when they next call.",
    )
    max_connection_age_seconds: float = Field(
        3600.0,
        gt=0,
        le=30 * 24 * 3600,
        description="A connection older than this is asked to go away "
        "(grpc.max_connection_age_ms): clients reconnect, which spreads them over new "
        "replicas.",
    )
    max_connection_age_grace_seconds: float = Field(
        600.0,
        ge=0,
        le=30 * 24 * 3600,
        description="How long calls open on a connection past max_connection_age_seconds "
        "may finish before it is closed (grpc.max_connection_age_grace_ms).",
    )
    capture: CaptureSettings = Field(
        CaptureSettings(),
        description="Sampling of served results into Parquet files for active learning; "
        "off unless capture.directory is set.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init arguments) over the YAML file over the environment."""
        yaml_source = InitSettingsSource(settings_cls, init_kwargs=_yaml_layer.get() or {})
        return (init_settings, yaml_source, env_settings)

    @field_validator("listen_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not _ADDRESS.match(value) or int(value.rsplit(":", 1)[1]) > 65535:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @field_validator("triton_urls")
    @classmethod
    def _triton_targets(cls, values: list[str]) -> list[str]:
        for value in values:
            address = value.removeprefix(DNS_SCHEME)
            if not _ADDRESS.match(address) or not 0 < int(address.rsplit(":", 1)[1]) <= 65535:
                raise ValueError(f"expected host:port or dns:///host:port, got {value!r}")
        if len(set(values)) != len(values):
            raise ValueError("an address is listed twice")
        return values

    @field_validator("quota_backend_url", mode="before")
    @classmethod
    def _no_password_in_url(cls, value: Any) -> Any:
        # Checked before the pattern, whose error would quote the URL, password and all.
        if isinstance(value, str) and re.match(r"^[a-z]+://[^@/]*:[^@/]*@", value):
            raise PydanticCustomError(
                "password_in_url",
                "the URL must not carry a password (it would be in the settings and the "
                "logs): put it in a file named by quota_backend_password_file",
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        if self.auth_enabled and self.api_keys_file is None and self.jwks_file is None:
            raise ValueError(
                "auth_enabled is true but neither api_keys_file nor jwks_file is set: create "
                "a key with `fashionserve keys create --id dev --file keys.yaml` and pass "
                "--api-keys-file keys.yaml (or --no-auth for local use only)"
            )
        if self.jwks_file is not None and (not self.jwt_issuer or not self.jwt_audience):
            raise ValueError("jwks_file is set: jwt_issuer and jwt_audience are required too")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.quota_backend_password_file is not None and self.quota_backend_url is None:
            raise ValueError("quota_backend_password_file is set but quota_backend_url is not")
        # A BatchAnalyze call is admitted whole or not at all, so every bound on images must
        # hold the largest one, or such a call could never pass.
        largest = self.max_images_per_batch_request
        bounds = {"max_images_in_flight": self.max_images_in_flight}
        bounds["max_queued_images"] = self.max_queued_images
        bounds["max_queued_image_checks"] = self.max_queued_image_checks
        for tenant in ("", *self.tenant_quotas):
            quota = self.quota_for(tenant) if tenant else self.tenant_quota
            where = f"tenant_quotas.{tenant}" if tenant else "tenant_quota"
            bounds[f"{where}.burst_images"] = quota.burst_images
            bounds[f"{where}.max_concurrent_images"] = quota.max_concurrent_images
        for name, value in bounds.items():
            if value < largest:
                raise ValueError(
                    f"{name} ({value}) must be at least max_images_per_batch_request "
                    f"({largest}): a batch call of that size could never be admitted"
                )
        budget = caller_budget_bytes(self.memory_limit_bytes)
        for count, size in (
            ("max_concurrent_rpcs", "max_message_bytes"),
            ("max_images_in_flight", "max_image_bytes"),
        ):
            held = getattr(self, count) * getattr(self, size)
            if held > budget:
                raise ValueError(
                    f"{count} x {size} ({getattr(self, count)} x {getattr(self, size)} bytes = "
                    f"{held // MIB} MiB) must fit {CALLER_SHARE:.0%} of the gateway's memory "
                    f"({budget // MIB} MiB of {budget / CALLER_SHARE / MIB:.0f} MiB, "
                    "memory_limit_bytes or the container's limit): lower one of them"
                )
        if self.max_message_bytes < self.max_image_bytes:
            raise ValueError(
                f"max_message_bytes ({self.max_message_bytes}) must be at least "
                f"max_image_bytes ({self.max_image_bytes}): an accepted image must fit a message"
            )
        return self

    def quota_for(self, tenant: str) -> TenantQuota:
        """``tenant``'s quota: ``tenant_quota`` with its ``tenant_quotas`` entry applied."""
        override = self.tenant_quotas.get(tenant)
        if override is None:
            return self.tenant_quota
        return self.tenant_quota.model_copy(update=override.model_dump(exclude_none=True))

    @property
    def bind_host(self) -> str:
        """The host part of :attr:`listen_address`."""
        return self.listen_address.rsplit(":", 1)[0]


def read_settings_file(path: Path) -> dict[str, Any]:
    """Parse a settings YAML file: a mapping of field names to values.

    Relative paths of files (keys, JWKS, taxonomy, TLS) are made relative to the file.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SettingsError(f"settings file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"settings file {path}: expected a mapping of setting names to values")
    for key in (
        "api_keys_file",
        "taxonomy_file",
        "jwks_file",
        "tls_cert_file",
        "tls_key_file",
        "tls_client_ca_file",
        "quota_backend_password_file",
        "search_index_dir",
    ):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[key] = str(path.parent / value)
    return data


def load_settings(config_file: Path | None = None, **flags: Any) -> GatewaySettings:
    """Build the settings from the environment, the YAML file, then ``flags``.

    ``config_file`` defaults to ``$FASHIONSERVE_GATEWAY_CONFIG``. Flags whose value is
    None are treated as not given. Raises :class:`SettingsError` for an unreadable file and
    ``pydantic.ValidationError`` for invalid values (each names the field).
    """
    if config_file is None and os.environ.get(CONFIG_ENV):
        config_file = Path(os.environ[CONFIG_ENV])
    layer = read_settings_file(config_file) if config_file is not None else {}
    token = _yaml_layer.set(layer)
    try:
        return GatewaySettings(**{k: v for k, v in flags.items() if v is not None})
    finally:
        _yaml_layer.reset(token)
