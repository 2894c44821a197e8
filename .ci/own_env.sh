#!/usr/bin/env bash
# CI stage: gopd in a user's own environment. A fresh venv with torch (as a user with their own CUDA
# torch has), then
#   1. a plain `pip install .` (pip's defaults: an isolated build that must not fetch a torch of its
#      own), and the C++ extension built on first use against that torch;
#   2. inside that venv, activated, `make test-env` in a fresh clone: make must install into it and
#      say so, and the Python it chose must import torch and gopd_kernels and run a backend="cpu" loss.
set -euo pipefail
cd "$(dirname "$0")/.."
own=$(mktemp -d)
trap 'rm -rf "$own"' EXIT
start=$SECONDS
python3 -m venv "$own/venv"
"$own/venv/bin/pip" install -q --only-binary=:all: torch==2.13.0

echo "== own environment 1/2: plain pip install ."
"$own/venv/bin/pip" install -v . > "$own/pip.log" 2>&1 || { tail -40 "$own/pip.log"; exit 1; }
if grep -qiE "^\s*(collecting|downloading) torch" "$own/pip.log"; then
    grep -iE "torch" "$own/pip.log" | head; echo "pip install . fetched a torch"; exit 1
fi
cat > "$own/loss.py" <<'PY'
import sys, time
import torch
import gopd_kernels as gk

t0 = time.perf_counter()
z = torch.randn(8, 33, requires_grad=True)
zt, y = torch.randn(8, 33), torch.randint(0, 33, (8,))
losses = {}
for backend in ("cpu", "torch"):
    out = gk.gopd_loss(z, y, zt, mode="full", backend=backend)
    out.loss.backward()
    losses[backend] = out.loss.item()
assert abs(losses["cpu"] - losses["torch"]) < 1e-5, losses
import gopd_kernels._C as C
print(f"gopd_kernels from {gk.__file__}, extension {C.__file__}, losses {losses}, "
      f"{time.perf_counter() - t0:.0f} s (including any build on first use)")
PY
(cd "$own" && GOPD_CACHE_DIR="$own/cache" "$own/venv/bin/python" loss.py)

echo "== own environment 2/2: make test-env inside the activated venv, in a fresh clone"
git clone -q . "$own/clone"
unset ISOLATED  # the point here is the user's own environment
# shellcheck disable=SC1091
. "$own/venv/bin/activate"
make -C "$own/clone" test-env | tee "$own/make.log"
grep -q "== installing into your environment $own/venv" "$own/make.log"
py=$(make -s -C "$own/clone" which-python)
[ "$(dirname "$py")" = "$own/venv/bin" ] || { echo "make chose $py, not the active venv's python"; exit 1; }
(cd "$own/clone" && "$py" "$own/loss.py")
deactivate
echo "== own environment checked in $((SECONDS - start)) s"
