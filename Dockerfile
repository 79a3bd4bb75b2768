# opmri-node: one image for both roles, the node (`serve`, the default command) and its Celery
# workers (`worker --queues analysis --gpu N`, `worker --queues export`). See
# docs/deployment.md and compose.yaml.
#
# PyTorch 2.14.1 as published on PyPI for Linux x86_64 is the CUDA 13.0 build: its wheels bring
# the CUDA runtime, cuBLAS and cuDNN 9, so a slim Python base is the whole CUDA-capable image.
# GPU hosts need the NVIDIA driver (580 or newer, for CUDA 13.0) and the NVIDIA Container
# Toolkit; without a GPU the same image runs the analysis on the CPU.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="opmri-node" \
      org.opencontainers.image.description="DICOM node that screens lumbar spine MRI for osteoporosis (research use only)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    OPMRI_CONFIG=/etc/opmri/node.yaml

# The largest layer first and on its own, so that a change to the project reuses it.
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1

# Only what `pip install` needs; .dockerignore keeps everything else out of the build context.
COPY pyproject.toml README.md /src/
COPY opmri_node /src/opmri_node
COPY pipeline /src/pipeline
COPY train /src/train
RUN pip install --no-cache-dir /src && rm -rf /src

# A fixed, unprivileged user: the node and every worker container write the shared data
# volume as this user, so their files stay readable and writable by each other.
RUN groupadd --system --gid 10001 opmri \
    && useradd --system --uid 10001 --gid opmri --home-dir /home/opmri --create-home \
       --shell /usr/sbin/nologin opmri \
    && mkdir -p /data /models /etc/opmri \
    && chown opmri:opmri /data /models

COPY config/docker/node.yaml /etc/opmri/node.yaml

USER 10001:10001
WORKDIR /home/opmri

# /data: the node's data_dir (spool, state.sqlite3, results), shared by the node and its
# workers on one host. /models: segmenter/, cls-t1/, cls-t2/.
VOLUME ["/data", "/models"]

# 11112: DICOM; 9108: the node's /metrics and /healthz; 9109: the same in a worker.
EXPOSE 11112 9108 9109

# The node's check; compose.yaml replaces it with `health --worker` for worker containers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["opmri-node", "health", "--config", "/etc/opmri/node.yaml"]

ENTRYPOINT ["opmri-node"]
CMD ["serve", "--config", "/etc/opmri/node.yaml"]
