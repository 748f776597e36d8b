"""Writes notebooks/posezoo_quickstart.ipynb (run after editing the cells here: the notebook is
data, this is its source). ``python notebooks/make_quickstart.py``"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# posezoo quickstart: animal pose from a zoo model, no labelling

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/posezoo/posezoo/blob/main/notebooks/posezoo_quickstart.ipynb)

1. install posezoo, 2. pick a zoo model by species, 3. predict a video, 4. plot trajectories,
5. watch the labelled video, 6. send the video to a hosted posezoo service, 7. fine-tune a model
from a few labelled frames (DeepLabCut's `labeled-data` format).

Set the paths in the next cells to your own files (on Colab: upload them in the file pane)."""),
    new_code_cell("""# 1. Install (on Colab; a machine that already has posezoo skips this)
import importlib.util, subprocess, sys
if importlib.util.find_spec("posezoo") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "posezoo[train]"], check=True)"""),
    new_code_cell("""import os
from pathlib import Path

VIDEO = os.environ.get("POSEZOO_NOTEBOOK_VIDEO", "my_mouse_video.mp4")        # your video
LABELLED = os.environ.get("POSEZOO_NOTEBOOK_LABELLED", "labeled-data/video1")  # DeepLabCut labelled frames
SERVICE_URL = os.environ.get("POSEZOO_URL")          # a posezoo service, e.g. https://pose.example.org
API_KEY = os.environ.get("POSEZOO_API_KEY")
MAX_FRAMES = int(os.environ.get("POSEZOO_NOTEBOOK_MAX_FRAMES", "300"))
FINETUNE_STEPS = int(os.environ.get("POSEZOO_NOTEBOOK_STEPS", "300"))
OUT = Path("posezoo_out"); OUT.mkdir(exist_ok=True)"""),
    new_markdown_cell("## 2. The zoo, by species"),
    new_code_cell("""import posezoo

zoo = posezoo.Zoo()
for card in zoo.cards():
    if card.task != "detector":
        print(f"{card.name:42s} {','.join(card.species):18s} {card.view:5s} {len(card.keypoints):3d} kp  "
              f"{'ready' if zoo.ready(card) else zoo.how_to_get(card)}")
card = zoo.recommend("mouse", view="top")
print("recommended for a top-view mouse:", card.ref)"""),
    new_markdown_cell("## 3. Predict a video"),
    new_code_cell("""predictor = posezoo.load(card.ref)
table = predictor.predict_video(VIDEO, max_frames=MAX_FRAMES, progress=False)
print(table.n_frames, "frames,", len(table.keypoints), "keypoints:", ", ".join(table.keypoints))
paths = table.save(OUT, ["h5", "csv"])  # DeepLabCut's names: <video><scorer>.h5/.csv/_meta.pickle
print("wrote", paths["h5"].name)
table.to_dataframe().head()"""),
    new_markdown_cell("## 4. Trajectories"),
    new_code_cell("""import matplotlib.pyplot as plt
import numpy as np

fig, ax = plt.subplots(figsize=(6, 4.5))
for k, name in enumerate(table.keypoints):
    xy = table.data[:, 0, k, :2]
    ok = table.data[:, 0, k, 2] >= card.pcutoff
    ax.plot(xy[ok, 0], xy[ok, 1], ".", ms=2, label=name)
ax.invert_yaxis(); ax.set_aspect("equal"); ax.legend(markerscale=5); ax.set_title(card.ref)
plt.show()"""),
    new_markdown_cell("## 5. The labelled video"),
    new_code_cell("""from IPython.display import Video
from posezoo.render import render_labeled_video

labelled_video = render_labeled_video(VIDEO, table, OUT / f"{paths['h5'].stem}_labeled.mp4", skeleton=card.skeleton,
                                      pcutoff=card.pcutoff)
Video(str(labelled_video), embed=True, width=480)"""),
    new_markdown_cell("## 6. The hosted service (skipped when `POSEZOO_URL` is not set)"),
    new_code_cell("""if SERVICE_URL:
    from posezoo.client import Client

    with Client(SERVICE_URL, api_key=API_KEY, progress=False) as client:
        result = client.predict(VIDEO, formats=["h5"], out=OUT / "service")
    print("service job", result.job["id"], result.job["status"], "-", result.table.n_frames, "frames")
else:
    print("no POSEZOO_URL: skipping the service")"""),
    new_markdown_cell("## 7. Fine-tune from labelled frames"),
    new_code_cell("""from posezoo.training import ModelInfo, TrainConfig, train_model

mine = train_model(LABELLED, ModelInfo(name="my_mouse", version="1.0.0", species=("mouse",), view="top"),
                   store=OUT / "models", cfg=TrainConfig(steps=FINETUNE_STEPS, batch_size=4, warmup_steps=1,
                                                          eval_every=max(1, FINETUNE_STEPS), head_width=16),
                   test_fraction=0.2, progress=False, log=lambda *a: None)
print("trained", mine.ref, "- test mean error", mine.metrics["test"]["overall"]["mean_px"], "px")
mine_predictor = posezoo.load(str(OUT / "models" / mine.name / mine.version / "card.yaml"))
print(mine_predictor.predict_video(VIDEO, max_frames=10, progress=False).n_frames, "frames with my model")"""),
]
for i, cell in enumerate(cells):  # stable ids: regenerating gives the same file
    cell["id"] = f"cell-{i:02d}"
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"},
                                         "language_info": {"name": "python"}, "colab": {"provenance": []}})
nbformat.write(nb, Path(__file__).with_name("posezoo_quickstart.ipynb"))
