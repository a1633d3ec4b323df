#!/bin/sh
# nbtrain's set-up, into the Python that `python` runs (activate a virtual environment first to keep it apart):
#   sh tools/setup.sh       torch, then nbtrain (editable) with its runtime dependencies: enough to train
#   sh tools/setup.sh dev   the same with the development and test tools, and Debian's Chromium for the browser tests
# Run it as often as you like: what is already there is kept, so a second run takes a second or two. nbtrain is
# installed again when settings.ini, setup.py or pyproject.toml changed since this Python last got it, or when this
# Python imports nbtrain from another folder. Set NBTRAIN_SETUP_FORCE=1 to install again anyway (newest releases).
set -eu
cd "$(dirname "$0")/.."
case "${1:-}" in
    "" | dev) extra="${1:-}" ;;
    *) echo "usage: sh tools/setup.sh [dev]" >&2; exit 2 ;;
esac
if ! python -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "nbtrain needs a \`python\` of version 3.10 or newer; found: $(python --version 2>&1)" >&2
    exit 1
fi
echo "set-up ${extra:-runtime} into $(python -c 'import sys; print(sys.prefix)')"

# torch before the rest: a plain `torch` requirement would pull a multi-GB CUDA build where the CPU build does. On a
# machine with a GPU, install the torch build for your CUDA version first; this keeps any torch it finds.
python -c 'import torch' 2>/dev/null || python -m pip install torch==2.13.0

# The stamp lives in the environment it describes, so a new virtual environment always gets a full install.
prefix="$(python -c 'import sys; print(sys.prefix)')"
want="$(pwd) $(cat settings.ini setup.py pyproject.toml | cksum)"
here="$(python -c 'import importlib.util as u; s = u.find_spec("nbtrain"); print(s.submodule_search_locations[0] if s else "")' 2>/dev/null || true)"
done_for() { [ "$(cat "$prefix/.nbtrain-setup-$1" 2>/dev/null)" = "$want" ]; }
if [ -n "${NBTRAIN_SETUP_FORCE:-}" ] || [ "$here" != "$(pwd)/nbtrain" ] || ! { done_for "${extra:-runtime}" || { [ -z "$extra" ] && done_for dev; }; }; then
    python -m pip install ${NBTRAIN_SETUP_FORCE:+--upgrade} -e ".${extra:+[$extra]}"
    echo "$want" > "$prefix/.nbtrain-setup-${extra:-runtime}" 2>/dev/null || true
else
    echo "nbtrain${extra:+[$extra]} is installed from $(pwd) and its requirements have not changed"
fi

# Only the browser tests of the dashboard and the docs site need Chromium (Debian's package, driven by Playwright).
if [ "$extra" = dev ] && ! command -v chromium >/dev/null; then
    if command -v apt-get >/dev/null; then
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium
    else
        echo "no chromium and no apt-get: the browser tests will be skipped until Chromium is at /usr/bin/chromium" >&2
    fi
fi
