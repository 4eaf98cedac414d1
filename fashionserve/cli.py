"""The ``fashionserve`` command line: one entry point, one subcommand per job.

Each subcommand parses its flags here and calls one function of the component that does
the work; heavy imports (PyTorch, ONNX) happen only in the subcommands that need them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _synth(args: argparse.Namespace) -> int:
    from fashionserve.data.synth import synthesize
    from fashionserve.taxonomy import load_taxonomy

    synthesize(args.out, images=args.images, seed=args.seed, taxonomy=load_taxonomy(args.taxonomy))
    return 0


def _train(args: argparse.Namespace) -> int:
    from fashionserve.train import train_all

    train_all(args.data, args.out, seed=args.seed, models=args.models, budget=args.budget)
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.exporter import ExportError, ParityError, export_checkpoint
    from fashionserve.checkpoint import CheckpointError

    try:
        export_checkpoint(args.checkpoint, args.repository, model_name=args.model_name)
    except (ParityError, ExportError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _repo_build(args: argparse.Namespace) -> int:
    from model_repository.build import RepositoryError, RepositorySettings, build_repository

    settings = RepositorySettings(
        flavour=args.flavour,
        max_images_per_request=args.max_images_per_request,
        max_crops_per_image=args.max_crops_per_image,
        min_score=args.min_score,
        preprocess_instances=args.preprocess_instances,
        crop_instances=args.crop_instances,
        model_instances=args.model_instances,
        max_queue_delay_microseconds=args.max_queue_delay_microseconds,
    )
    try:
        build_repository(args.repository, settings)
    except RepositoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _triton(args: argparse.Namespace) -> int:
    from fashionserve.triton import run_triton

    return run_triton(
        args.repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        ready_timeout=args.ready_timeout,
    )


def _evaluate(args: argparse.Namespace) -> int:
    from fashionserve.evaluate import EvaluationError, evaluate

    try:
        evaluate(
            args.data,
            triton=args.triton,
            json_out=args.json_out,
            gateway=args.gateway,
            api_key=args.api_key,
        )
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from clients.cli import run

    return run(args)


def _serve(args: argparse.Namespace) -> int:
    from fashionserve.serve import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashionserve", description="Fashion image analysis served on NVIDIA Triton."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Handler, help: str, parent: Any = sub
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    data = sub.add_parser("data", help="synthetic data").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND"
    )
    p = command("synth", _synth, "render the seeded synthetic garment data set", data)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--images", type=int, default=3000, help="images in the train split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taxonomy", type=Path, help="taxonomy YAML (default: the packaged one)")

    p = command("train", _train, "train the detector, tagger and embedder")
    p.add_argument("--data", type=Path, required=True, help="output of `data synth`")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--models",
        nargs="+",
        choices=["detector", "tagger", "embedder"],
        default=["detector", "tagger", "embedder"],
    )
    p.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help="fraction of the standard training schedule (0.05 for a smoke run)",
    )

    p = command("export", _export, "export a checkpoint to ONNX as a new model version")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--model-name", help="model name in the repository (default: its kind)")

    repo = sub.add_parser("repo", help="the Triton model repository").add_subparsers(
        dest="repo_command", required=True, metavar="COMMAND"
    )
    p = command("build", _repo_build, "add the ensemble and python steps to a repository", repo)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--flavour", choices=["python-ort", "onnx", "tensorrt"], default="python-ort")
    p.add_argument("--max-images-per-request", type=int, default=16)
    p.add_argument("--max-crops-per-image", type=int, default=16)
    p.add_argument("--min-score", type=float, default=0.3, help="detector score floor")
    p.add_argument("--preprocess-instances", type=int, default=2)
    p.add_argument("--crop-instances", type=int, default=1)
    p.add_argument("--model-instances", type=int, default=1)
    p.add_argument("--max-queue-delay-microseconds", type=int, default=2000)

    p = command("triton", _triton, "serve a model repository with Triton (foreground)")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds")

    p = command("evaluate", _evaluate, "measure quality through the served ensemble")
    p.add_argument("--data", type=Path, required=True, help="a `data synth` directory")
    through = p.add_mutually_exclusive_group(required=True)
    through.add_argument("--triton", metavar="HOST:PORT", help="Triton gRPC address")
    through.add_argument("--gateway", metavar="HOST:PORT", help="gateway address (public API)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("FASHIONSERVE_API_KEY"),
        help="with --gateway (env FASHIONSERVE_API_KEY)",
    )
    p.add_argument("--json-out", type=Path, help="write the figures as JSON")

    from clients.cli import add_arguments as add_analyze_arguments
    from fashionserve.serve import add_arguments as add_serve_arguments

    add_analyze_arguments(command("analyze", _analyze, "analyse images through the gateway"))
    add_serve_arguments(
        command("serve", _serve, "build what is missing, then run Triton and the gateway")
    )
    from gateway.cli import add_gateway_commands

    add_gateway_commands(sub)
    from loadtest.cli import add_loadtest_commands

    add_loadtest_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
