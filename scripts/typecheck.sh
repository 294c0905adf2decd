#!/usr/bin/env bash
# mypy --strict over callward by its import names. The four folders install as
# subpackages of callward through package-dir, which mypy cannot follow, so this
# checks a tree of symlinks laid out as the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tree=$repo/.venv/typecheck
rm -rf "$tree"
mkdir -p "$tree/callward"
ln -s "$repo/callward/__init__.py" "$tree/callward/__init__.py"
ln -s "$repo/callward/py.typed" "$tree/callward/py.typed"
for package in core policies sandbox audit; do
    ln -s "$repo/$package" "$tree/callward/$package"
done
# From inside the tree, so the repository's own callward/ folder cannot shadow it.
cd "$tree"
exec "$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" -p callward "$@"
