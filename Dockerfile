# SegGPT ML backend for Label Studio: one image for `seggpt-backend serve` and `seggpt-backend worker`.
#
# PyTorch wheels: by default the CPU-only build from the PyTorch CPU index (no CUDA libraries, a far
# smaller image that runs on any machine). For NVIDIA GPUs build with an empty TORCH_INDEX_URL, which
# installs the default index's Linux wheels (CUDA bundled, still usable on CPU); docker-compose.gpu.yml
# does that:
#   docker build -t seggpt-backend:cpu .
#   docker build -t seggpt-backend:cuda --build-arg TORCH_INDEX_URL= .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1

COPY setup.cfg pyproject.toml README.md /tmp/src/
COPY seggpt_model /tmp/src/seggpt_model
COPY backend /tmp/src/backend
# Naming the pins again keeps pip from swapping the wheel chosen above for another build.
RUN pip install /tmp/src torch==2.14.1 torchvision==0.29.1 && rm -rf /tmp/src

# Non-root; /data holds the Hugging Face cache (weights downloaded at first start) and, when no
# REDIS_URL is set, the embedded Redis file. Mount a checkpoint read-only instead with
# SEGGPT_WEIGHTS=/weights/seggpt_vit_large.pth and -v /path/on/host:/weights:ro.
RUN useradd --create-home --uid 1000 seggpt && mkdir -p /data/hf && chown -R seggpt:seggpt /data
USER seggpt
WORKDIR /data
ENV MODEL_DIR=/data \
    HF_HOME=/data/hf \
    SEGGPT_WEIGHTS=BAAI/seggpt-vit-large \
    DEVICE=auto
VOLUME ["/data"]

EXPOSE 9090
# The weights are fetched (or fingerprinted) before the server listens, hence the long start period.
# /health sits behind basic auth when BASIC_AUTH_USER is set, so the probe sends it too.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import base64, json, os, urllib.request as u; r = u.Request(os.environ.get('HEALTH_URL', 'http://127.0.0.1:9090/health')); a = os.environ.get('BASIC_AUTH_USER'); a and r.add_header('Authorization', 'Basic ' + base64.b64encode((a + ':' + os.environ.get('BASIC_AUTH_PASS', '')).encode()).decode()); assert json.load(u.urlopen(r, timeout=5))['status'] == 'UP'"]
CMD ["seggpt-backend", "serve", "--host", "0.0.0.0", "--port", "9090"]
