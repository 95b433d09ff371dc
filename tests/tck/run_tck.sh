#!/usr/bin/env bash
# Run the official A2A TCK (a2aproject/a2a-tck) against `corral up` of config/tck.toml.
#
#   tests/tck/run_tck.sh TCK_DIR [CATEGORY ...]     (default: mandatory)
#
# TCK_DIR is a checkout of https://github.com/a2aproject/a2a-tck (docs/a2a.md names the commit);
# it is never copied into this repository. Its own venv is made there on first use
# (`python3 -m venv TCK_DIR/.venv && TCK_DIR/.venv/bin/pip install -e TCK_DIR`).
# The fleet runs from a temporary CORRAL_HOME with a fresh token; each category's output goes
# to $OUT/<category>.log (OUT defaults to a new temporary directory) and the summary lines to
# stdout. Exit status: 0 when every category asked for passed.
set -euo pipefail

tck=${1:?usage: run_tck.sh TCK_DIR [CATEGORY ...]}
shift
categories=("${@:-mandatory}")
tck=$(cd "$tck" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
corral=${CORRAL:-$repo/.venv/bin/corral}
config=$repo/config/tck.toml
port=8765
work=$(mktemp -d /tmp/corral-tck.XXXXXX)
out=${OUT:-$work}
mkdir -p "$out"

if [[ ! -x $tck/.venv/bin/python ]]; then
    python3 -m venv "$tck/.venv"
    "$tck/.venv/bin/pip" install -q -e "$tck"
fi

export CORRAL_HOME=$work/home CORRAL_A2A_TOKENS=$work/tokens.toml
token=$("$corral" a2a --config "$config" --new-token tck 2>"$work/token.err") \
    || { cat "$work/token.err"; exit 2; }
"$corral" up --config "$config" >"$work/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    kill -0 $up 2>/dev/null || { cat "$work/up.log"; exit 2; }
    sleep 0.5
done
curl -fs "http://127.0.0.1:$port/healthz" >/dev/null || { echo "no A2A server on :$port"; exit 2; }

status=0
for category in "${categories[@]}"; do
    (cd "$tck" && A2A_AUTH_TYPE=bearer A2A_AUTH_TOKEN=$token \
        .venv/bin/python run_tck.py --sut-url "http://localhost:$port/agents/tck/" \
        --category "$category" --transports jsonrpc) >"$out/$category.log" 2>&1 || status=1
    echo "$category: $(grep -E '(passed|failed|error).* in [0-9.]+s' "$out/$category.log" | tail -1)"
done
echo "logs in $out"
exit $status
