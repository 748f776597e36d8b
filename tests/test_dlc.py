"""DeepLabCut's own tools on posezoo's results, in a real DeepLabCut project.

The project is made by ``deeplabcut.create_new_project`` with a clip of the real openfield
video; posezoo's CLI analyses it; then DeepLabCut's functions must find and read the results:
``create_labeled_video`` (``init_weights=`` route and shuffle route), ``filterpredictions``,
``extract_outlier_frames``, ``analyze_videos_converth5_to_csv`` and ``plot_trajectories``.
"""

import pickle
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from posezoo.dlc import deeplabcut_scorer, init_weights_name, output_stem, scorer_name
from posezoo.errors import InputError
from posezoo.table import PoseTable
from posezoo.video import VideoWriter, collect_videos, iter_frames, probe
from posezoo.zoo import default_zoo

CLIP_FRAMES = 90
MOUSE_KEYPOINTS = ["snout", "leftear", "rightear", "tailbase"]


def posezoo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "posezoo", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _frames(video: Path) -> int:
    with av.open(str(video)) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))


@pytest.fixture(scope="module")
def dlc():
    dlc = pytest.importorskip("deeplabcut")
    return dlc


@pytest.fixture(scope="module")
def clip(openfield_video, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "openfield.mp4"
    info = probe(openfield_video)
    with VideoWriter(out, info.width, info.height, info.fps) as w:
        for frame in iter_frames(openfield_video, max_frames=CLIP_FRAMES):
            w.write(frame)
    return out


@pytest.fixture()
def project(dlc, clip, tmp_path):
    config = Path(dlc.create_new_project("openfield", "posezoo", [str(clip)], working_directory=str(tmp_path),
                                         copy_videos=True))
    dlc.auxiliaryfunctions.edit_config(str(config), {
        "bodyparts": MOUSE_KEYPOINTS, "skeleton": [["snout", "leftear"], ["snout", "rightear"],
                                                   ["snout", "tailbase"]], "pcutoff": 0.4})
    video = config.parent / "videos" / "openfield.mp4"
    assert video.is_file()
    return config, video


def test_names_and_columns_follow_deeplabcut():
    zoo = default_zoo()
    mouse = zoo.card("posezoo_mouse")
    assert scorer_name(mouse) == f"DLC_posezoo_mouse_{mouse.version}"
    assert output_stem("/x/m3v1mp4.mp4", scorer_name(mouse)) == f"m3v1mp4DLC_posezoo_mouse_{mouse.version}"
    # DeepLabCut's create_labeled_video names the scorer "DLC_" + Path(init_weights).stem
    assert "DLC_" + Path(init_weights_name(scorer_name(mouse))).stem == scorer_name(mouse)
    # SuperAnimal: as deeplabcut.video_inference_superanimal names them
    sa = zoo.card("superanimal_topviewmouse")
    det = zoo.card(sa.detector)
    assert scorer_name(sa, det) == "superanimal_topviewmouse_hrnet_w32_fasterrcnn_resnet50_fpn_v2"
    assert output_stem("v.mp4", scorer_name(sa, det)) == "v_superanimal_topviewmouse_hrnet_w32_fasterrcnn_resnet50_fpn_v2"
    from deeplabcut.modelzoo.utils import get_super_animal_scorer

    assert scorer_name(sa, det) == get_super_animal_scorer(
        "superanimal_topviewmouse", sa.upstream.filename, det.upstream.filename)


def test_single_animal_three_levels_multi_animal_four(tmp_path):
    rng = np.random.default_rng(0)
    single = PoseTable(rng.random((5, 1, 4, 3), dtype=np.float32), tuple(MOUSE_KEYPOINTS), scorer="DLC_m_1")
    multi = PoseTable(rng.random((5, 1, 4, 3), dtype=np.float32), tuple(MOUSE_KEYPOINTS), scorer="DLC_m_1",
                      multi_animal=True)
    assert single.to_dataframe().columns.names == ["scorer", "bodyparts", "coords"]
    assert multi.to_dataframe().columns.names == ["scorer", "individuals", "bodyparts", "coords"]
    for table, levels in ((single, 3), (multi, 4)):
        paths = table.save(tmp_path / str(levels), ["h5", "csv"], stem="v")
        df = pd.read_csv(paths["csv"], header=list(range(levels)), index_col=0)  # as DeepLabCut reads it
        np.testing.assert_allclose(df.to_numpy(), table.to_dataframe().to_numpy(), rtol=1e-6)
        for fmt in ("h5", "csv"):
            back = PoseTable.load(paths[fmt])
            assert back.multi_animal == table.multi_animal
            np.testing.assert_allclose(back.data, table.data, rtol=1e-6)
        meta = pickle.loads(paths["dlc_meta"].read_bytes())["data"]
        assert meta["Scorer"] == "DLC_m_1" and meta["nframes"] == 5 and meta["bodyparts"] == MOUSE_KEYPOINTS


def test_collect_videos_folder_glob_extensions(tmp_path):
    for name in ("a.mp4", "b.avi", "c.MP4", "a_labeled.mp4", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in collect_videos([tmp_path])] == ["a.mp4", "b.avi", "c.MP4"]
    assert [p.name for p in collect_videos([tmp_path], ["avi"])] == ["b.avi"]
    assert [p.name for p in collect_videos([str(tmp_path / "*.mp4"), tmp_path / "a.mp4"])] == ["a.mp4"]
    assert [p.name for p in collect_videos([tmp_path / "notes.txt"])] == ["notes.txt"]  # a file is taken as given
    with pytest.raises(InputError, match="no video in folder"):
        collect_videos([tmp_path], ["mkv"])
    with pytest.raises(InputError, match="no such file"):
        collect_videos([tmp_path / "missing.mp4"])


@pytest.mark.slow
def test_cli_folder_skip_overwrite_filter_labelled_video(clip, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("one.mp4", "two.mp4"):
        (videos / name).write_bytes(clip.read_bytes())
    (videos / "skipme.avi").write_bytes(clip.read_bytes())
    out = tmp_path / "out"
    r = posezoo("predict", videos, "--video-extensions", "mp4", "--out", out, "--filter", "median",
                "--labeled-video", "--max-frames", 40, "--no-progress")
    assert r.returncode == 0, r.stderr
    scorer = scorer_name(default_zoo().card("posezoo_mouse"))
    for name in ("one", "two"):
        raw = PoseTable.load(out / f"{name}{scorer}.h5")
        filtered = PoseTable.load(out / f"{name}{scorer}_filtered.h5")
        assert raw.n_frames == filtered.n_frames == 40 and raw.scorer == scorer
        assert not np.array_equal(raw.xy, filtered.xy)  # the raw table is kept, the filtered one is beside it
        assert "filter" not in raw.metadata and filtered.metadata["filter"]["method"] == "median"
        assert (out / f"{name}{scorer}_meta.pickle").is_file()
        assert _frames(out / f"{name}{scorer}_filtered_labeled.mp4") == 40  # --max-frames holds for the video
        assert f"{name}.mp4: labelled video" in r.stdout and "frames/s)" in r.stdout
    assert not list(out.glob("skipme*"))
    before = (out / f"one{scorer}.h5").stat().st_mtime_ns
    r = posezoo("predict", videos / "one.mp4", "--out", out, "--filter", "median", "--max-frames", 40, "--no-progress")
    assert r.returncode == 0 and "already analysed" in r.stdout, r.stdout + r.stderr
    assert (out / f"one{scorer}.h5").stat().st_mtime_ns == before
    r = posezoo("predict", videos / "one.mp4", "--out", out, "--max-frames", 30, "--overwrite", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert PoseTable.load(out / f"one{scorer}.h5").n_frames == 30
    r = posezoo("predict", tmp_path / "nothing", "--out", out)
    assert r.returncode != 0 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_deeplabcut_tools_on_posezoo_results(dlc, project, tmp_path):
    """Route 1: create_labeled_video names the scorer by init_weights; route 2: the shuffle-based
    calls run inside posezoo.dlc.deeplabcut_scorer."""
    config, video = project
    folder = video.parent
    card = default_zoo().card("posezoo_mouse")
    scorer = scorer_name(card)

    # -- route 1: results beside the video, DeepLabCut finds them by init_weights --------------
    r = posezoo("predict", folder, "--out", folder, "--format", "h5", "--filter", "median", "--no-progress")
    assert r.returncode == 0, r.stderr
    raw = folder / f"openfield{scorer}.h5"
    assert raw.is_file() and (folder / f"openfield{scorer}_filtered.h5").is_file()
    assert dlc.create_labeled_video(str(config), [str(video)], init_weights=init_weights_name(scorer)) == [True]
    labelled = sorted(folder.glob(f"openfield{scorer}*_labeled.mp4"))
    assert len(labelled) == 1 and _frames(labelled[0]) == CLIP_FRAMES
    dlc.create_labeled_video(str(config), [str(video)], init_weights=init_weights_name(scorer), filtered=True)
    assert len(sorted(folder.glob(f"openfield{scorer}_filtered*_labeled.mp4"))) == 1
    dlc.analyze_videos_converth5_to_csv(str(folder), ".mp4")
    csv = pd.read_csv(folder / f"openfield{scorer}.csv", header=[0, 1, 2], index_col=0)  # single animal: 3 levels
    h5 = pd.read_hdf(raw)
    assert csv.shape == (CLIP_FRAMES, 12) and list(h5.columns.names) == ["scorer", "bodyparts", "coords"]
    np.testing.assert_allclose(csv.to_numpy(), h5.to_numpy(), rtol=1e-6)

    # -- route 2: the calls that name the scorer from a trained shuffle, inside deeplabcut_scorer --
    for old in folder.glob(f"openfield{scorer}_filtered*"):
        old.unlink()
    with deeplabcut_scorer(scorer):
        dlc.filterpredictions(str(config), [str(video)], filtertype="median", windowlength=5)
        filtered = pd.read_hdf(folder / f"openfield{scorer}_filtered.h5")
        assert filtered.shape == (CLIP_FRAMES, 12) and np.isfinite(filtered.to_numpy()).all()
        # DeepLabCut's median filter and posezoo's --filter median agree
        r = posezoo("predict", video, "--out", tmp_path / "mine", "--format", "h5", "--filter", "median",
                    "--no-progress")
        assert r.returncode == 0, r.stderr
        mine = pd.read_hdf(tmp_path / "mine" / f"openfield{scorer}_filtered.h5")
        np.testing.assert_allclose(mine.xs("x", level="coords", axis=1).to_numpy()[2:-2],
                                   filtered.xs("x", level="coords", axis=1).to_numpy()[2:-2], atol=1e-3)
        dlc.create_labeled_video(str(config), [str(video)], filtered=True)
        assert len(sorted(folder.glob(f"openfield{scorer}_filtered*_labeled.mp4"))) == 1
        dlc.plot_trajectories(str(config), [str(video)])
        assert list((folder / "plot-poses" / "openfield").glob("*.png"))
        dlc.extract_outlier_frames(str(config), [str(video)], outlieralgorithm="uncertain", p_bound=0.99,
                                   automatic=True)
    extracted = config.parent / "labeled-data" / "openfield"
    assert list(extracted.glob("img*.png")), "extract_outlier_frames wrote no frame"
    machine = pd.read_hdf(next(extracted.glob("machinelabels-iter*.h5")))
    assert set(machine.columns.get_level_values("bodyparts")) == set(MOUSE_KEYPOINTS)
    # the block restores DeepLabCut's own lookup: outside it, DeepLabCut asks for a trained shuffle again
    with pytest.raises(Exception):
        dlc.filterpredictions(str(config), [str(video)])


