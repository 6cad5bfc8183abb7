#!/usr/bin/env bash
# deploy/image/gpu-smoke.sh: build the GPU image and run its LLM on a GPU machine (not run by
# `make test`: it needs an NVIDIA GPU, the NVIDIA container toolkit with CDI specs for podman
# (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`), PyPI for vLLM's CUDA wheels, and a
# store holding an LLM (default smollm2: `make models-llm`)).
#
#   deploy/image/gpu-smoke.sh [MODEL]     MODEL: a store name (default smollm2)
#
# Builds servery-gpu:<version>-cuda with deploy/image/image.sh, runs the LLM service alone as
# deploy/'s LLM pod does (`start-http-server --service-name llm`), with the GPU passed through
# CDI, waits for /readyz, streams a chat completion, checks that vLLM runs on CUDA (its log) and
# stops the container with SIGTERM (exit 0). Exit 0: all of that held.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
MODEL="${1:-smollm2}"
STORE="${BENTOML_HOME:-$HOME/bentoml}/models"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
PORT="${PORT:-3950}"

command -v nvidia-smi >/dev/null || {
	echo "gpu-smoke: no nvidia-smi: not a GPU machine" >&2
	exit 77
}
[ -d "$STORE/$MODEL" ] || {
	echo "gpu-smoke: $STORE has no $MODEL (make models-llm)" >&2
	exit 1
}
image="$(BENTOFILE=bentofile.gpu.yaml IMAGE="servery-gpu:$VERSION-cuda" "$ROOT/deploy/image/image.sh" build | tail -1)"
eval "$("$ROOT/deploy/image/image.sh" env)"
name="servery-gpu-smoke-$$"
trap 'podman rm -f -t 0 "$name" >/dev/null 2>&1 || true' EXIT
t0=$SECONDS
podman run -d --name "$name" --network host --device nvidia.com/gpu=all --shm-size 2g \
	--read-only --tmpfs /tmp:rw,mode=1777 --tmpfs /srv/bentoml:rw,mode=1777 \
	-v "$STORE:/srv/bentoml/models:ro" -v "$STORE:/home/bentoml/bento/models:ro" \
	-e BENTOML_HOME=/srv/bentoml -e HOME=/tmp -e HF_HUB_OFFLINE=1 \
	-e SERVERY_LLM_MODELS="$MODEL=$MODEL" -e SERVERY_LLM_MODELS_FILE= \
	"$image" start-http-server --service-name llm --host 127.0.0.1 --port "$PORT" >/dev/null
until curl -sf -o /dev/null "http://127.0.0.1:$PORT/readyz"; do
	[ "$(podman inspect -f '{{.State.Status}}' "$name")" = running ] || {
		podman logs --tail 80 "$name"
		exit 1
	}
	[ $((SECONDS - t0)) -lt 600 ] || {
		echo "gpu-smoke: not ready in 600 s" >&2
		podman logs --tail 80 "$name"
		exit 1
	}
	sleep 2
done
echo "gpu-smoke: ready in $((SECONDS - t0)) s"
podman exec "$name" nvidia-smi --query-gpu=name,memory.used --format=csv
curl -sfN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
	-d "{\"model\": \"$MODEL\", \"stream\": true, \"max_tokens\": 16, \"messages\": [{\"role\": \"user\", \"content\": \"Say hi\"}]}" |
	tee /dev/stderr | tail -1 | grep -q '^data: \[DONE\]'
podman logs "$name" 2>&1 | grep -qiE "cuda|gpu" || {
	echo "gpu-smoke: vLLM's log names no CUDA device" >&2
	exit 1
}
podman stop -t 30 "$name" >/dev/null
code="$(podman inspect -f '{{.State.ExitCode}}' "$name")"
[ "$code" = 0 ] || {
	echo "gpu-smoke: exit $code after SIGTERM" >&2
	exit 1
}
echo "gpu-smoke: ok ($image)"
