# syntax=docker/dockerfile:1
# Images of the service. Build from the repository root:
#   docker build --target gateway    -t braintumor-gateway:0.1.0 .     # HTTP gateway (default CMD) and gRPC API
#   docker build --target triton-cpu -t braintumor-triton-cpu:0.1.0 .  # the embedded tritonserver on its own (CPU)
#   docker build --target triton     -t braintumor-triton:0.1.0 .      # NVIDIA's Triton with the release model (GPU)
#   docker build --target all-in-one -t braintumor:0.1.0 .             # `braintumor serve`: everything in one container
# serving/deploy/docker-compose.yml runs triton-cpu + gateway + grpc (Prometheus and Grafana in a profile);
# serving/deploy/k8s/ is the Kubernetes version. serving/deploy/smoke.sh builds and runs them (README there);
# tests/unit/test_deploy_static.py lints this file and checks ports, users and health checks.

# Triton 24.10 is Triton server 2.51.0, the same server the nvidia-pytriton wheel (serve extra) embeds, so the
# container runs the model exactly as `braintumor serve` and the e2e tests do.
ARG TRITON_VERSION=24.10
ARG PYTHON_VERSION=3.11

# ---- build: the package and its serve extra in a venv (no torch: serving imports none) --------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, from pyproject.toml alone (the serve extra with its braintumor[...] self-references
# expanded), so a change to the sources rebuilds only the small layers below and not this ~1.3 GB one.
COPY pyproject.toml ./
RUN /opt/venv/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = p['optional-dependencies']; \
expand = lambda reqs: [r for req in reqs for r in (expand(extras[req.split('[')[1].rstrip(']')]) \
    if req.startswith('braintumor[') else [req])]; \
print('\n'.join(p['dependencies'] + expand(extras['serve'])))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY train train
COPY export export
COPY serving serving
COPY clients clients
# pyproject maps loadtest/ too (braintumor.loadtest), but a serving image carries no load-test runner: the folder stays
# empty here, so the install holds no braintumor.loadtest and `braintumor` offers no `loadtest` command.
RUN mkdir loadtest
# The serve extra resolves no torch (tested); refuse to build an image that would carry it (or the load tests) anyway.
# pip check: the dependency layer above satisfies what ".[serve]" asks for.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps ".[serve]" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && /opt/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('braintumor.loadtest') is not None)"
# Trimmed of what serving never runs: pip (nothing installs at run time), the python-backend stubs of the other
# Python versions, and test suites shipped inside packages. Then the python backend directory the embedded
# tritonserver needs (its stub next to libtriton_python.so) is assembled here, once, into BRAINTUMOR_CACHE, so a
# container with a read-only root (and noexec tmpfs mounts) starts without writing or executing anything new.
ENV BRAINTUMOR_CACHE=/opt/braintumor/cache
RUN SITE=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
    && PY=$(/opt/venv/bin/python -c "import sys; print('%d.%d' % sys.version_info[:2])") \
    && find "$SITE/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 ! -name "$PY" -exec rm -rf {} + \
    && find "$SITE" -type d -name tests -prune -exec rm -rf {} + \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip \
    && /opt/venv/bin/python -c "import braintumor.serving.service, braintumor.serving.grpc_server, \
braintumor.serving.explain, lime.lime_image, shap, cv2, onnxruntime, tritonclient.grpc" \
    && /opt/venv/bin/python -c "from braintumor.serving.triton_embedded import assemble_backend_dir, find_triton; \
print(assemble_backend_dir(find_triton()))"

# ---- runtime: the venv on a clean base, user 10001 (gateway and triton-cpu start from here) ---------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime
RUN groupadd --system --gid 10001 braintumor \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/braintumor braintumor
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/braintumor /opt/braintumor
# Caches that lime/shap's dependencies write go to /tmp: the venv belongs to root, and Kubernetes mounts the root
# file system read-only (serving/deploy/k8s) with an emptyDir at /tmp and at the home directory.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    BENTOML_HOME=/home/braintumor/bentoml \
    BRAINTUMOR_CACHE=/opt/braintumor/cache
USER 10001:10001
WORKDIR /home/braintumor

# ---- gateway: BentoML HTTP gateway (default) or gRPC API, non-root ----------------------------------------------
FROM runtime AS gateway
ENV BRAINTUMOR_TRITON_URL=triton:8001
# 3000: HTTP gateway; 50051: gRPC API; 50052: the gRPC server's Prometheus /metrics
EXPOSE 3000 50051 50052
# Liveness of the HTTP gateway (/healthz does not call Triton). The gRPC variant overrides it with a gRPC health
# check (see docker-compose.yml), or disable it there: `docker run --no-healthcheck`.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4)"]
# The gRPC API from the same image:
#   docker run braintumor-gateway:0.1.0 braintumor grpc-server --host 0.0.0.0 --port 50051 --metrics-port 50052 \
#       --triton-url triton:8001
CMD ["bentoml", "serve", "braintumor.serving.service:BrainTumorGateway", "--host", "0.0.0.0", "--port", "3000"]

