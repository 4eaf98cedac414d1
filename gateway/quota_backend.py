"""Tenant quotas shared by every gateway replica, on a Redis or Valkey server.

Each tenant has two keys, in one hash slot (``{tenant}``, so a Redis Cluster works too):

* ``fashionserve:quota:{<tenant>}:state``, a hash: the token bucket (``tokens``, ``ts`` in
  ms), the images in flight (``held``) and the images of each lease (``lease:<id>``);
* ``fashionserve:quota:{<tenant>}:leases``, a sorted set of lease ids scored by the time
  they expire (ms).

A call's images are held under a lease that its gateway renews while the call runs. A
gateway that dies stops renewing: its leases expire, and the next admission of that tenant
frees their images. Every decision is one Lua script, run atomically by the server on the
server's clock (``TIME``), so replicas need neither locks nor synchronised clocks. The
scripts are loaded once and called by their SHA (EVALSHA; loaded again if the server
restarts). Idle tenants' keys expire once their bucket would be full again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import valkey.asyncio as valkey
from valkey.exceptions import ValkeyError

from fashionserve.gateway.quota_store import QuotaBackendError, Refusal, TenantStore
from fashionserve.gateway.settings import GatewaySettings, SettingsError, TenantQuota

log = logging.getLogger(__name__)

# Connections a gateway opens to the backend at most; a call waits for a free one within
# its timeout.
MAX_CONNECTIONS = 32

# The server's clock in ms, and the images of expired leases (gateways that died) freed.
_PRELUDE = """
local state, leases = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local held = tonumber(redis.call('HGET', state, 'held')) or 0
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
for _, id in ipairs(expired) do
  held = held - (tonumber(redis.call('HGET', state, 'lease:' .. id)) or 0)
  redis.call('HDEL', state, 'lease:' .. id)
end
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
end
held = math.max(0, held)
"""

# ARGV: images per second, burst, max concurrent images, images, lease id, lease ms.
# Returns {0 admitted | 1 concurrency refused | 2 rate refused, held, wait seconds}.
ACQUIRE = (
    _PRELUDE
    + """
local rate, burst, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local images, lease, lease_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local tokens = tonumber(redis.call('HGET', state, 'tokens')) or burst
local ts = tonumber(redis.call('HGET', state, 'ts')) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
ts = math.max(ts, now)
local code, wait = 0, 0
if held + images > limit then
  code = 1
elseif tokens < images then
  code, wait = 2, (images - tokens) / rate
else
  tokens, held = tokens - images, held + images
  redis.call('HSET', state, 'lease:' .. lease, images)
  redis.call('ZADD', leases, now + lease_ms, lease)
end
redis.call('HSET', state, 'tokens', tokens, 'ts', ts, 'held', held)
-- Kept until the bucket is full again and every lease has expired; a week at most (PEXPIRE
-- takes no more than 64 bits of ms, which a rate near zero would pass).
local ttl = math.min(math.ceil((burst - tokens) / rate * 1000) + lease_ms, 604800000)
redis.call('PEXPIRE', state, ttl)
redis.call('PEXPIRE', leases, ttl)
return {code, held, tostring(wait)}
"""
)

# ARGV: lease id. Frees its images unless it has expired already (then they were freed).
RELEASE = """
local state, leases = KEYS[1], KEYS[2]
if redis.call('ZREM', leases, ARGV[1]) == 1 and redis.call('EXISTS', state) == 1 then
  local images = tonumber(redis.call('HGET', state, 'lease:' .. ARGV[1])) or 0
  redis.call('HDEL', state, 'lease:' .. ARGV[1])
  local held = tonumber(redis.call('HGET', state, 'held')) or 0
  redis.call('HSET', state, 'held', math.max(0, held - images))
end
return 0
"""

# ARGV: lease ms, then the lease ids still held. Returns how many were renewed (a lease
# already swept as expired stays gone: its images were freed).
RENEW = """
local state, leases = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease_ms = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, now + lease_ms, ARGV[i])
    renewed = renewed + 1
  end
end
if renewed > 0 then
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < lease_ms then
      redis.call('PEXPIRE', key, lease_ms)
    end
  end
end
return renewed
"""

# What a failed or unanswered backend call raises: the client's errors (connection,
# timeout, a refused command), the socket's, and asyncio.timeout's.
_FAILURES = (ValkeyError, OSError, TimeoutError)


def quota_keys(tenant: str) -> tuple[str, str]:
    """The tenant's state hash and lease set (same hash slot)."""
    prefix = f"fashionserve:quota:{{{tenant}}}"
    return f"{prefix}:state", f"{prefix}:leases"


def read_password(path: Path | None) -> str | None:
    """The password in ``path`` (a mounted secret; its trailing newline dropped)."""
    if path is None:
        return None
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(
            f"cannot read quota_backend_password_file {path}: {exc.strerror}"
        ) from exc


class SharedTenantStore(TenantStore):
    """Tenant quotas on a Redis/Valkey server, shared by every gateway that uses it.

    ``on_renew_error`` is told when renewing the leases fails (they may then expire while
    their calls run: the tenant is briefly let in for more, never less)."""

    def __init__(
        self,
        client: valkey.Valkey,
        timeout_seconds: float,
        lease_seconds: float,
        on_renew_error: Callable[[Exception], None],
    ) -> None:
        self._client = client
        self._timeout = timeout_seconds
        self._lease_ms = round(lease_seconds * 1000)
        self._on_renew_error = on_renew_error
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._leases: dict[str, str] = {}  # lease id -> tenant, while its call runs
        self._renewer: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, on_renew_error: Callable[[Exception], None]
    ) -> SharedTenantStore:
        """The store at ``quota_backend_url``, with the password of its file."""
        assert settings.quota_backend_url is not None
        timeout = settings.quota_backend_timeout_seconds
        pool = valkey.BlockingConnectionPool.from_url(
            settings.quota_backend_url,
            password=read_password(settings.quota_backend_password_file),
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        client = valkey.Valkey(connection_pool=pool)
        return cls(client, timeout, settings.quota_backend_lease_seconds, on_renew_error)

    async def _call(self, script: Any, tenant: str, *args: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await script(keys=quota_keys(tenant), args=args)
        except _FAILURES as exc:
            raise QuotaBackendError(
                str(exc) or f"no answer within {self._timeout:g} s ({type(exc).__name__})"
            ) from exc

    async def acquire(self, tenant: str, quota: TenantQuota, images: int) -> str | Refusal:
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="quota-lease-renewal"
            )
        lease = uuid.uuid4().hex
        code, held, wait = await self._call(
            self._acquire,
            tenant,
            quota.images_per_second,
            quota.burst_images,
            quota.max_concurrent_images,
            images,
            lease,
            self._lease_ms,
        )
        if code == 1:
            return Refusal("max_concurrent_images", int(held))
        if code == 2:
            return Refusal("images_per_second", int(held), float(wait))
        self._leases[lease] = tenant
        return lease

    async def release(self, tenant: str, images: int, lease: str) -> None:
        self._leases.pop(lease, None)
        await self._call(self._release, tenant, lease)

    async def renew(self) -> None:
        """Renew every lease this gateway holds (one script per tenant)."""
        by_tenant: defaultdict[str, list[str]] = defaultdict(list)
        for lease, tenant in self._leases.items():
            by_tenant[tenant].append(lease)
        for tenant, leases in by_tenant.items():
            await self._call(self._renew, tenant, self._lease_ms, *leases)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                await self.renew()
            except QuotaBackendError as exc:
                self._on_renew_error(exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._client.aclose(close_connection_pool=True)
