#!/usr/bin/env bash
# `make demo`: index a freshly generated photo folder with the project's own small CLIP
# model (offline), then run a text query, a video moment, a RAW photo, an image query, image->text and a zero-shot tag.
# The file names say what each image shows, so you can check the answers by eye.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
CLIPDEX=.venv/bin/clipdex
MODEL=data/demo-model/clipdex-demo.json
WEIGHTS=data/demo-model/clipdex-demo.pt
DEMO=demo
LIB="$DEMO/library"

for file in "$MODEL" "$WEIGHTS"; do
  [ -f "$file" ] || { echo "missing $file - rebuild it with: $PY data/train_demo_model.py" >&2; exit 1; }
done

echo "== Model: clipdex-demo, the project's own small CLIP trained on generated shapes (see data/README.md)."
echo "   It is a demo model only: it knows coloured shapes on backgrounds, nothing else."
echo "   The default model for real photos is ViT-B-32 / laion2b_s34b_b79k."
rm -rf "$DEMO"
mkdir -p "$DEMO"
echo
echo "== Generating 80 photos of coloured shapes in $DEMO/photos (a seed the model never trained on)"
# A seed the model never trained on: these are held-out images.
"$PY" data/shapes.py --out "$DEMO/photos" --count 80 --seed 777 --captions 1 > /dev/null
"$PY" -c "import sys; sys.path.insert(0, 'data'); import shapes; print('\n'.join(shapes.class_labels()))" > "$DEMO/labels.txt"
echo
echo "== Generating a 12-second video of four scenes and a RAW photo (DNG, stored sideways) in $DEMO/photos"
"$PY" data/media_samples.py video "$DEMO/photos/party.mp4" --seed 778 --scenes 4 --seconds 3 | tee "$DEMO/video-scenes.txt"
"$PY" data/media_samples.py dng "$DEMO/photos/IMG_0001.dng" --seed 779 --orientation 6 | tee "$DEMO/raw-photo.txt"
SCENE=$(sed -n '3p' "$DEMO/video-scenes.txt" | cut -f3)
RAW_CAPTION=$(cut -f2 "$DEMO/raw-photo.txt")
sed 's/^/a photo of a /' "$DEMO/labels.txt" > "$DEMO/captions.txt"
# The same labels in Chinese ("红色的圆"): a text corpus that English queries find (the model is trilingual).
"$PY" -c "import sys; sys.path.insert(0, 'data'); import shapes; print('\n'.join(shapes.short_query(l, 'zh') for l in shapes.class_labels()))" > "$DEMO/labels-zh.txt"

echo
echo "== clipdex index $DEMO/photos"
"$CLIPDEX" index "$DEMO/photos" --library "$LIB" --model "$MODEL" --pretrained "$WEIGHTS"
echo
echo "== clipdex index-texts $DEMO/captions.txt $DEMO/labels-zh.txt (English and Chinese texts)"
"$CLIPDEX" index-texts "$DEMO/captions.txt" "$DEMO/labels-zh.txt" --library "$LIB"

echo
echo "== text -> image: clipdex search \"a red circle\" --kind image -k 5"
"$CLIPDEX" search "a red circle" --kind image -k 5 --library "$LIB"

echo
echo "== a moment in a video: clipdex search \"$SCENE\" --kind video --per-video 2"
echo "   (party.mp4 shows it from 00:06 to 00:09: see $DEMO/video-scenes.txt)"
"$CLIPDEX" search "$SCENE" --kind video --per-video 2 --library "$LIB"
echo
echo "== a RAW photo: clipdex search \"$RAW_CAPTION\" -k 3"
"$CLIPDEX" search "$RAW_CAPTION" -k 3 --library "$LIB"
echo "== the same in Chinese and in Spanish: clipdex search \"红色的圆\" / \"un círculo rojo\" --kind image -k 5"
echo "   (the demo model was trained on captions in English, Chinese and Spanish: the same red circles come back)"
"$CLIPDEX" search "红色的圆" --kind image -k 5 --library "$LIB"
"$CLIPDEX" search "un círculo rojo" --kind image -k 5 --library "$LIB"
echo
echo "== a query that mixes languages: clipdex search \"红色的 circle\" --kind image -k 5"
"$CLIPDEX" search "红色的 circle" --kind image -k 5 --library "$LIB"

echo
echo "== an English query finds the Chinese texts: clipdex search \"a blue star\" --kind text -k 3"
"$CLIPDEX" search "a blue star" --kind text -k 3 --library "$LIB"

QUERY_IMAGE=$(ls "$DEMO/photos"/*.jpg | head -n 1)
echo
echo "== image -> image: clipdex search --image $QUERY_IMAGE --kind image -k 5"
"$CLIPDEX" search --image "$QUERY_IMAGE" --kind image -k 5 --library "$LIB"

echo
echo "== image -> text: clipdex search --image $QUERY_IMAGE --kind text -k 3"
"$CLIPDEX" search --image "$QUERY_IMAGE" --kind text -k 3 --library "$LIB"

echo
echo "== zero-shot tag: clipdex tag (3 images) --labels $DEMO/labels.txt --template 'a photo of a {}'"
"$CLIPDEX" tag $(ls "$DEMO/photos"/*.jpg | sed -n '2p;3p;4p') --labels "$DEMO/labels.txt" --template "a photo of a {}" --top 2 --library "$LIB"

"$CLIPDEX" search "a blue square" --kind image -k 12 --format html --out "$DEMO/blue-square.html" --library "$LIB"
echo
echo "Open $DEMO/blue-square.html to see the hits for \"a blue square\" as thumbnails."
echo "Library: $LIB ($("$CLIPDEX" stats --library "$LIB" --json | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print(d["images"], "images,", d["videos"], "video,", d["texts"], "texts")'))"
