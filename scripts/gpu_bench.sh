#!/usr/bin/env bash
# The standard benchmark on a GPU host, with the best repository flavour available there.
#
# What it does (each step prints what it runs):
#   1. picks the flavour: `tensorrt` when Docker can run a GPU container, `onnx` when the
#      TensorRT engine build fails there, `python-ort` (the embedded Triton, CPU models)
#      when there is no Docker: override with --flavour;
#   2. exports the three checkpoints (`fashionserve export`) and assembles the ensemble
#      (`fashionserve repo build --flavour ...`) in a scratch directory;
#   3. tensorrt: builds each model's engine (model.plan, FP16, batch profile 1..the
#      model's max_batch_size) with trtexec in NGC's TensorRT container of the SAME
#      release as the Triton image (24.10: TensorRT 10.5). Engines are tied to the GPU and
#      the TensorRT version, so they are built here, never shipped;
#   4. builds the fashionserve Triton image (docker/triton.Dockerfile) and runs it with
#      the GPU and the repository, Triton's gRPC port on loopback only;
#   5. starts the gateway from this checkout (API key on, default settings);
#   6. runs `fashionserve loadtest bench` against them (gateway vs direct Triton, batching
#      on/off, naive PyTorch server on the GPU, capacity search, soak), which writes the
#      section `gpu-<flavour>` of BENCHMARKS.md and plots under benchmarks/gpu-<flavour>/;
#   7. stops everything it started.
#
# Requirements: Linux x86-64, an NVIDIA GPU with its driver (nvidia-smi), Python 3.11, and
# for the tensorrt/onnx flavours Docker with the NVIDIA Container Toolkit and access to
# nvcr.io. Run from the repository root:
#
#   scripts/gpu_bench.sh                      # auto flavour, 10-minute soak
#   scripts/gpu_bench.sh --flavour onnx --soak-duration 120
#   scripts/gpu_bench.sh -- --duration 60     # anything after -- goes to `loadtest bench`
#
# The naive server needs a CUDA build of PyTorch to use the GPU (`pip install torch==2.13.0`
# from PyPI is one on Linux); with a CPU build it runs on the CPU and says so in its log.
set -euo pipefail

FLAVOUR=auto
SOAK=600
CHECKPOINTS=""
TRITON_IMAGE_TAG=fashionserve/triton:bench
TRT_IMAGE=nvcr.io/nvidia/tensorrt:24.10-py3
BENCH_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --flavour) FLAVOUR="$2"; shift 2 ;;
    --soak-duration) SOAK="$2"; shift 2 ;;
    --checkpoints) CHECKPOINTS="$2"; shift 2 ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
say() { printf '[gpu-bench] %s\n' "$*" >&2; }
run() { say "\$ $*"; "$@"; }

command -v nvidia-smi >/dev/null || { say "no nvidia-smi: this script is for GPU hosts (use make bench)"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2

# --- the Python environment (the same one `make` creates)
if [[ ! -x .venv/bin/fashionserve ]]; then
  run make .venv/.installed
fi
FS=.venv/bin/fashionserve
PY=.venv/bin/python

# --- checkpoints: --checkpoints, the committed demo ones, or those `fashionserve serve` trained
if [[ -z "$CHECKPOINTS" ]]; then
  for candidate in checkpoints var/checkpoints; do
    if [[ -f $candidate/detector.pt && -f $candidate/tagger.pt && -f $candidate/embedder.pt ]]; then
      CHECKPOINTS=$candidate; break
    fi
  done
fi
[[ -n "$CHECKPOINTS" ]] || { say "no checkpoints: run 'make serve' once, or pass --checkpoints DIR"; exit 1; }

# --- the flavour
docker_gpu() { command -v docker >/dev/null && docker run --rm --gpus all "$TRT_IMAGE" nvidia-smi -L >/dev/null 2>&1; }
if [[ "$FLAVOUR" == auto ]]; then
  if docker_gpu; then FLAVOUR=tensorrt; else
    say "Docker cannot run a GPU container here: falling back to the embedded python-ort stack"
    FLAVOUR=python-ort
  fi
fi
say "flavour: $FLAVOUR, checkpoints: $CHECKPOINTS, soak: ${SOAK}s"

WORK=$(mktemp -d -t fashionserve-gpu-bench-XXXX)
PIDS=()
CONTAINER=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  [[ -n "$CONTAINER" ]] && docker stop -t 30 "$CONTAINER" >/dev/null 2>&1 || true
  say "logs and repository left in $WORK"
}
trap cleanup EXIT

if [[ "$FLAVOUR" == python-ort ]]; then
  # The embedded default stack, measured the same way as `make bench` (its models run on
  # the CPU; only the naive server can use the GPU).
  run "$FS" loadtest bench --section gpu-python-ort --flavour python-ort \
    --soak-duration "$SOAK" "${BENCH_ARGS[@]}"
  exit 0
