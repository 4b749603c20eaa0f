#!/usr/bin/env bash
# Make the README's picture: docs/demo-sheet.png, the sheet `nst demo` writes (content and
# style drawn by the program, and the render). It uses ImageNet weights when they are in the
# torch hub cache and seeded random weights otherwise, and says which on the sheet.
#   bash docs/make_pictures.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
NST=${NST:-.venv/bin/nst}
"$NST" -q demo --out "$tmp" --steps "${1:-200}" --size 256
cp "$tmp/sheet.png" docs/demo-sheet.png
echo "wrote docs/demo-sheet.png"
