#!/usr/bin/env bash
# Install everything, then run the main job once: start the backend on a tiny checkpoint, ask it to find
# the ships in a generated GeoTIFF, and write the boxes as a GeoPackage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
out=${OUT_DIR:-out}
mkdir -p "$out"
ed=.venv/bin/earthdial
[ -f "$out/tiny/config.json" ] || $ed make-tiny-checkpoint "$out/tiny"
$ed make-sample "$out/sample_scene.tif"
endpoint=${EARTHDIAL_ENDPOINT:-tcp://127.0.0.1:5557}
$ed serve --model "$out/tiny" --endpoint "$endpoint" --device auto > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  if $ed status --endpoint "$endpoint" --timeout 1 >/dev/null 2>&1; then break; fi
  sleep 1
done
$ed status --endpoint "$endpoint"
echo "--- asking: where are the ships?"
$ed ask "$out/sample_scene.tif" --task refer --prompt ships --endpoint "$endpoint" -o "$out/ships.gpkg"
echo "--- the tiny checkpoint has random weights: its answer is noise. The same answer path, with a known answer:"
$ed georef "$out/sample_scene.tif" --answer "<ref>ship</ref><box>[[26, 39, 35, 41, 20]]</box>" -o "$out/ships_known.gpkg" --preview "$out/ships_known.png"
echo "done: GeoPackages and a PNG preview in $(cd "$out" && pwd)/ (open the GeoPackages in QGIS over $out/sample_scene.tif)"
