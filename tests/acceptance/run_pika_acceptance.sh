#!/usr/bin/env bash
# Run pika's own acceptance tests (tests/acceptance of pika's repository) against a broker.
#
# usage: PIKA_SRC=<pika repository or source tree> tests/acceptance/run_pika_acceptance.sh [URL] [pytest args...]
#
#   URL           broker to test; default $PIKA_TARGET_URL, else $WARREN_TEST_BROKER_URL, else
#                 amqp://guest:guest@127.0.0.1:5672/%2F. Loopback only, guest/guest only.
#   PIKA_SRC      pika's tests are not in its PyPI sdist, so name a copy of its repository:
#                 a git repository (bare or not; PIKA_REF is exported from it with
#                 `git archive`) or a plain source tree that has tests/acceptance.
#   PIKA_REF      git ref to test (default: the pika version installed here, e.g. 1.4.4).
#   PIKA_VENV     reuse this virtualenv instead of building one in the temp dir.
#   PIKA_KEEP=1   keep the temp dir (logs, junit xml) and print its path.
#   PIKA_ONLINE=1 also run the tests that resolve an internet host name (deselected by default).
#
# Nothing of pika is committed to Warren: the tree is copied to a temp dir at run time, and
# pika's code at that ref is what runs (`python -m pytest` from the tree puts it first on
# sys.path). The collection patterns are pika 1.4's, passed explicitly so older refs
# (whose repositories had no pytest config) collect the same files. tests/acceptance/pika_target.py retargets pika's hard-coded localhost:5672.
# Prints passed/failed/skipped/error counts and the names of the tests that did not pass;
# exits with pytest's exit code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
url="${PIKA_TARGET_URL:-${WARREN_TEST_BROKER_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}}"
if [[ $# -gt 0 && "$1" == amqp://* ]]; then
    url="$1"
    shift
fi
export PIKA_TARGET_URL="$url"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ -z "${PIKA_SRC:-}" ]]; then
    echo "run_pika_acceptance: set PIKA_SRC to a clone of pika's repository (its tests are not in the sdist)" >&2
    exit 2
fi
ref="${PIKA_REF:-$(python3 -c 'import pika; print(pika.__version__)' 2>/dev/null || echo 1.4.4)}"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/pika-acceptance.XXXXXX")"
cleanup() {
    if [[ "${PIKA_KEEP:-0}" == 1 ]]; then
        echo "run_pika_acceptance: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT

src="$tmp/pika"
mkdir -p "$src"
if git --git-dir="$PIKA_SRC" rev-parse --git-dir >/dev/null 2>&1 \
    || git -C "$PIKA_SRC" rev-parse --git-dir >/dev/null 2>&1; then
    gitdir="$PIKA_SRC"
    git --git-dir="$gitdir" rev-parse --git-dir >/dev/null 2>&1 \
        || gitdir="$(git -C "$PIKA_SRC" rev-parse --absolute-git-dir)"
    git --git-dir="$gitdir" archive --format=tar "$ref" | tar -x -C "$src"
    echo "pika source: $PIKA_SRC at $ref ($(git --git-dir="$gitdir" rev-parse --short "$ref^{commit}"))"
elif [[ -d "$PIKA_SRC/tests/acceptance" ]]; then
    cp -a "$PIKA_SRC/." "$src/"
    echo "pika source: $PIKA_SRC (plain tree, PIKA_REF ignored)"
else
    echo "run_pika_acceptance: $PIKA_SRC is neither a git repository nor a tree with tests/acceptance" >&2
    exit 2
fi

# pika's suite runs every async test on each adapter: gevent, tornado and twisted included.
venv="${PIKA_VENV:-$tmp/venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q pytest pytest-timeout gevent tornado twisted 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'Running pip as the' >&2 || true
"$venv/bin/python" -c 'import gevent, tornado, twisted, pytest, pytest_timeout'

# These resolve www.google.com: they test pika's DNS code, not the broker, and need the
# internet. PIKA_ONLINE=1 runs them too.
offline=()
if [[ "${PIKA_ONLINE:-0}" != 1 ]]; then
    offline=(--deselect tests/acceptance/io_services_tests.py::TestGetaddrinfoWWWGoogleDotComPort80)
    echo "deselected (need internet DNS): io_services_tests.py::TestGetaddrinfoWWWGoogleDotComPort80"
fi

echo "target: $PIKA_TARGET_URL"
cd "$src"
rc=0
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest tests/acceptance \
    -p pika_target --timeout 120 -q -rfE --no-header -o addopts="--strict-markers --tb=short" \
    -o "python_files=*_test.py *_tests.py test_*.py" \
    -o "python_classes=Test* *Test *Tests *TestCase" \
    --junitxml="$tmp/junit.xml" "${offline[@]}" "$@" >"$tmp/pytest.log" 2>&1 || rc=$?
tail -n 60 "$tmp/pytest.log"

"$venv/bin/python" - "$tmp/junit.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
bad = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    name = f"{case.get('classname')}::{case.get('name')}"
    kinds = {child.tag for child in case}
    for kind in ("failure", "error", "skipped"):
        if kind in kinds:
            counts["failed" if kind == "failure" else kind] += 1
            if kind != "skipped":
                bad.append(f"{kind.upper()} {name}")
            break
    else:
        counts["passed"] += 1
for line in bad:
    print(line)
print("pika acceptance: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
PY
exit "$rc"
