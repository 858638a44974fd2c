# The AudioRL worker image (first version; the Kubernetes work completes it).
# On Linux, PyPI's torch wheel is the CUDA build, which is what GPU workers need.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AUDIORL_NO_PROGRESS=1 \
    HF_HOME=/cache/huggingface

RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng libsndfile1 \
 && rm -rf /var/lib/apt/lists/*

# torch first so that the rest resolves against it
RUN pip install "torch==2.13.0"

WORKDIR /opt/audiorl
COPY pyproject.toml README.md ./
COPY audiorl ./audiorl
COPY cli ./cli
RUN pip install . && python -c "import audiorl, audiorl_cli"

RUN useradd --create-home --uid 1000 audiorl && mkdir -p /cache /workspace && chown audiorl /cache /workspace
USER 1000
WORKDIR /workspace
ENTRYPOINT ["audiorl"]
CMD ["--help"]
