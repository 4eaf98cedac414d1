"""Model versions in a repository: list, roll out, pin, roll back, prune.

``fashionserve export`` publishes a new numbered version; nothing changes in what Triton
serves until the version is rolled out here. The served version of each model is the one
the ensemble calls (its steps name exact versions, see :mod:`fashionserve.model_repository.build`);
a build serves the pinned version (``pinned.json``) if any, else the newest (the rules live in
:mod:`fashionserve.repository`).

A change of served version rebuilds the repository with the settings it was built with
(recorded in the ensemble's config) and, given Triton addresses (Tritons started with
``--model-control-mode=explicit``, all reading this repository), switches the running
servers with no failed call:

1. the model's config loads the old and the new version side by side; every Triton loads
   the new one while the old keeps serving;
2. the ensemble's config calls the new version; reloading it is the atomic switch of one
   Triton (requests already inside the old ensemble finish on the old version), done on
   every Triton in turn;
3. after ``drain_seconds`` (longer than a request takes), the model's config loads only
   the new version, and every Triton unloads the old.

An address ``dns:///host:port`` stands for every address the name resolves to (a
Kubernetes headless Service lists its ready pods that way), resolved when the rollout
starts and again at its end: a Triton that appeared meanwhile loads the final configs.
If a Triton fails step 1 or 2, the ones already changed are put back (configs first, then
each reloaded) and the rollout stops with an error naming the Triton: every server serves
the old version again, and :class:`Switch` lists what each one did.

Before any switch the taxonomy compatibility check (:mod:`fashionserve.taxonomy_compat`) compares
the served version with the new one and refuses removals and renames unless forced.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fashionserve import search_index
from fashionserve.ensemble import EMBEDDER, MODEL_KINDS, MODEL_NAME, TAGGER, TAGGER_OUTPUT
from fashionserve.errors import ErrorKind
from fashionserve.model_repository.build import build_repository
from fashionserve.model_repository.exported import model_version
from fashionserve.model_repository.settings import RepositorySettings, stored_settings
from fashionserve.repository import (
    RepositoryError,
    ensemble_versions,
    published_versions,
    read_config,
    read_manifest,
    read_pin,
    recorded_taxonomy,
    served_version,
    version_to_serve,
    write_pin,
)
from fashionserve.taxonomy_compat import TaxonomyChanges, check_compatible

log = logging.getLogger(__name__)
# Requests inside the old ensemble when it is switched get this long to finish before the
# old version is unloaded: more than the gateway's default request timeout would be safest,
# a few seconds covers the pipeline's own latency.
DEFAULT_DRAIN_SECONDS = 5.0
# How long a Triton may take to serve the ensemble again after a load.
READY_TIMEOUT_SECONDS = 60.0
# The gateway's syntax for "every address of this name" (its triton_urls setting); the
# gateway's resolver is a layer above this one, hence this synchronous twin.
DNS_SCHEME = "dns:///"


@dataclass(frozen=True)
class VersionInfo:
    """One published version and what its manifest says about it."""

    model: str
    version: int
    served: bool
    pinned: bool
    created: str = ""
    checkpoint_sha256: str = ""
    taxonomy_version: str = ""
    taxonomy_hash: str = ""
    artifacts: tuple[str, ...] = ()
    parity_passed: bool | None = None
    engines: tuple[str, ...] = ()  # compute capabilities with an engine

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "version": self.version,
            "served": self.served,
            "pinned": self.pinned,
            "created": self.created,
            "checkpoint_sha256": self.checkpoint_sha256,
            "taxonomy_version": self.taxonomy_version,
            "taxonomy_hash": self.taxonomy_hash,
            "artifacts": list(self.artifacts),
            "parity_passed": self.parity_passed,
            "tensorrt_engines": list(self.engines),
        }


@dataclass
class Switch:
    """What a rollout, pin or rollback did; ``replicas``: each Triton switched, in order."""

    model: str
    old: int | None
    new: int
    changes: TaxonomyChanges | None
    applied_to_triton: bool
    replicas: tuple[str, ...] = field(default_factory=tuple)


def list_versions(repo: Path, model: str) -> list[VersionInfo]:
    """Every published version of ``model``, oldest first, with its manifest summary."""
    model_dir = _model_dir(repo, model)
    served = served_version(model_dir)
    pinned = read_pin(model_dir)
    infos = []
    for version in published_versions(model_dir):
        manifest = read_manifest(model_dir / str(version))
        if manifest is None:
            infos.append(VersionInfo(model, version, version == served, version == pinned))
            continue
        taxonomy, source = manifest.taxonomy, manifest.source_checkpoint
        infos.append(
            VersionInfo(
                model=model,
                version=version,
                served=version == served,
                pinned=version == pinned,
                created=manifest.created,
                checkpoint_sha256=source.sha256 if source is not None else "",
                taxonomy_version=taxonomy.version if taxonomy is not None else "",
                taxonomy_hash=taxonomy.hash if taxonomy is not None else "",
                artifacts=tuple(sorted(manifest.artifacts)),
                parity_passed=manifest.parity_passed,
                engines=tuple(e.compute_capability for e in manifest.engines),
            )
        )
    return infos


def to_serve(repo: Path, model: str) -> int:
    """The version of ``model`` a build of the repository serves: the pinned one, else the
    newest (what an engine build must build before a rollout serves it)."""
    version = version_to_serve(_model_dir(repo, model))
    if version is None:
        raise RepositoryError(f"{model} has no published version in {repo}")
    return version


def format_versions(infos: list[VersionInfo]) -> str:
    """A table of :func:`list_versions`."""
    header = ("model", "version", "state", "created", "checkpoint", "taxonomy", "parity", "engines")
    rows = [
        (
            i.model,
            str(i.version),
            ",".join(s for s, on in (("served", i.served), ("pinned", i.pinned)) if on) or "-",
            i.created or "-",
            i.checkpoint_sha256[:12] or "-",
            f"{i.taxonomy_version or '?'} ({i.taxonomy_hash[:12] or '-'})",
            {True: "pass", False: "FAIL", None: "-"}[i.parity_passed],
            ",".join(i.engines) or "-",
        )
        for i in infos
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


# ------------------------------------------------------------------------- switching
def rollout(
    repo: Path,
    model: str,
    version: int | None = None,
    *,
    pin: bool = False,
    force: bool = False,
    tritons: Sequence[str] = (),
    triton_headers: Mapping[str, str] | None = None,
    drain_seconds: float = DEFAULT_DRAIN_SECONDS,
    echo: Callable[[str], None] | None = None,
) -> Switch:
    """Serve ``version`` of ``model`` (default: the newest). ``pin`` fixes it (a later
    ``repo build`` keeps it); without ``pin`` any pin is removed, so ``version`` must be
    the newest. Refuses a taxonomy that breaks callers of the served version unless
    ``force``. With ``tritons`` (``host:port`` or ``dns:///host:port``), switches every one
    of those running Tritons as well (three steps, see the module docstring), sending
    ``triton_headers`` with each load (Triton's restricted-protocol key)."""
    repo = Path(repo)
    say = echo or (lambda _line: None)
    headers = dict(triton_headers or {})
    model_dir = _model_dir(repo, model)
    published = published_versions(model_dir)
    newest = max(published, default=None)
    target = newest if version is None else version
    if target is None or target not in published:
        raise RepositoryError(
            f"{model} has no version {target} (published: {', '.join(map(str, published)) or 'none'})"
        )
    if not pin and target != newest:
        raise RepositoryError(
            f"{model} version {target} is not the newest ({newest}): pin it to serve it"
        )
    old = served_version(model_dir)
    changes = None
    if old is not None and old != target:
        changes = check_compatible(
            model,
            old,
            recorded_taxonomy(model_dir, old),
            recorded_taxonomy(model_dir, target),
            force=force,
        )
        if changes is not None:
            say(f"{model} {old} -> {target}, taxonomy:\n{changes.summary()}")
        shapes = io_changes(repo, model, old, target)
        if shapes and tritons:
            # One config serves both versions during a live switch (step 1).
            raise RepositoryError(
                f"{model} {old} -> {target} changes {'; '.join(shapes)}: the two versions "
                "cannot be loaded side by side, so it cannot be switched live; roll it out "
                "without --triton and restart Triton"
            )

    settings = stored_settings(repo)
    addresses = resolve_tritons(tritons)
    live = bool(addresses) and old is not None and old != target
    if live:
        assert old is not None
        _switch_live(repo, model, old, target, settings, addresses, headers, drain_seconds, say)
    write_pin(model_dir, target if pin else None)
    build_repository(repo, settings)
    switched: list[str] = []
    if tritons:
        # Resolved again: a Triton that started during the rollout read configs of a step
        # in between, and loads the final ones as a whole. The others, after a live switch,
        # only unload the old version (their ensemble is unchanged since step 2).
        for address in resolve_tritons(tritons):
            fresh = not live or address not in addresses
            _load(address, [model, MODEL_NAME] if fresh else [model], headers)
            what = "loaded the repository's configs" if fresh else f"unloaded {old}"
            say(f"{address}: {what}; serving {model} {target}")
            switched.append(address)
    log.info("%s: serving version %s (was %s)%s", model, target, old, " pinned" if pin else "")
    if model == EMBEDDER and old != target:
        notice = search_index.rebuild_notice(repo, str(target))
        if notice is not None:
            log.warning("%s", notice)
            say(f"warning: {notice}")
    return Switch(model, old, target, changes, bool(tritons), tuple(switched))


def resolve_tritons(targets: Sequence[str]) -> list[str]:
    """The Triton addresses ``targets`` stand for: ``host:port`` as it is, and for
    ``dns:///host:port`` every address the name resolves to now (IPv6 in brackets)."""
    addresses: list[str] = []
    for target in targets:
        found = [target]
        if target.startswith(DNS_SCHEME):
            host, _, port = target.removeprefix(DNS_SCHEME).rpartition(":")
            try:
                infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            except (OSError, ValueError) as exc:
                raise RepositoryError(f"cannot resolve the Tritons of {target}: {exc}") from exc
            found = sorted(
                {
                    f"[{info[4][0]}]:{port}"
                    if info[0] == socket.AF_INET6
                    else f"{info[4][0]}:{port}"
                    for info in infos
                }
            )
        addresses.extend(a for a in found if a not in addresses)
    return addresses


def io_changes(repo: Path, model: str, old: int, new: int) -> list[str]:
    """The inputs and outputs whose shape or type differ between two versions (the
    tagger's logit width aside: it follows the taxonomy and its config leaves it open)."""
    a, b = model_version(repo, model, old), model_version(repo, model, new)
    changed = []
    for kind, before, after in (("input", a.inputs, b.inputs), ("output", a.outputs, b.outputs)):
        old_specs = {s.name: s for s in before}
        for spec in after:
            prev = old_specs.get(spec.name)
            if model == TAGGER and spec.name == TAGGER_OUTPUT:
                continue
            if prev != spec:
                was = f"{list(prev.dims)} {prev.data_type}" if prev else "absent"
                changed.append(f"{kind} {spec.name}: {was} -> {list(spec.dims)} {spec.data_type}")
    return changed


def rollback(
    repo: Path,
    model: str,
    *,
    force: bool = False,
    tritons: Sequence[str] = (),
    triton_headers: Mapping[str, str] | None = None,
    drain_seconds: float = DEFAULT_DRAIN_SECONDS,
    echo: Callable[[str], None] | None = None,
) -> Switch:
    """Pin the published version just before the served one."""
    model_dir = _model_dir(repo, model)
    served = served_version(model_dir)
    older = [v for v in published_versions(model_dir) if served is not None and v < served]
    if not older:
        raise RepositoryError(f"{model} has no version older than the served one ({served})")
    return rollout(
        repo,
        model,
        max(older),
        pin=True,
        force=force,
        tritons=tritons,
        triton_headers=triton_headers,
        drain_seconds=drain_seconds,
        echo=echo,
    )


def prune(repo: Path, model: str, keep: int) -> list[int]:
    """Remove all but the newest ``keep`` versions, never the served or the pinned one;
    returns the removed versions."""
    if keep < 1:
        raise RepositoryError(
            f"--keep must be at least 1 (got {keep})", kind=ErrorKind.INVALID_ARGUMENT
        )
    model_dir = _model_dir(repo, model)
    versions = published_versions(model_dir)
    protected = {served_version(model_dir), read_pin(model_dir)}
    keep_set = set(versions[-keep:]) | {v for v in protected if v is not None}
    removed = []
    for version in versions:
        if version in keep_set:
            continue
        # Renamed out of the repository's view first (not a number: Triton ignores it),
        # then deleted: a crash half-way never leaves a half-deleted version.
        doomed = model_dir / f".pruned-{version}"
        (model_dir / str(version)).rename(doomed)
        shutil.rmtree(doomed)
        removed.append(version)
    return removed


def _switch_live(
    repo: Path,
    model: str,
    old: int,
    new: int,
    settings: RepositorySettings,
    addresses: list[str],
    headers: dict[str, str],
    drain_seconds: float,
    say: Callable[[str], None],
) -> None:
    current = ensemble_versions(repo)
    before, after = {**current, model: old}, {**current, model: new}
    # 1. both versions loaded everywhere, every ensemble still calling the old one
    build_repository(repo, settings, versions=before, also_load={model: [new]})
    done, failure = _load_each(
        addresses, [model], headers, say, f"{model} {new} loaded beside {old}"
    )
    if failure is not None:
        # Triton keeps serving what it had when a load fails; the configs go back as they
        # were, and the Tritons that loaded the new version unload it.
        build_repository(repo, settings, versions=before)
        undone = _put_back(done, [model], headers, say, f"{model} {new} unloaded")
        raise RepositoryError(
            f"{model} {old} -> {new} stopped at step 1 (load beside): {failure}; "
            f"{undone}; every Triton serves {model} {old}"
        ) from failure
    # 2. each ensemble calls the new one: the atomic switch of each Triton, one by one
    build_repository(repo, settings, versions=after, also_load={model: [old]})
    done, failure = _load_each(
        addresses, [MODEL_NAME], headers, say, f"ensemble switched to {model} {new}"
    )
    if failure is not None:
        build_repository(repo, settings, versions=before, also_load={model: [new]})
        undone = _put_back(done, [MODEL_NAME], headers, say, f"ensemble back on {model} {old}")
        build_repository(repo, settings, versions=before)
        unloaded = _put_back(addresses, [model], headers, say, f"{model} {new} unloaded")
        raise RepositoryError(
            f"{model} {old} -> {new} stopped at step 2 (switch): {failure}; {undone}; "
            f"{unloaded}; every Triton serves {model} {old}"
        ) from failure
    # 3. requests that entered an old ensemble finish; then the old version goes
    time.sleep(drain_seconds)


def _load_each(
    addresses: list[str],
    models: list[str],
    headers: dict[str, str],
    say: Callable[[str], None],
    what: str,
) -> tuple[list[str], RepositoryError | None]:
    """(Re)load ``models`` on each Triton in turn, stopping at the first that fails: the
    addresses done, and that failure."""
    done: list[str] = []
    for address in addresses:
        try:
            _load(address, models, headers)
        except RepositoryError as exc:
            say(f"{address}: FAILED: {exc}")
            return done, exc
        say(f"{address}: {what}")
        done.append(address)
    return done, None


def _put_back(
    addresses: list[str],
    models: list[str],
    headers: dict[str, str],
    say: Callable[[str], None],
    what: str,
) -> str:
    """Reload ``models`` on every one of ``addresses`` with the restored configs, going on
    past failures; a sentence saying how it went."""
    failed = []
    for address in addresses:
        try:
            _load(address, models, headers)
            say(f"{address}: {what}")
        except RepositoryError as exc:
            say(f"{address}: FAILED to put back: {exc}")
            failed.append(address)
    if failed:
        return f"put back on {len(addresses) - len(failed)} Triton(s), NOT on {', '.join(failed)}"
    return f"{what} on the {len(addresses)} Triton(s) already changed"


def _load(triton_url: str, models: list[str], headers: dict[str, str]) -> None:
    """(Re)load models in a Triton running with ``--model-control-mode=explicit``."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        for name in models:
            client.load_model(name, headers=headers or None)
        # Reloading a step also reloads the ensemble that calls it, which is not ready for
        # a second or two after load_model returns: a step is done when the ensemble serves.
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not client.is_model_ready(MODEL_NAME):
            if time.monotonic() > deadline:
                raise RepositoryError(
                    f"Triton at {triton_url}: {MODEL_NAME} not ready "
                    f"{READY_TIMEOUT_SECONDS:.0f} s after loading {', '.join(models)}"
                )
            time.sleep(0.2)
    except InferenceServerException as exc:
        raise RepositoryError(
            f"Triton at {triton_url} did not load {name}: {exc.message() or exc} (it must run "
            "with --model-control-mode=explicit, and with the admin key if its "
            "model-repository protocol is restricted)"
        ) from exc
    finally:
        client.close()


def _model_dir(repo: Path, model: str) -> Path:
    if model not in MODEL_KINDS:
        raise RepositoryError(
            f"unknown model {model!r}: versions exist for {', '.join(MODEL_KINDS)}",
            kind=ErrorKind.INVALID_ARGUMENT,
        )
    model_dir = Path(repo) / model
    if not model_dir.is_dir() or (
        read_config(model_dir) is None and not published_versions(model_dir)
    ):
        raise RepositoryError(f"{model_dir} holds no published version")
    return model_dir
