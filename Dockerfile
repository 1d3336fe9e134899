# gradcam-node image: the DICOM node (C-STORE in; Secondary Captures, Segmentations and an SR out) on CPU.
# AI research output, NOT for diagnostic use.
#
#   docker compose up -d          (see docker-compose.yml; Orthanc + this node)
#   docker build -t gradcam-node .
#
# Nothing is downloaded at run time: the model weights are the files in checkpoints/ (copied here and, in
# docker-compose.yml, mounted read-only over /app/checkpoints so new weights need no rebuild).
# The node reads /app/config/docker.toml (GRADCAM_NODE_CONFIG); its spool and SQLite database live in the
# volume /app/var. It listens on 11112 (DICOM) as AE GRADCAM.

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU builds of torch/torchvision first (their own index; the default PyPI wheels carry CUDA libraries).
# An image for GPU workers (docker-compose.scale.yml) takes the CUDA build from PyPI instead:
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t gradcam-node:0.1.0-cuda .
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url "${TORCH_INDEX}"

WORKDIR /app

# The package itself (its other dependencies come from PyPI; torch is already satisfied).
COPY pyproject.toml README.md ./
COPY gradcam ./gradcam
COPY node ./node
RUN pip install . && rm -rf build *.egg-info

COPY config ./config
COPY checkpoints ./checkpoints

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gradcam \
    && mkdir -p /app/var \
    && chown -R gradcam:gradcam /app/var
USER gradcam

ENV GRADCAM_NODE_CONFIG=/app/config/docker.toml
VOLUME ["/app/var"]
EXPOSE 11112 8080

# The node's /healthz ([http] in docker.toml): 200 when receiver, worker, sender and database are up; a 503
# or no answer makes urlopen raise, and python exit 1.
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=10)"]

# SIGTERM (docker stop) ends the node cleanly: the association in progress finishes, queued work stays in
# the database and resumes at the next start.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gradcam-node"]
CMD ["serve"]
