# rcomp images (README, "Containers"). Two targets:
#   full (default): rcomp with torch, for training / pruning / export
#       docker build -t rcomp .
#       docker run --rm -v "$PWD/data:/data:ro" -v "$PWD/runs:/runs" rcomp \
#           rcomp prune --profile jetson --data imagefolder:/data/cifar10 --out /runs/jetson
#     CUDA wheels instead of CPU ones (PyPI's Linux torch wheels are CUDA builds), for GPUs and torchrun:
#       docker build --build-arg TORCH_INDEX_URL=https://pypi.org/simple -t rcomp:cuda .
#       docker run --rm --gpus all --ipc=host -v "$PWD/data:/data:ro" -v "$PWD/runs:/runs" rcomp:cuda \
#           torchrun --nproc_per_node 2 -m rcomp train --device cuda --amp --data imagefolder:/data/cifar10 --out /runs/r20
#   runtime: the light checker (onnxruntime, no torch) for deployment CI or a board
#       docker build --target runtime -t rcomp-check .
#       docker run --rm -v "$PWD/runs/jetson:/model" rcomp-check \
#           rcomp check /model/model.onnx --profile jetson --attack-set /model/adv.npz
# Volumes: /data (datasets, read-only is enough), /runs (outputs), /model (runtime: a model folder).
# Nothing is downloaded at run time: dependencies are installed at build time, data is mounted.

# Pinned base image (Debian bookworm, CPython 3.11: tomllib reads pyproject.toml below).
FROM python:3.11.7-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/rcomp
COPY pyproject.toml README.md ./
COPY toolchain ./toolchain
COPY models ./models
COPY export ./export
COPY profiles ./profiles

FROM base AS runtime
# The checking half only: the `runtime` extra of pyproject.toml (the single list of its
# requirements), then rcomp's own code without the torch dependencies.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['runtime']))" > runtime.txt \
    && pip install -r runtime.txt \
    && pip install --no-deps . \
    && rm runtime.txt
RUN rcomp --help && rcomp profiles list
VOLUME ["/model"]
CMD ["rcomp", "--help"]

FROM base AS full
# CPU wheels of torch keep the image small; pass a CUDA index (see above) for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" .
RUN rcomp --help
VOLUME ["/data", "/runs"]
CMD ["rcomp", "--help"]
