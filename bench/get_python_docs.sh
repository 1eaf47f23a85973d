#!/usr/bin/env bash
# Debian's python3.11-doc reST sources -> DEST (default data/raw/python-docs): ~11 MB of English prose with
# real email addresses and phone numbers, the corpus of the PII experiment set (configs/experiments/pii_*).
# Needs the Debian package registry once (apt-get download), nothing at training time.
set -euo pipefail
dest=${1:-data/raw/python-docs}
[ -d "$dest" ] && { echo "$dest exists"; exit 0; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1 && dpkg-deb -x python3.11-doc_*.deb x)
mkdir -p "$(dirname "$dest")"
mv "$tmp/x/usr/share/doc/python3.11/html/_sources" "$dest"
echo "$(find "$dest" -name '*.txt' | wc -l) reST files in $dest"
