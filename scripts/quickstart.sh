#!/usr/bin/env bash
# Install everything, then run the main job once: start the backend on the built-in demo model, ask it to
# find the ships in a generated GeoTIFF, and write the boxes as a GeoPackage and a PNG preview.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
out=${OUT_DIR:-out}
mkdir -p "$out"
ed=.venv/bin/earthdial
$ed make-sample "$out/sample_scene.tif"
endpoint=${EARTHDIAL_ENDPOINT:-tcp://127.0.0.1:5557}
# no --model: the server loads the built-in demo model (a micro EarthDial trained on scenes like this one)
$ed serve --endpoint "$endpoint" --device auto --allow-dir "$out" > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  if $ed status --endpoint "$endpoint" --timeout 1 >/dev/null 2>&1; then break; fi
  sleep 1
done
$ed status --endpoint "$endpoint"
echo "--- asking: where are the ships?"
$ed ask "$out/sample_scene.tif" --task refer --prompt ships --endpoint "$endpoint" \
  -o "$out/ships.gpkg" --preview "$out/ships.png"
echo "done: $out/ships.gpkg (open it in QGIS over $out/sample_scene.tif), $out/ships.png (the scene with the"
echo "box drawn), $out/sample_scene.truth.geojson (where the objects really are)"
