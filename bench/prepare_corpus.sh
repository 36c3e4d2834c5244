#!/usr/bin/env bash
# The technique scenarios' corpus now ships in the package (builtin:shakespeare_wikitext, see
# suite/data/corpus/README.md); nothing needs preparing. This script is kept for the reproduction
# commands of the committed reports, which name .data/shakespeare_wikitext.txt: it writes that file
# from the shipped copy and, where the original sources are at hand ($SHARED_DATA, default
# ../shared/data), checks that the shipped copy is their concatenation byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
shipped=suite/data/corpus/shakespeare_wikitext.txt
shared=${SHARED_DATA:-../shared/data}
if [ -f "$shared/tinyshakespeare/input.txt" ] && [ -f "$shared/wikitext-2/valid.txt" ]; then
    cat "$shared/tinyshakespeare/input.txt" "$shared/wikitext-2/valid.txt" | cmp - "$shipped"
    echo "the shipped corpus equals the concatenation of $shared's sources"
fi
mkdir -p .data
cp "$shipped" .data/shakespeare_wikitext.txt
wc -c .data/shakespeare_wikitext.txt