# ---- triton-cpu: the tritonserver of the nvidia-pytriton wheel (what `braintumor serve` embeds), no NVIDIA registry
# The same launcher as the embedded one (`braintumor triton`: admin APIs locked, inference behind
# BRAINTUMOR_TRITON_KEY, which the gateway and gRPC API containers must be given too) on the committed model
# repository, for CPU hosts and for running the compose/Kubernetes topology anywhere. GPUs: the `triton` target.
# Triton authenticates nobody but by that key: publish its ports on loopback only (compose) or fence them
# (k8s NetworkPolicy). --key-file only matters when no key is given (then the front doors cannot reach it).
FROM runtime AS triton-cpu
COPY model_repository /models
# 8000: KServe v2 HTTP; 8001: KServe v2 gRPC (what the gateway and the gRPC API call); 8002: Prometheus /metrics
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
CMD ["braintumor", "triton", "--model-repository", "/models", "--address", "0.0.0.0", "--http-port", "8000", \
     "--grpc-port", "8001", "--metrics-port", "8002", "--key-file", "/tmp/braintumor/triton.key"]

# ---- triton: NVIDIA's Triton Inference Server with the committed release model ----------------------------------
# model_repository/ is the python-backend variant (model.py runs the ONNX graph with ONNX Runtime): it is the
# committed, manifest-verified release, and it needs no checkpoint to build. The ONNX Runtime and TensorRT
# variants are written from a checkpoint (`braintumor export --backend onnxruntime|tensorrt`), which is not in the
# repository; build one of those with --build-arg MODEL_REPOSITORY=DIR (a folder in the build context) to use the
# GPU. The python backend's stub uses the container's python3: it needs onnxruntime and numpy 1.x (under numpy 2
# the stub was measured to corrupt tensors).
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3 AS triton
ARG MODEL_REPOSITORY=model_repository
# onnxruntime-gpu for KIND_GPU instances of the python backend; 1.23.2 is the newest release with a Python 3.10
# wheel (the 24.10 container is Ubuntu 22.04, Python 3.10).
ARG ORT_PACKAGE=onnxruntime
ARG ORT_VERSION=1.23.2
# PIP_BREAK_SYSTEM_PACKAGES: containers from 25.01 on are Ubuntu 24.04, whose python refuses pip without it.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir "${ORT_PACKAGE}==${ORT_VERSION}" "numpy==1.26.4" \
    && groupadd --system --gid 10001 braintumor \
    && useradd --system --uid 10001 --gid 10001 --no-create-home braintumor
COPY ${MODEL_REPOSITORY} /models
USER 10001:10001
# 8000: KServe v2 HTTP; 8001: KServe v2 gRPC (what the gateway and the gRPC API call); 8002: Prometheus /metrics
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", \
         "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# Same flags as the embedded launcher: a model that fails to load stops the server instead of leaving it "up", and
# Triton's admin APIs (logging, shared memory, repository, trace, statistics) need a header value drawn at start
# and given to nobody (Triton authenticates no one; the front doors use only health, metadata, config, inference).
# With BRAINTUMOR_TRITON_KEY set (compose and Kubernetes give it), inference, model config and metadata need it too,
# as with `braintumor triton` (triton-cpu). `sh -c` only to draw the admin key and read that one; `exec` leaves
# tritonserver as the process that gets the signals.
CMD ["sh", "-c", "KEY=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \\n') && exec tritonserver --model-repository=/models --exit-on-error=true --strict-readiness=true --allow-cpu-metrics=true --http-restricted-api=model-repository,shared-memory,statistics,trace,logging:braintumor-admin-key=$KEY --grpc-restricted-protocol=model-repository,shared-memory,statistics,trace,logging:braintumor-admin-key=$KEY ${BRAINTUMOR_TRITON_KEY:+--http-restricted-api=inference,model-config,metadata:braintumor-triton-key=$BRAINTUMOR_TRITON_KEY --grpc-restricted-protocol=inference,model-config,metadata:braintumor-triton-key=$BRAINTUMOR_TRITON_KEY}"]

# ---- all-in-one: `braintumor serve` (embedded tritonserver from the nvidia-pytriton wheel + gateway + gRPC) ---------
FROM gateway AS all-in-one
COPY model_repository /models
ENV BRAINTUMOR_TRITON_URL=127.0.0.1:8001
# Triton (8000-8002) listens on the container's loopback only; it authenticates nobody. --host 0.0.0.0 makes `serve`
# refuse to start without a key: docker run -e BRAINTUMOR_API_KEY=... -p 3000:3000 -p 50051:50051 braintumor
EXPOSE 3000 50051 50052
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4)"]
CMD ["braintumor", "serve", "--model-repository", "/models", "--host", "0.0.0.0", "--http-port", "3000", \
     "--grpc-port", "50051", "--grpc-metrics-port", "50052", \
     "--triton-http-port", "8000", "--triton-grpc-port", "8001", "--triton-metrics-port", "8002"]
