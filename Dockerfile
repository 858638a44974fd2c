# The AudioRL worker image: what every pod of a rendered PyTorchJob runs.
#   docker build -t REGISTRY/audiorl:0.1.0 .
#   docker push REGISTRY/audiorl:0.1.0        # then set job.image to it
# The base carries CUDA, cuDNN, NCCL and a CUDA build of torch; pip keeps that torch because it
# satisfies pyproject.toml's range. Nothing secret is baked in: credentials reach pods only
# through job.secret_env (Secret references).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AUDIORL_NO_PROGRESS=1 \
    HF_HOME=/cache/huggingface \
    TORCH_HOME=/cache/torch \
    XDG_CACHE_HOME=/cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TOKENIZERS_PARALLELISM=false \
    NCCL_DEBUG=WARN \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# espeak-ng: `audiorl data` and the quickstart speak their own audio; ffmpeg: the Whisper
# pipelines registered in MLflow decode audio bytes and files with it
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng ffmpeg \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/audiorl
COPY pyproject.toml README.md ./
COPY audiorl ./audiorl
COPY cli ./cli
# gpu: NVIDIA metrics; s3: training data at s3:// URLs (credentials from the pod environment)
RUN python -m pip install ".[gpu,s3]" \
 && python -c "import audiorl.k8s, audiorl.rewards, audiorl_cli.main, torch; print('torch', torch.__version__)"

# a fixed non-root uid, the one the rendered pods' securityContext runs as
RUN groupadd --gid 1000 audiorl \
 && useradd --create-home --uid 1000 --gid 1000 audiorl \
 && mkdir -p /cache /workspace \
 && chown -R 1000:1000 /cache /workspace
USER 1000:1000
WORKDIR /workspace

# the rendered container runs exactly this with `train $(AUDIORL_CONFIG)`; the operator's PET_*
# variables give torchrun the nodes, ranks and rendezvous
ENTRYPOINT ["torchrun", "--module", "audiorl_cli.main"]
CMD ["--help"]
