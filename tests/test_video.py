"""Video as a modality: video items in shards, sampled to a frame budget and read by the tiny Qwen2-VL through its own
video processor and chat template; padding, positions, a fit on text<->video pairs, and the refusals of the families
that read no video.

The videos are made here: a coloured shape moving across a white frame (PIL frames, PNG-encoded), so the fixture
needs no video codec library.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import COLORS, png, shape_image
from helpers import embeds_alone_as_in_a_batch, lamra_here, ok, scalars
from lamra_pl.api import Retriever, Video
from lamra_pl.errors import LamraError
from lamra_pl.formats.index import EmbeddingIndex
from lamra_pl.formats.sample import Item, decode_candidate, decode_record, encode_candidate, encode_record
from lamra_pl.formats.shards import expand_shards, read_samples, write_shards
from lamra_pl.models.backbone import BackboneSpec, LoraSpec
from lamra_pl.models.checkpoints import load_reranker
from lamra_pl.models.embedding import EmbeddingModule
from lamra_pl.models.embedding_inputs import EmbeddingCollator
from lamra_pl.models.rerank_inputs import JudgePrompt, RerankExample, judge_question
from lamra_pl.models.reranker import RerankModule
from lamra_pl.models.video import VideoBudget, frame_indices

DIRECTIONS = ("right", "down")


def moving_shape(color: str, shape: str, direction: str, frames: int = 6, size: int = 56) -> list[Image.Image]:
    """`frames` frames of a `color` shape, two thirds of the frame wide, sliding right or down across white."""
    side, out = size * 2 // 3, []
    for t in range(frames):
        frame = Image.new("RGB", (size, size), "white")
        step = t * (size - side) // max(frames - 1, 1)
        x, y = (step, (size - side) // 2) if direction == "right" else ((size - side) // 2, step)
        box = (x, y, x + side, y + side)
        draw = ImageDraw.Draw(frame)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        out.append(frame)
    return out


def video_item(id_: str, color: str, direction: str, text: str | None = None, frames: int = 6) -> Item:
    return Item(id_, text=text, video=moving_shape(color, "circle", direction, frames), video_fps=4.0)


def module(backbone, **settings) -> EmbeddingModule:
    lora = LoraSpec(r=4, alpha=8, dropout=0.0)
    m = EmbeddingModule(BackboneSpec(backbone, gradient_checkpointing=False, **settings), lora=lora)
    m.configure_model()
    return m.eval()


def test_a_video_item_round_trips_through_a_shard(tmp_path):
    frames = moving_shape("red", "square", "right", frames=5)
    sample = encode_record(
        "v0",
        qid="v:0",
        query={"txt": "a red square moving right"},
        positives=[{"id": "vid:0", "video": [png(f) for f in frames], "fps": 10, "vid_src": "videos/v0.avi"}],
        negatives=[{"id": "vid:1", "txt": "a caption", "video": [png(f) for f in frames[:2]]}],
    )
    write_shards([sample], tmp_path / "shards")
    [raw] = list(read_samples(expand_shards(str(tmp_path / "shards"))))
    record = decode_record(raw)
    positive, negative = record.positives[0], record.negatives[0]
    assert positive.modality == "video" and negative.modality == "video,text"
    assert positive.video_fps == 10.0 and negative.video_fps is None
    assert positive.source == "videos/v0.avi" and positive.image is None
    assert [list(f.getdata()) for f in positive.video] == [list(f.convert("RGB").getdata()) for f in frames]
    assert len(negative.video) == 2
    pool = encode_candidate("c0", id="vid:9", txt=None, image=None, video=[png(f) for f in frames], fps=2.0)
    candidate = decode_candidate({**pool, "__url__": "pool.tar"})
    assert candidate.modality == "video" and len(candidate.video) == 5 and candidate.video_fps == 2.0


def test_a_video_record_with_a_missing_frame_or_an_image_too_is_refused():
    frames = [png(f) for f in moving_shape("red", "square", "right", frames=3)]
    sample = encode_record("v0", qid="v:0", query={"txt": "x"}, positives=[{"id": "p", "video": frames}])
    del sample["pos0.f001.png"]
    with pytest.raises(Exception, match="video frame member 'pos0.f001.png', which is missing"):
        decode_record(sample)
    both = encode_record("v1", qid="v:1", query={"txt": "x"}, positives=[{"id": "p", "video": frames}])
    record = json.loads(both["json"])
    record["positives"][0]["img"] = "pos0.f000.png"
    both["json"] = json.dumps(record).encode()
    with pytest.raises(Exception, match="both an image and a video"):
        decode_record(both)


def test_frames_are_sampled_to_the_budget():
    # LamRA's default: at most 12 (retriever) frames spread evenly, an even count, first and last included.
    assert frame_indices(30, None, VideoBudget(), 12) == [round(i * 29 / 11) for i in range(12)]
    assert frame_indices(30, 25.0, VideoBudget(), 8) == [round(i * 29 / 7) for i in range(8)]
    assert frame_indices(7, None, VideoBudget(), 12) == [0, 1, 2, 4, 5, 6]  # 7 -> 6: frames go in pairs
    assert frame_indices(1, None, VideoBudget(), 12) == [0]
    # By fps: 30 frames at 10 fps are 3 s; 2 fps -> 6 frames; never under 4 (qwen-vl-utils), never over max_frames.
    assert len(frame_indices(30, 10.0, VideoBudget(fps=2.0), 12)) == 6
    assert len(frame_indices(30, 10.0, VideoBudget(fps=0.5), 12)) == 4
    assert len(frame_indices(300, 10.0, VideoBudget(fps=2.0, max_frames=16), 12)) == 16
    # Unknown frame rate: the even spread.
    assert len(frame_indices(30, None, VideoBudget(fps=2.0), 12)) == 12
    with pytest.raises(LamraError, match="video_fps must be positive"):
        VideoBudget(fps=0)


def test_a_video_goes_through_the_backbones_video_processor_and_chat_template(tiny_backbone):
    m = module(tiny_backbone, video_max_frames=4)
    collate = EmbeddingCollator(m.processor)
    item = video_item("v", "blue", "right", frames=9)
    batch = collate.encode([item])
    # 9 frames -> 4 (the budget), in pairs: 2 temporal patches of a 56x56 frame (4x4 patches of 14 pixels).
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    assert "pixel_values" not in batch and batch["pixel_values_videos"].shape[0] == 2 * 4 * 4
    tokenizer = m.processor.tokenizer
    video_token = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert (batch["input_ids"] == video_token).sum() == 2 * 4 * 4 // 4  # merged 2x2
    text = tokenizer.decode(batch["input_ids"][0])
    assert "<|vision_start|><|video_pad|>" in text and "\nSummarize above video in one word: <|im_end|>" in text
    assert "Find it. Red\nSummarize above video and sentence in one word: " in tokenizer.decode(
        collate.encode([Item("vt", "Find it. Red", video=item.video)])["input_ids"][0]
    )


def test_the_same_frames_as_images_and_as_a_video_embed_differently_and_deterministically(tiny_backbone):
    frames = moving_shape("green", "circle", "down", frames=4)
    as_video = [Item("v", video=frames)]
    as_images = [Item(f"i{t}", image=f) for t, f in enumerate(frames)]
    runs = []
    for _ in range(2):
        m = module(tiny_backbone)
        collate = EmbeddingCollator(m.processor)
        with torch.no_grad():
            runs.append((m.embed(collate.encode(as_video)), m.embed(collate.encode(as_images))))
    for first, second in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(first, second, atol=0, rtol=0)
    video, images = runs[0]
    assert torch.isfinite(video).all() and video.norm() == pytest.approx(1.0, abs=1e-5)
    # The video is not any one of its frames, nor their mean.
    assert ((images - video).abs().max(-1).values > 1e-3).all()
    assert (torch.nn.functional.normalize(images.mean(0), dim=-1) - video[0]).abs().max() > 1e-3
    # A still video (one frame repeated) is not that frame as an image either.
    with torch.no_grad():
        still = m.embed(collate.encode([Item("s", video=[frames[0]] * 2)]))
    assert (still - images[0]).abs().max() > 1e-3


MIXED = [
    Item("t", text="a tiny red circle moving to the right, seen from above"),
    video_item("v", "red", "right", frames=6),
    Item("i", image=shape_image("blue", "square")),
    video_item("vt", "yellow", "down", text="the same, but down", frames=4),
    Item("t2", text="x"),
]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("rope", ["model", "1d"])
def test_a_batch_mixing_video_image_and_text_pads_correctly(tiny_backbone, padding_side, rope):
    m = module(tiny_backbone, padding_side=padding_side, rope=rope)
    batch, _ = embeds_alone_as_in_a_batch(m, MIXED)
    assert m.processor.tokenizer.padding_side == padding_side
    pad = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)
    assert (pad > 0).sum() >= 3, "the batch must actually be padded"
    video_token = m.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert [(row == video_token).any().item() for row in batch["input_ids"]] == [False, True, False, True, False]
    assert batch["video_grid_thw"].tolist() == [[3, 4, 4], [2, 4, 4]]


def test_mrope_gives_a_video_its_temporal_positions(tiny_backbone):
    model = module(tiny_backbone)
    collate = EmbeddingCollator(model.processor)
    batch = collate.encode([video_item("v", "red", "right", frames=6)])
    positions = model.backbone.position_ids(model.model, batch)
    assert positions.shape[0] == 3  # temporal, height, width
    video = batch["input_ids"][0] == model.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    temporal = positions[0, 0, video]
    assert temporal.unique().numel() == 3  # one position per pair of frames
    one_d = module(tiny_backbone, rope="1d")
    flat = one_d.backbone.position_ids(one_d.model, batch)
    assert flat.dim() == 2 and flat[0, video].diff().eq(1).all()
    with torch.no_grad():
        assert (model.embed(batch) - one_d.embed(batch)).abs().max() > 1e-5


def test_families_that_read_no_video_refuse_a_video_item_in_one_line(tiny_llava_next, tiny_text_lm):
    for backbone in (tiny_llava_next, tiny_text_lm):
        collate = EmbeddingCollator(module(backbone).processor)
        with pytest.raises(LamraError, match="is a video, but backbone .* reads no video") as err:
            collate.encode([Item("t", "text"), video_item("v", "red", "right")])
        assert "\n" not in str(err.value) and "'v'" in str(err.value)


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory: pytest.TempPathFactory):
    """Text -> video training shards: "<colour> circle moving <direction>" to its video, a hard negative the same
    colour moving the other way."""
    samples = []
    for r in range(4):
        for i, (color, direction) in enumerate((c, d) for c in COLORS for d in DIRECTIONS):
            other = next(d for d in DIRECTIONS if d != direction)
            samples.append(
                encode_record(
                    f"v{r}_{i:02d}",
                    qid=f"v{r}:{i}",
                    query={"txt": f"{color} circle moving {direction}"},
                    instructions=["Find the video of this motion."],
                    positives=[
                        {
                            "id": f"vid:{color}-{direction}",
                            "video": [png(f) for f in moving_shape(color, "circle", direction, 4)],
                        }
                    ],
                    negatives=[
                        {
                            "id": f"vid:{color}-{other}",
                            "video": [png(f) for f in moving_shape(color, "circle", other, 4)],
                        }
                    ],
                )
            )
    out = tmp_path_factory.mktemp("shards") / "video"
    write_shards(samples, out, maxcount=16)
    return out


@pytest.mark.slow
def test_a_tiny_fit_on_text_to_video_pairs_lowers_the_loss(tiny_backbone, video_shards, tmp_path):
    runs = tmp_path / "runs"
    ok(
        lamra_here(
            "fit",
            "-c",
            "experiments/tiny/stage2_instruct.yaml",
            f"--model.init_args.backbone.path={tiny_backbone}",
            "--model.init_args.backbone.video_max_frames=4",
            f"--data.init_args.train_shards={video_shards}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_negatives=1",
            "--trainer.max_steps=40",
            "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={runs}",
        )
    )
    losses = [v for _, v in scalars(next(runs.glob("*/version_0")))["train/loss"]]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses


@pytest.fixture(scope="module")
def reranker(tiny_backbone) -> RerankModule:
    module = RerankModule(BackboneSpec(tiny_backbone, gradient_checkpointing=False, video_max_frames=4))
    module.configure_model()
    return module.eval()


def test_the_reranker_trains_and_scores_video_queries_and_candidates(reranker):
    """LamRA-Rank's chats hold a video as one video part: labels still cover exactly the answer, a text->video and a
    video->text pair score, and each pair scores alone as in a padded batch."""
    video, other = video_item("v", "red", "right"), video_item("w", "blue", "down", text="a blue ball")
    examples = [
        RerankExample(Item("q0", "red circle moving right"), [(video, True), (other, False)], [other, video], 2),
        RerankExample(video, [(Item("c", "red circle moving right"), True)], [], None),
    ]
    collator = reranker.collator()
    batch = collator(examples)
    inputs, labels = batch["inputs"], batch["labels"]
    assert len(inputs["video_grid_thw"]) == 5  # 2 + 1 pointwise videos, 2 in the list; 4 frames each: t = 2
    assert inputs["video_grid_thw"][:, 0].eq(2).all()
    tokenizer = collator.processor.tokenizer
    answers = [tokenizer.decode(row[row != -100]).strip() for row in labels]
    assert [a.removesuffix("<|im_end|>") for a in answers] == ["Yes", "No", "Yes", "Ans: (2)"]
    with torch.no_grad():
        loss, _ = reranker.lm_loss(batch)
    assert torch.isfinite(loss)
    pairs = [(Item("q", "red circle moving right"), video), (video, Item("c", "a red circle")), (other, video)]
    together = reranker.score_pointwise(collator.pointwise_inputs(pairs))
    alone = torch.cat([reranker.score_pointwise(collator.pointwise_inputs([p])) for p in pairs])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert ((together > 0) & (together < 1)).all()
    scores = reranker.score_listwise(collator.listwise_inputs([(Item("q", "red"), [video, other])]), [2])
    assert scores.shape == (1, 2) and scores.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_the_zero_shot_judge_asks_about_a_video_candidate(tiny_backbone):
    judge = load_reranker(tiny_backbone, judge=JudgePrompt())
    collator = judge.collator()
    video = video_item("v", "red", "right")
    inputs = collator.pointwise_inputs([(Item("q", "red circle moving right"), video)], [("msrvtt", 0)])
    text = collator.processor.tokenizer.decode(inputs["input_ids"][0])
    assert "Candidate:<|vision_start|><|video_pad|>" in text
    assert "Does the above video match the query? True or False" in text
    assert judge_question("mscoco", 0, "video,text") == "Does the above video and text match the query? True or False"
    p_true = judge.score_pointwise(inputs)
    assert p_true.shape == (1,) and 0 < p_true.item() < 1


def test_a_video_pool_is_indexed_and_searched_by_video_text_and_the_api(tiny_backbone, tmp_path):
    """`lamra-pl index` embeds video candidates from pool shards (items.jsonl marks them "vid"); `lamra-pl search
    --video FRAMES_FOLDER` and `Retriever.search(query_image=Video(...))` find a video by its own frames first."""
    pool, index = tmp_path / "pool", tmp_path / "index"
    videos = {f"vid:{c}-{d}": moving_shape(c, "circle", d, 4) for c in COLORS for d in DIRECTIONS}
    samples = [
        encode_candidate(f"{i:04d}", id=did, txt=None, image=None, video=[png(f) for f in frames], vid_src=f"{did}.avi")
        for i, (did, frames) in enumerate(videos.items())
    ]
    samples.append(encode_candidate("9999", id="txt:0", txt="a red circle moving right", image=None))
    write_shards(samples, pool, maxcount=3)
    ok(lamra_here("index", f"--model={tiny_backbone}", f"--pool={pool}", f"--out={index}", "--batch_size=3"))
    built = EmbeddingIndex(index)
    assert built.modalities == ["video"] * len(videos) + ["text"]
    target = "vid:blue-down"
    folder = tmp_path / "query_frames"
    folder.mkdir()
    for t, frame in enumerate(videos[target]):
        frame.save(folder / f"{t:03d}.png")
    printed = ok(lamra_here("search", f"--model={tiny_backbone}", f"--index={index}", f"--video={folder}", "--k=3"))
    first = printed.stdout.splitlines()[1].split()
    assert first[2] == target and printed.stdout.splitlines()[1].endswith(f"{target}.avi")
    retriever = Retriever.from_checkpoint(tiny_backbone)
    hits = retriever.search(index, query_image=Video(videos[target]), k=2)
    assert hits[0].id == target and hits[0].vid == f"{target}.avi" and hits[0].img is None
    assert hits[0].score == pytest.approx(1.0, abs=2e-3)  # float16 index of the same frames
    both = retriever.search(index, query_text=["red", None], query_image=[None, Video(folder)], k=1)
    assert both[1][0].id == target
    clean = lamra_here("search", f"--model={tiny_backbone}", f"--index={index}", f"--video={tmp_path / 'none'}")
    assert clean.returncode == 2 and "video folder" in clean.stderr and "Traceback" not in clean.stderr
