"""The model commands: ``data synth``, ``train``, ``export``, ``repo``, ``triton``, ``evaluate``,
``calibrate``.

From a synthetic data set to checkpoints, to published versions in a Triton model
repository, to Triton serving them, to quality measured through what is served. Each
handler calls one function of the component that does the work; heavy imports (PyTorch,
ONNX) happen only in the commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from fashionserve.cli.command import add_command, add_group
from fashionserve.clients import security
from fashionserve.data.catalog import TRENDS
from fashionserve.ensemble import MODEL_KINDS

# Where `repo versions rollout|pin|rollback --triton-admin-header` reads the key of Triton's
# restricted model-repository protocol (an environment variable: never on a command line).
TRITON_ADMIN_KEY_ENV = "FASHIONSERVE_TRITON_ADMIN_KEY"


def add_commands(subparsers: Any) -> None:
    """Add the model commands to the ``fashionserve`` command line."""
    data = add_group(subparsers, "data", "synthetic data")
    p = add_command(data, "synth", _synth, "render the seeded synthetic garment data set")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--images", type=int, default=6000, help="images in the train split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taxonomy", type=Path, help="taxonomy YAML (default: the packaged one)")
    p.add_argument(
        "--splits",
        type=lambda v: tuple(s for s in v.split(",") if s),
        help="comma-separated splits to write (default: all); e.g. val,test for a "
        "calibration set of new products without rendering train",
    )
    p.add_argument(
        "--trend",
        choices=sorted(TRENDS),
        help="draw the products with a trend's sleeve priors: a style the demo models "
        "never saw (default: none)",
    )

    p = add_command(subparsers, "train", _train, "train the detector, tagger and embedder")
    p.add_argument("--data", type=Path, required=True, help="output of `data synth`")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS))
    p.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="fraction of the standard training schedule (0.05 for a smoke run)",
    )
    p.add_argument(
        "--init",
        type=Path,
        help="checkpoint directory to fine-tune from (a lower learning rate; the models not "
        "in --models are copied to --out unchanged)",
    )
    p.add_argument(
        "--extra-labels",
        type=Path,
        help="labelled COCO file of `fashionserve active select --format coco`: its garments "
        "join the tagger's (and, with a product_id, the embedder's) training",
    )

    p = add_command(
        subparsers, "export", _export, "export a checkpoint as a new model version (ONNX, engine)"
    )
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model-name", help="model name in the repository (default: its kind)")
    p.add_argument(
        "--target",
        choices=["onnx", "tensorrt"],
        default="onnx",
        help="tensorrt also builds an engine for this GPU (TensorRT Python API) and proves "
        "its parity against ONNX Runtime",
    )
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16", help="engine precision")
    p.add_argument(
        "--trtexec-command",
        action="store_true",
        help="with --target tensorrt: publish the ONNX version and print the equivalent "
        "trtexec command instead of building here (for a build job in the TensorRT image)",
    )
    p.add_argument(
        "--compute-capability",
        metavar="MAJOR.MINOR",
        help="with --trtexec-command: name the engine for this GPU type (model.smXY.plan); "
        "default model.plan",
    )
    p.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (read, extended)")
    p.add_argument(
        "--max-batch",
        type=int,
        help="top of the engine's batch profile (default: max_batch_size of the model's config)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="publish even if the taxonomy removes or renames labels of the served version",
    )

    repo = add_group(subparsers, "repo", "the Triton model repository")
    p = add_command(repo, "build", _repo_build, "add the ensemble and python steps to a repository")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--flavour", choices=["python-ort", "onnx", "tensorrt"], default="python-ort")
    p.add_argument("--max-images-per-request", type=int, default=16)
    p.add_argument("--max-crops-per-image", type=int, default=16)
    p.add_argument("--min-score", type=float, default=0.3, help="detector score floor")
    p.add_argument("--preprocess-instances", type=int, default=2)
    p.add_argument("--crop-instances", type=int, default=1)
    p.add_argument("--model-instances", type=int, default=1)
    p.add_argument("--max-queue-delay-microseconds", type=int, default=2000)
    p.add_argument(
        "--engine",
        type=_engine_file,
        action="append",
        metavar="CC=FILE",
        help="tensorrt: engine file for a compute capability (cc_model_filenames), repeatable",
    )

    versions = add_group(
        repo, "versions", "published versions: list, roll out, pin, roll back, prune"
    )
    p = add_command(versions, "list", _versions, "each version with its manifest summary")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", action="append", help="detector, tagger or embedder (repeatable)")
    p.add_argument("--json", action="store_true")
    for name, text in (
        ("rollout", "serve the newest version (removes a pin)"),
        ("pin", "serve one version and keep it until unpinned by a rollout"),
        ("rollback", "pin the version before the served one"),
    ):
        p = add_command(versions, name, _versions, text)
        p.add_argument("--repository", type=Path, required=True)
        p.add_argument("--model", required=True, choices=MODEL_KINDS)
        if name == "pin":
            p.add_argument("--version", type=int, required=True)
        elif name == "rollout":
            p.set_defaults(version=None)
        p.add_argument(
            "--force",
            action="store_true",
            help="switch even if labels of the served taxonomy are removed or renamed",
        )
        p.add_argument(
            "--triton",
            action="append",
            metavar="HOST:PORT",
            help="also switch this running Triton (--model-control-mode=explicit) without "
            "failing a call; repeatable; dns:///HOST:PORT stands for every address the name "
            "resolves to (a headless Service: every ready Triton pod)",
        )
        p.add_argument(
            "--triton-admin-header",
            metavar="HEADER",
            help="Tritons whose model-repository protocol is restricted: send the header "
            f"triton-grpc-protocol-HEADER with the value of ${TRITON_ADMIN_KEY_ENV}",
        )
        p.add_argument(
            "--drain-seconds",
            type=float,
            default=5.0,
            help="with --triton: time requests on the old version get before it is unloaded",
        )
    p = add_command(
        versions,
        "to-serve",
        _versions,
        "print the version a build serves (the pinned one, else the newest)",
    )
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True, choices=MODEL_KINDS)
    p = add_command(
        versions, "prune", _versions, "remove old versions (never the served or pinned)"
    )
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", required=True, choices=MODEL_KINDS)
    p.add_argument("--keep", type=int, required=True, help="newest versions to keep")

    thresholds = add_group(
        repo, "thresholds", "calibrated threshold sets, published with the tagger"
    )
    p = add_command(
        thresholds,
        "publish",
        _thresholds_publish,
        "publish a threshold set (`fashionserve calibrate --out`) as a new tagger version: "
        "the files of the version it was calibrated on, its manifest recording the set",
    )
    p.add_argument("file", type=Path, help="thresholds.yaml")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model", default="tagger", help="the tagger's model name")
    p.add_argument(
        "--from-version",
        type=int,
        help="the version whose files the new one takes (default: the served one)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="publish even if the set was calibrated on another tagger artifact",
    )

    p = add_command(
        subparsers, "triton", _triton, "serve a model repository with Triton (foreground)"
    )
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds")
    p.add_argument(
        "--model-control-mode",
        choices=["none", "explicit"],
        default="none",
        help="explicit: models can be reloaded over Triton's API, for `repo versions ... "
        "--triton` (keep Triton's ports private: the API loads model code)",
    )

    p = add_command(
        subparsers, "evaluate", _evaluate, "measure quality through the served ensemble"
    )
    _add_served_flags(p)
    p.add_argument("--json-out", type=Path, help="write the figures as JSON")
    p.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="write the per-class report (report.json, report.md, PR curves as PNG)",
    )
    p.add_argument(
        "--split",
        help="the scene split the detector, category and tag figures and the report come "
        "from (default: test, new products; else val for older data; seen: training "
        "products, for diagnosis)",
    )
    p.add_argument(
        "--thresholds",
        type=Path,
        metavar="FILE",
        help="decide with this threshold set instead of the served one",
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="with --gateway: also Acc@1/Acc@10 of the query garments through SearchSimilar "
        "(the served index built from the gallery split with `fashionserve catalog build`)",
    )

    p = add_command(
        subparsers,
        "calibrate",
        _calibrate,
        "per-class thresholds reaching a target recall, measured through the served ensemble",
    )
    _add_served_flags(p)
    p.add_argument("--split", default="val", help="the calibration split (default: val)")
    p.add_argument("--target-recall", type=_probability, default=0.90)
    p.add_argument(
        "--target",
        action="append",
        type=_target,
        default=[],
        metavar="CLASS=RECALL",
        help="a class's own target: shirt=0.95 (a category), colour/red=0.95 (a tag); repeatable",
    )
    p.add_argument(
        "--targets-file",
        type=Path,
        help="YAML mapping of class to target recall (--target wins over it)",
    )
    p.add_argument(
        "--min-support",
        type=int,
        default=None,
        help="fewest positives to calibrate a class (default 30); below it the default stays",
    )
    p.add_argument("--name", help="the set's name (default: recall<target>-<UTC time>)")
    p.add_argument("--out", type=Path, required=True, help="the threshold set to write (YAML)")


def _synth(args: argparse.Namespace) -> int:
    from fashionserve.data.writer import synthesize
    from fashionserve.taxonomy import load_taxonomy

    synthesize(
        args.out,
        images=args.images,
        seed=args.seed,
        taxonomy=load_taxonomy(args.taxonomy),
        splits=args.splits,
        trend=args.trend,
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from fashionserve.train import train_all

    train_all(
        args.data,
        args.out,
        seed=args.seed,
        models=args.models,
        budget=args.budget,
        init=args.init,
        extra_labels=args.extra_labels,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from fashionserve.export.exporter import export_checkpoint, trtexec_for_version
    from fashionserve.export.tensorrt import format_command

    if args.trtexec_command and args.target != "tensorrt":
        print("error: --trtexec-command goes with --target tensorrt", file=sys.stderr)
        return 2  # a flag combination argparse cannot check: its exit status
    # --trtexec-command: publish the ONNX version here, build the engine in the TensorRT
    # image with the printed command (no TensorRT needed on this machine).
    build_here = args.target == "tensorrt" and not args.trtexec_command
    # With --trtexec-command the command goes to stdout alone, for scripts; everything
    # else export prints (parity tables, data set summaries) to stderr.
    progress = sys.stderr if args.trtexec_command else sys.stdout
    with contextlib.redirect_stdout(progress):
        version_dir = export_checkpoint(
            args.checkpoint,
            args.repository,
            model_name=args.model_name,
            target="tensorrt" if build_here else "onnx",
            precision=args.precision,
            timing_cache=args.timing_cache,
            max_batch=args.max_batch,
            force=args.force,
        )
    if args.trtexec_command:
        command = trtexec_for_version(
            version_dir,
            args.precision,
            compute_capability=args.compute_capability,
            max_batch=args.max_batch,
            timing_cache=args.timing_cache,
        )
        print(format_command(command))
    return 0


def _repo_build(args: argparse.Namespace) -> int:
    from fashionserve.model_repository.build import build_repository
    from fashionserve.model_repository.settings import RepositorySettings

    settings = RepositorySettings(
        flavour=args.flavour,
        max_images_per_request=args.max_images_per_request,
        max_crops_per_image=args.max_crops_per_image,
        min_score=args.min_score,
        preprocess_instances=args.preprocess_instances,
        crop_instances=args.crop_instances,
        model_instances=args.model_instances,
        max_queue_delay_microseconds=args.max_queue_delay_microseconds,
        engine_files=dict(args.engine or []),
    )
    build_repository(args.repository, settings)
    return 0


def _versions(args: argparse.Namespace) -> int:
    from fashionserve.model_repository import versions as v

    if args.versions_command == "list":
        infos = [
            i for m in (args.model or MODEL_KINDS) for i in v.list_versions(args.repository, m)
        ]
        if args.json:
            print(json.dumps([i.to_dict() for i in infos], indent=2))
        else:
            print(v.format_versions(infos))
        return 0
    if args.versions_command == "prune":
        removed = v.prune(args.repository, args.model, args.keep)
        print(f"{args.model}: removed {', '.join(map(str, removed)) or 'nothing'}")
        return 0
    if args.versions_command == "to-serve":
        print(v.to_serve(args.repository, args.model))
        return 0
    headers = {}
    if args.triton_admin_header:
        key = os.environ.get(TRITON_ADMIN_KEY_ENV)
        if not key:
            print(f"error: --triton-admin-header needs ${TRITON_ADMIN_KEY_ENV}", file=sys.stderr)
            return 2
        headers[f"triton-grpc-protocol-{args.triton_admin_header}"] = key
    live = {
        "tritons": args.triton or (),
        "triton_headers": headers,
        "drain_seconds": args.drain_seconds,
    }
    if args.versions_command == "rollback":
        switch = v.rollback(args.repository, args.model, force=args.force, echo=print, **live)
    else:
        switch = v.rollout(
            args.repository,
            args.model,
            args.version,
            pin=args.versions_command == "pin",
            force=args.force,
            echo=print,
            **live,
        )
    where = ""
    if switch.applied_to_triton:
        where = f"; {len(switch.replicas)} Triton(s) switched: {', '.join(switch.replicas)}"
    print(f"{switch.model}: serving version {switch.new} (was {switch.old}){where}")
    return 0


def _engine_file(text: str) -> tuple[str, str]:
    cc, sep, name = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CC=FILE, e.g. 8.6=model.sm86.plan")
    return cc, name


def _triton(args: argparse.Namespace) -> int:
    from fashionserve.triton import run_triton

    return run_triton(
        args.repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        ready_timeout=args.ready_timeout,
        model_control_mode=args.model_control_mode,
    )


def _evaluate(args: argparse.Namespace) -> int:
    from fashionserve.evaluate import evaluate

    evaluate(
        args.data,
        triton=args.triton,
        json_out=args.json_out,
        gateway=args.gateway,
        api_key=args.api_key,
        security=security.from_flags(args),
        report=args.report,
        split=args.split,
        thresholds=args.thresholds,
        search=args.search,
    )
    return 0


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a recall in (0, 1]")
    return value


def _target(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CLASS=RECALL, e.g. shirt=0.95")
    return name, _probability(value)


def _calibrate(args: argparse.Namespace) -> int:
    import yaml

    from fashionserve.calibration import MIN_SUPPORT
    from fashionserve.evaluate import run_calibration

    targets: dict[str, float] = {}
    if args.targets_file is not None:
        loaded = yaml.safe_load(args.targets_file.read_text()) or {}
        if not isinstance(loaded, dict):
            print(
                f"error: {args.targets_file}: expected a mapping of class to recall",
                file=sys.stderr,
            )
            return 2
        targets.update({str(k): _probability(str(v)) for k, v in loaded.items()})
    targets.update(dict(args.target))
    run_calibration(
        args.data,
        args.out,
        args.target_recall,
        triton=args.triton,
        gateway=args.gateway,
        api_key=args.api_key,
        security=security.from_flags(args),
        split=args.split,
        targets=targets,
        name=args.name,
        min_support=args.min_support if args.min_support is not None else MIN_SUPPORT,
    )
    return 0


def _thresholds_publish(args: argparse.Namespace) -> int:
    from fashionserve import thresholds
    from fashionserve.repository import publish_thresholds

    chosen = thresholds.load(args.file)
    version_dir = publish_thresholds(
        args.repository,
        chosen,
        model=args.model,
        base_version=args.from_version,
        force=args.force,
    )
    print(
        f"{args.model}: published version {version_dir.name} with threshold set "
        f"{chosen.name} ({chosen.hash[:12]}); roll it out with "
        f"`fashionserve repo versions rollout --model {args.model}`"
    )
    return 0


def _add_served_flags(p: argparse.ArgumentParser) -> None:
    """The data set and the served ensemble measured on it: Triton itself, or the gateway."""
    p.add_argument("--data", type=Path, required=True, help="a `data synth` directory")
    through = p.add_mutually_exclusive_group(required=True)
    through.add_argument("--triton", metavar="HOST:PORT", help="Triton gRPC address")
    through.add_argument("--gateway", metavar="HOST:PORT", help="gateway address (public API)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FASHIONSERVE_API_KEY"),
        help="with --gateway (env FASHIONSERVE_API_KEY)",
    )
    security.add_flags(p)
