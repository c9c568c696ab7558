#!/usr/bin/env bash
# Prints the release notes of VERSION: its section of CHANGELOG.md (from `## [VERSION]` to the next `## [`),
# without the heading. Fails when the section is missing or empty, so a tag without notes is not released.
#
#   hack/release-notes.sh 0.2.0            # or v0.2.0
#   hack/release-notes.sh 0.2.0 CHANGELOG.md
set -euo pipefail
version="${1:?usage: hack/release-notes.sh VERSION [CHANGELOG]}"
version="${version#v}"
changelog="${2:-$(dirname "${BASH_SOURCE[0]}")/../CHANGELOG.md}"
notes=$(awk -v v="$version" '
    /^## \[/ { if (inside) exit; if (index($0, "## [" v "]") == 1) { inside = 1; next } }
    inside { print }
' "$changelog")
if [[ -z "${notes//[[:space:]]/}" ]]; then
    echo "hack/release-notes.sh: no section '## [$version]' with notes in $changelog" >&2
    exit 1
fi
printf '%s\n' "$notes" | sed -e '/./,$!d'
