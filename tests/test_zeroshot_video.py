"""Video files and LamRA's video sets: MP4/AVI decoded with PyAV to the stored frame budget (`formats.video_file`),
`api.Video(FILE)` / `search --video FILE`, the `--settings.video_*` frame budget, `Reranker.score` on videos, and
MSR-VTT / MSVD converted from their published layouts (tests/fixtures/zeroshot/make_fixtures.py), scored by hand and
end to end with the tiny Qwen2-VL (index, retrieve of text and video queries, evaluate)."""

from __future__ import annotations

import csv
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import clean_error, convert_zeroshot, evaluate_zeroshot, lamra_here, ok
from lamra_pl.api import Reranker, Retriever, Video
from lamra_pl.errors import LamraError
from lamra_pl.formats.runs import read_run_file
from lamra_pl.formats.sample import decode_record, evaluation_query
from lamra_pl.formats.settings import ModelSettings
from lamra_pl.formats.shards import expand_shards, read_samples
from lamra_pl.formats.task import read_qrels
from lamra_pl.formats.video_file import read_video
from lamra_pl.models.video import budget_of
from lamra_pl.pipelines.evaluate import evaluate_runs

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "zeroshot"))
from make_fixtures import make, video

from test_zeroshot import task_runs

pytestmark = pytest.mark.filterwarnings("ignore:.*has no lamra-pl settings file:UserWarning")
SETS = ("msrvtt", "msvd")
T2V = "Find an everyday video match with caption."


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    return make(tmp_path_factory.mktemp("raw"), list(SETS))


@pytest.fixture(scope="module")
def converted(raw, tmp_path_factory) -> dict[str, Path]:
    return convert_zeroshot(raw, tmp_path_factory.mktemp("data"))


# ------------------------------------------------------------------------------------------------ video files
def test_a_video_file_is_decoded_to_the_frame_budget(tmp_path):
    mp4, avi = tmp_path / "a.mp4", tmp_path / "b.avi"
    video(mp4, 0, "libx264", frames=30, rate=10)  # 3 s at 10 fps
    video(avi, 1, "mpeg4", frames=30, rate=10)
    for path in (mp4, avi):
        frames, fps = read_video(path)  # 2 frames per second: t = 0, 0.5, ..., 2.5
        assert len(frames) == 6 and fps == pytest.approx(2.0) and frames[0].size == (48, 32)
        assert frames[0].mode == "RGB"
        every, rate = read_video(path, fps=None)
        assert len(every) == 30 and rate == pytest.approx(10.0)
        thinned, _ = read_video(path, fps=None, max_frames=5)
        assert len(thinned) == 5
        small, _ = read_video(path, max_pixels=400)
        assert small[0].width * small[0].height <= 400 and small[0].width > small[0].height
    again, _ = read_video(mp4)
    assert [f.tobytes() for f in again] == [f.tobytes() for f in read_video(mp4)[0]]  # deterministic
    # the square moves: frames differ
    assert again[0].tobytes() != again[-1].tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 20)
    with pytest.raises(LamraError, match="bad.mp4.*cannot be read as a video"):
        read_video(bad)
    with pytest.raises(LamraError, match="does not exist"):
        read_video(tmp_path / "none.mp4")


def test_api_video_file_search_video_file_settings_and_reranker(tiny_backbone, tmp_path):
    """Video(FILE) embeds as its decoded frames; `--settings.video_max_frames` sets the frame budget (and changes the
    embedding); `search --video FILE` refuses a broken file in one line; `Reranker.score` takes Videos."""
    clip = tmp_path / "clip.mp4"
    video(clip, 2, "libx264", frames=24, rate=6)
    frames, fps = read_video(clip)
    retriever = Retriever.from_checkpoint(tiny_backbone)
    from_file = retriever.encode(images=[Video(clip)])
    from_frames = retriever.encode(images=[Video(frames, fps=fps)])
    np.testing.assert_allclose(from_file, from_frames, atol=1e-6)
    two = Retriever.from_checkpoint(tiny_backbone, settings=ModelSettings(video_max_frames=2, video_max_pixels=784))
    processor = two.module.processor
    assert budget_of(processor).max_frames == 2 and budget_of(processor).max_pixels == 784
    assert np.abs(two.encode(images=[Video(clip)]) - from_file).max() > 1e-4
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00" * 100)
    index = tmp_path / "index"
    retriever.build_index(texts=[None, "a red square"], images=[Video(clip), None], ids=["v", "t"], out=index)
    hits = ok(lamra_here("search", f"--model={tiny_backbone}", f"--index={index}", f"--video={clip}", "--k=1"))
    assert hits.stdout.splitlines()[1].split()[2] == "v"
    proc = lamra_here(
        "search", f"--model={tiny_backbone}", f"--index={index}", f"--video={bad}", "--settings.video_max_frames=4"
    )
    clean_error(proc, "broken.mp4", "cannot be read as a video")
    reranker = Reranker.from_checkpoint(tiny_backbone, settings=ModelSettings(video_max_frames=4))
    scores = reranker.score("a square moving", [Video(clip), "a square", {"text": "moving", "image": Video(clip)}])
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    same = reranker.score("a square moving", [Video(frames, fps=fps)])
    assert same[0] == pytest.approx(scores[0], abs=1e-6)
    assert reranker.rank(Video(clip), ["a square", "a cat"])[0].index in (0, 1)


