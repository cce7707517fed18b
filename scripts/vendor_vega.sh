#!/usr/bin/env bash
# Rebuild plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so
# `dvc plots show` / `dvc plots diff` render without a network (DVC's own page loads them from a
# CDN). .dvc/config points `plots.html_template` at it. The versions are the ones DVC's page names
# (dvc_render/vega.py). Needs npm; run from anywhere, commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "${VERSIONS[@]}" >/dev/null)
for tgz in "$tmp"/*.tgz; do
  mkdir -p "${tgz%.tgz}" && tar xzf "$tgz" -C "${tgz%.tgz}"
done
out=plots/offline.html
{
  cat <<'EOF'
<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>NLA plots</title>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
EOF
  for v in "${VERSIONS[@]}"; do
    name=${v%@*}
    dir=$(ls -d "$tmp/$name-"[0-9]*/)
    echo "    <!-- $v (npm), BSD-3-Clause:"
    sed 's/--/- -/g; s/^/         /; s/ *$//' "$dir/package/LICENSE"
    echo "    -->"
    echo "    <script>$(cat "$dir/package/build/$name.min.js")</script>"
  done
  cat <<'EOF'
</head>
<body>
    {plot_divs}
</body>
</html>
EOF
} >"$out"
echo "wrote $out ($(wc -c <"$out") bytes) from ${VERSIONS[*]}"
