#!/usr/bin/env bash
# Installs Label Studio 1.23.2 into its own virtualenv (never the project's .venv: LS pins its
# own Django/numpy/pandas stack) and prepares a pre-migrated data-dir template, so that every
# end-to-end test run starts LS from a copy in ~2-3 s instead of migrating for 20-40 s.
#
# Idempotent: an existing venv with the right version and a finished template are kept.
# Usage: install_label_studio.sh [--venv-only]
#   --venv-only  install the venv but make no template (`seggpt-backend quickstart` uses this:
#                its Label Studio gets a superuser of its own, never the template's)
# Env:
#   LS_VENV      virtualenv path (default: <repo>/.ls-venv)
#   LS_TEMPLATE  template data dir (default: $LS_VENV/data-template)
#   PYTHON       interpreter used to create the venv (default: python3, needs >= 3.10)
set -euo pipefail

VENV_ONLY=0
for arg in "$@"; do
    case "$arg" in
        --venv-only) VENV_ONLY=1 ;;
        *) printf 'usage: %s [--venv-only]\n' "$0" >&2; exit 2 ;;
    esac
done

LS_VERSION="1.23.2"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LS_VENV="${LS_VENV:-$REPO_ROOT/.ls-venv}"
LS_TEMPLATE="${LS_TEMPLATE:-$LS_VENV/data-template}"
PYTHON="${PYTHON:-python3}"
# The template's superuser; tests log in with these to obtain a personal access token.
LS_ADMIN_EMAIL="${LS_ADMIN_EMAIL:-e2e-admin@example.com}"
LS_ADMIN_PASSWORD="${LS_ADMIN_PASSWORD:-e2e-admin-password}"

log() { printf '[install_label_studio] %s\n' "$*" >&2; }

installed_version() {
    "$LS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null || true
}

install_venv() {
    if [[ -x "$LS_VENV/bin/label-studio" && "$(installed_version)" == "$LS_VERSION" ]]; then
        log "label-studio $LS_VERSION already in $LS_VENV"
        return
    fi
    local start=$SECONDS
    log "creating $LS_VENV with label-studio==$LS_VERSION"
    "$PYTHON" -m venv "$LS_VENV"
    "$LS_VENV/bin/python" -m pip install -qq --upgrade pip
    "$LS_VENV/bin/python" -m pip install -qq "label-studio==$LS_VERSION"
    # A new venv invalidates any template made by another install.
    rm -rf "$LS_TEMPLATE"
    log "installed in $((SECONDS - start)) s"
}

free_port() {
    "$LS_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Environment of the one start that builds the template: no outbound calls (Sentry, analytics,
# PyPI version check), no prompts, and the superuser and organization created on first start.
# Legacy tokens stay off (the default for new organizations), so tests use a personal access
# token. Bare HOST/PORT/USERNAME/... are read by LS as fallbacks, hence `env -u`.
ls_env_args() {
    local data_dir="$1"
    LS_ENV_ARGS=(
        -u USERNAME -u PASSWORD -u USER_TOKEN -u HOST -u PORT
        LABEL_STUDIO_BASE_DATA_DIR="$data_dir"
        LABEL_STUDIO_USERNAME="$LS_ADMIN_EMAIL"
        LABEL_STUDIO_PASSWORD="$LS_ADMIN_PASSWORD"
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true
        LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false
        SENTRY_DSN= FRONTEND_SENTRY_DSN=
    )
}

make_template() {
    if [[ -f "$LS_TEMPLATE/.template-ready" ]]; then
        log "data-dir template ready: $LS_TEMPLATE"
        return
    fi
    local start=$SECONDS port pid tmp
    tmp="$LS_TEMPLATE.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    port="$(free_port)"
    log "migrating a fresh data dir on port $port (first start, ~20-60 s)"
    ls_env_args "$tmp"
    # `env` execs label-studio, so $! is the server's own pid.
    env "${LS_ENV_ARGS[@]}" "$LS_VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 \
        --port "$port" --data-dir "$tmp" --log-level WARNING >"$LS_VENV/template-start.log" 2>&1 &
    pid=$!
    # Any failure below must not leave LS running.
    trap 'kill "$pid" 2>/dev/null || true' EXIT
    until "$LS_VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$port/health" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 40 "$LS_VENV/template-start.log" >&2
            log "label-studio exited before becoming healthy"
            exit 1
        fi
        if ((SECONDS - start > 300)); then
            tail -n 40 "$LS_VENV/template-start.log" >&2
            log "label-studio not healthy after 300 s"
            exit 1
        fi
        sleep 1
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    trap - EXIT
    printf '%s\n%s\n' "$LS_ADMIN_EMAIL" "$LS_ADMIN_PASSWORD" >"$tmp/.template-ready"
    rm -rf "$LS_TEMPLATE"
    mv "$tmp" "$LS_TEMPLATE"
    log "template ready in $((SECONDS - start)) s: $LS_TEMPLATE"
}

install_venv
if ((VENV_ONLY == 0)); then
    make_template
fi
