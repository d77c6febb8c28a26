# rcomp images. Two targets:
#   full    (default): rcomp with torch, for training / pruning / export
#           docker build -t rcomp .
#           docker run --rm -v $PWD/data:/data -v $PWD/runs:/runs rcomp \
#               rcomp prune --profile jetson --data imagefolder:/data/cifar10 --out /runs/jetson
#   runtime: the light checker (onnxruntime, no torch) for deployment CI or a board
#           docker build --target runtime -t rcomp-check .
#           docker run --rm -v $PWD/runs/jetson:/model rcomp-check \
#               rcomp check /model/model.onnx --profile jetson --attack-set /model/adv.npz
# Nothing is downloaded at run time; data and outputs are mounted volumes.

# Pinned base image (Debian bookworm, CPython 3.11).
FROM python:3.11.7-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/rcomp
COPY pyproject.toml README.md ./
COPY toolchain ./toolchain
COPY models ./models
COPY export ./export
COPY profiles ./profiles

FROM base AS runtime
# The checking half only: rcomp's own code without its torch dependencies.
RUN pip install "onnxruntime>=1.17" "onnx>=1.15" "numpy>=1.24" "pyyaml>=6.0" "click>=8.1" \
    && pip install --no-deps .
CMD ["rcomp", "--help"]

FROM base AS full
# CPU wheels of torch keep the image small; drop the index URL for a CUDA image.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu .
CMD ["rcomp", "--help"]