# ------------------------------------------------------------------------------------------------ MSR-VTT, MSVD
def expected_qrels(name: str, root: Path) -> dict[str, dict[str, set[str]]]:
    """The ground truth, read from the published files here, independently of the converter."""
    if name == "msrvtt":
        with open(root / "annotations" / "MSRVTT_JSFUSION_test.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        t2v = {f"msrvtt:t2v{n}": {f"msrvtt:{r['video_id']}"} for n, r in enumerate(rows)}
        v2t = {f"msrvtt:v2t{r['video_id']}": {f"msrvtt:cap{n}"} for n, r in enumerate(rows)}
        return {"msrvtt_task0": t2v, "msrvtt_task3": v2t}
    test = (root / "test_list.txt").read_text().split()
    captions = pickle.loads((root / "raw-captions.pkl").read_bytes())
    t2v, v2t, n = {}, {}, 0
    for i, video_id in enumerate(test):
        v2t[f"msvd:v2t{i}"] = set()
        for _ in captions[video_id]:
            t2v[f"msvd:t2v{n}"] = {f"msvd:{video_id}"}
            v2t[f"msvd:v2t{i}"].add(f"msvd:cap{n}")
            n += 1
    return {"msvd_task0": t2v, "msvd_task3": v2t}


@pytest.mark.parametrize("name", SETS)
def test_video_sets_keep_the_published_ground_truth_instruction_and_metric(name, raw, converted):
    expected = expected_qrels(name, raw[name])
    for task, qrels in expected.items():
        folder = converted[name] / task
        assert read_qrels(folder / "qrels.txt") == qrels
        info = json.loads((folder / "task.json").read_text())
        assert info["metrics"] == ["R@1", "R@5", "R@10"] and info["reported"] == "R@1"
        assert info["zeroshot_set"] == name
        assert info["instruction"] == (T2V if task.endswith("task0") else None)
        records = [decode_record(s) for s in read_samples(expand_shards(str(folder / "queries")))]
        assert {r.qid for r in records} == set(qrels)
        pool = [json.loads(s["json"]) for s in read_samples(expand_shards(str(folder / "pool")))]
        if task.endswith("task0"):  # text -> video: LamRA's instruction on the caption; the pool is videos
            query = evaluation_query(records[0])
            assert query.text.startswith(T2V + " ") and query.video is None
            assert all(r["modality"] == "video" and r["vid_fps"] == 2.0 and len(r["vid"]) == 4 for r in pool)
        else:  # video -> text: the video bare; the pool is the captions
            assert all(r.query.video is not None and len(r.query.video) == 4 for r in records)
            assert all(r.query.text is None for r in records)
            assert all(r["modality"] == "text" for r in pool)
    report = json.loads((converted[name].parent.parent / "report.json").read_text())
    assert report["problems"] == {} and report["inputs"]["videos"]["files"] == (4 if name == "msrvtt" else 3)
    if name == "msvd":  # a train video's captions are in the pickle: left out, counted
        assert report["zeroshot"]["skipped"] == {"video_not_in_split": 1}


def test_video_recall_equals_a_hand_computation(converted, tmp_path):
    tasks = {"msvd_task0": converted["msvd"] / "msvd_task0"}
    videos = ["msvd:-4wsuPCjDBc_5_15", "msvd:0lh_UWF9ZP4_62_69", "msvd:1dfR0A_BXjw_590_600"]
    # captions 0,1 -> video 0; caption 2 -> video 1; captions 3,4,5 -> video 2
    ranked = {
        "msvd:t2v0": [videos[0], videos[1], videos[2]],  # rank 1
        "msvd:t2v1": [videos[1], videos[0], videos[2]],  # rank 2
        "msvd:t2v2": [videos[0], videos[2], videos[1]],  # rank 3
        "msvd:t2v3": [videos[2], videos[0], videos[1]],  # rank 1
        "msvd:t2v4": [videos[1], videos[0], videos[2]],  # rank 3
        "msvd:t2v5": [videos[0], videos[2], videos[1]],  # rank 2
    }
    results = evaluate_runs(task_runs(tmp_path, tasks, {"msvd_task0": ranked}))
    scores = results["tasks"]["msvd_task0"]
    assert scores["R@1"] == pytest.approx(2 / 6) and scores["R@5"] == scores["R@10"] == pytest.approx(1.0)
    assert scores["reported"] == "R@1"


def test_bad_video_set_input_is_one_line_or_counted(raw, tmp_path):
    hostile = tmp_path / "msvd"
    hostile.mkdir()
    (hostile / "test_list.txt").write_text("a\n")
    (hostile / "YouTubeClips").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (hostile / "raw-captions.pkl").write_bytes(pickle.dumps({"a": [Evil()]}))
    proc = lamra_here("convert-zeroshot", "--set=msvd", f"--root={hostile}", f"--out={tmp_path / 'o1'}")
    clean_error(proc, "raw-captions.pkl", "names builtins.print")
    assert "ran" not in proc.stdout
    broken = tmp_path / "msrvtt"
    (broken / "annotations").mkdir(parents=True)
    (broken / "videos").mkdir()
    (broken / "annotations" / "MSRVTT_JSFUSION_test.csv").write_text("key,video\nret0,video1\n")
    proc = lamra_here("convert-zeroshot", "--set=msrvtt", f"--root={broken}", f"--out={tmp_path / 'o2'}")
    clean_error(proc, "MSRVTT_JSFUSION_test.csv", "'video_id'")
    # a video id leading out of the video folder, a missing video, an undecodable one: counted, never read
    rows = "key,vid_key,video_id,sentence\nret0,msr1,../../etc/x,a\nret1,msr2,video2,b\nret2,msr3,video3,c\n"
    rows += "ret3,msr4,video4,d\n"
    (broken / "annotations" / "MSRVTT_JSFUSION_test.csv").write_text(rows)
    (broken / "videos" / "video3.mp4").write_bytes(b"garbage" * 10)
    video(broken / "videos" / "video4.mp4", 1, "libx264")
    out = tmp_path / "o3"
    ok(lamra_here("convert-zeroshot", "--set=msrvtt", f"--root={broken}", f"--out={out}"))
    report = json.loads((out / "report.json").read_text())
    # each bad video is met twice (a t2v candidate, a v2t query); its captions' t2v queries lose their positive
    problems = {"unsafe_path": 2, "missing_image": 2, "bad_video": 2, "unknown_positive": 3, "no_positive": 3}
    assert report["problems"] == problems
    assert read_qrels(out / "eval/test/msrvtt_task0/qrels.txt") == {"msrvtt:t2v3": {"msrvtt:video4"}}
    strict = lamra_here("convert-zeroshot", "--set=msrvtt", f"--root={broken}", f"--out={out}", "--strict=true")
    clean_error(strict, "../../etc/x.mp4")


@pytest.fixture(scope="module")
def evaluated(converted, tiny_backbone, tmp_path_factory) -> Path:
    """Both sets indexed (video and caption candidates), retrieved (text and video queries) and evaluated with the
    tiny Qwen2-VL, its frame budget set from the command line."""
    budget = ("--batch_size=4", "--settings.video_max_frames=4")
    return evaluate_zeroshot(tiny_backbone, converted, tmp_path_factory.mktemp("runs"), "[local]", *budget)


@pytest.mark.parametrize("name", SETS)
def test_video_sets_end_to_end_with_the_tiny_model(name, evaluated, converted):
    results = json.loads((evaluated / name / "local" / "results.json").read_text())
    assert sorted(results["tasks"]) == [f"{name}_task0", f"{name}_task3"]
    for task, scores in results["tasks"].items():
        run = read_run_file(evaluated / name / "local" / f"{task}.run")
        qrels = read_qrels(converted[name] / task / "qrels.txt")
        pool = (converted[name] / task / "pool" / "ids.txt").read_text().split()
        assert sorted(run.qids) == sorted(qrels)
        assert all(sorted(r) == sorted(pool) for r in run.ranked)  # each direction in its own pool, whole
        for k in (1, 5, 10):
            hits = [any(d in qrels[q] for d in r[:k]) for q, r in zip(run.qids, run.ranked, strict=True)]
            assert scores[f"R@{k}"] == pytest.approx(np.mean(hits))


def test_zeroshot_report_names_video_directions(evaluated):
    ok(lamra_here("zeroshot-report", f"--runs={evaluated}", "--sets=[msrvtt,msvd]"))
    table = json.loads((evaluated / "zeroshot.json").read_text())["table"]
    assert list(table) == ["msrvtt T2V R@1", "msrvtt V2T R@1", "msvd T2V R@1", "msvd V2T R@1"]
