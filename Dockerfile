# syntax=docker/dockerfile:1
# The harden CLI, CUDA-capable: torch's PyPI wheels bring the CUDA 13 runtime, so the image needs no
# CUDA toolkit. The host needs an NVIDIA driver for CUDA 13 and the NVIDIA Container Toolkit.
#
#   docker build -t harden .
#   docker run --rm --gpus all -v "$PWD:/data" harden scan models:/my-model/3 --data /data/clean.npz
#   docker run --rm --gpus all -e MLFLOW_TRACKING_URI=http://mlflow:5000 harden scan models:/my-model@candidate --data digits
#   docker run --rm -p 3000:3000 -v "$PWD:/data" -v harden-bento:/home/harden/bentoml harden serve harden-demo --host 0.0.0.0
#
# Build with --build-arg ORT_GPU=true to swap ONNX Runtime for its CUDA build (export parity and serving on GPU).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY harden ./harden
COPY serving ./serving
# The Makefile's install command (without -e and the dev extra); tests/export/test_dockerfile.py keeps them in step.
RUN python -m pip install --disable-pip-version-check -q .
ARG ORT_GPU=false
RUN if [ "$ORT_GPU" = "true" ]; then \
        python -m pip uninstall -y -q onnxruntime \
        && python -m pip install --disable-pip-version-check -q onnxruntime-gpu==1.31.1; \
    fi

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/harden \
    BENTOML_HOME=/home/harden/bentoml \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
RUN groupadd --gid 10001 harden \
    && useradd --create-home --uid 10001 --gid 10001 harden \
    && mkdir -p /data /home/harden/bentoml \
    && chown -R harden:harden /data /home/harden
COPY --from=build /opt/venv /opt/venv
# Numeric ids: Kubernetes' runAsNonRoot can verify them.
USER 10001:10001
# MLflow: by default harden uses ./mlflow.db and ./mlruns in the working directory, i.e. the /data
# volume; set MLFLOW_TRACKING_URI to use a tracking server instead.
WORKDIR /data
VOLUME ["/data"]
EXPOSE 3000
ENTRYPOINT ["harden"]
CMD ["--help"]