fi

# --- the model repository
REPO=$WORK/repository
for model in detector tagger embedder; do
  run "$FS" export --checkpoint "$CHECKPOINTS/$model.pt" --repository "$REPO"
done

build_engines() {
  # One trtexec per model: input name and per-sample shape from the ONNX file, batch range
  # from the config.pbtxt that `repo build` wrote (the optimisation profile must cover
  # 1..max_batch_size, or Triton refuses the engine).
  "$PY" - "$REPO" > "$WORK/trtexec.sh" <<'EOF'
import sys
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

repo = Path(sys.argv[1])
print("set -euo pipefail")
for name in ("detector", "tagger", "embedder"):
    config = model_config_pb2.ModelConfig()
    text_format.Parse((repo / name / "config.pbtxt").read_text(), config)
    version = max(int(p.name) for p in (repo / name).iterdir() if p.name.isdigit())
    graph = onnx.load(str(repo / name / str(version) / "model.onnx")).graph
    feed = graph.input[0]
    dims = "x".join(str(d.dim_value) for d in feed.type.tensor_type.shape.dim[1:])
    top = config.max_batch_size
    opt = max(1, top // 2)
    where = f"/models/{name}/{version}"
    print(
        f"trtexec --onnx={where}/model.onnx --saveEngine={where}/model.plan --fp16 "
        f"--minShapes={feed.name}:1x{dims} --optShapes={feed.name}:{opt}x{dims} "
        f"--maxShapes={feed.name}:{top}x{dims} --skipInference"
    )
EOF
  run docker run --rm --gpus all -v "$REPO:/models" "$TRT_IMAGE" bash -c "$(cat "$WORK/trtexec.sh")"
}

if [[ "$FLAVOUR" == tensorrt ]]; then
  run "$FS" repo build --repository "$REPO" --flavour tensorrt
  if ! build_engines > "$WORK/trtexec.log" 2>&1; then
    say "TensorRT engine build failed (see $WORK/trtexec.log): falling back to the onnx flavour"
    FLAVOUR=onnx
  fi
fi
if [[ "$FLAVOUR" == onnx ]]; then
  run "$FS" repo build --repository "$REPO" --flavour onnx
fi

# --- Triton (the project's image: NGC tritonserver 24.10 plus fashionserve for the python steps)
run docker build -q -f docker/triton.Dockerfile -t "$TRITON_IMAGE_TAG" . >/dev/null
TRITON_PORT=$("$PY" -c 'from fashionserve.triton import free_port; print(free_port())')
CONTAINER=fashionserve-gpu-bench-$$
run docker run -d --rm --gpus all --name "$CONTAINER" --shm-size 1g \
  -p "127.0.0.1:$TRITON_PORT:8001" -v "$REPO:/models:ro" "$TRITON_IMAGE_TAG" >/dev/null
TRITON_PID=$(docker inspect -f '{{.State.Pid}}' "$CONTAINER")
say "Triton container $CONTAINER (host pid $TRITON_PID), gRPC 127.0.0.1:$TRITON_PORT"

# --- the gateway, API keys on, default batching
KEY=$("$PY" -c 'import sys; from pathlib import Path; from fashionserve.gateway.auth.keys import create_key; print(create_key(Path(sys.argv[1]), "bench", tenant="bench"))' "$WORK/keys.yaml")
cat > "$WORK/gateway.yaml" <<EOF
listen_address: "127.0.0.1:0"
triton_url: "127.0.0.1:$TRITON_PORT"
auth_enabled: true
api_keys_file: "$WORK/keys.yaml"
EOF
"$FS" gateway --config "$WORK/gateway.yaml" --ready-file "$WORK/gateway-ready.json" \
  > "$WORK/gateway.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
for _ in $(seq 600); do [[ -s "$WORK/gateway-ready.json" ]] && break; sleep 0.5; done
[[ -s "$WORK/gateway-ready.json" ]] || { say "the gateway did not start: $(tail -5 "$WORK/gateway.log")"; exit 1; }
GATEWAY=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["address"])' "$WORK/gateway-ready.json")
say "gateway $GATEWAY (pid $GATEWAY_PID)"

# --- the benchmark (it waits for the gateway to report SERVING, i.e. Triton ready)
run "$FS" loadtest bench --section "gpu-$FLAVOUR" --flavour "$FLAVOUR" \
  --gateway "$GATEWAY" --api-key "$KEY" --triton "127.0.0.1:$TRITON_PORT" \
  --gateway-config "$WORK/gateway.yaml" --checkpoints "$CHECKPOINTS" \
  --watch "gateway=$GATEWAY_PID" --watch "triton=$TRITON_PID" \
  --soak-duration "$SOAK" "${BENCH_ARGS[@]}"
