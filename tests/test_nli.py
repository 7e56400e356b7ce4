"""NLI triples (or pairs) -> text-only shards that keep the hard negative; bad rows are named and counted."""

from __future__ import annotations

import pytest
import webdataset as wds

from lamra_pl.errors import LamraError
from lamra_pl.formats.sample import decode_record
from lamra_pl.formats.shards import expand_shards
from lamra_pl.recipes.nli import convert, text_id

CSV = """sent0,sent1,hard_neg
"Two dogs run, on grass.",Animals are outside.,The dogs sleep indoors.
A man plays a guitar.,Someone makes music.,
A woman reads.,A person is reading.,Nobody is reading.
A woman reads.,A person is reading.,The woman sleeps.
"""


def test_nli_keeps_the_hard_negative_and_counts_bad_rows(tmp_path, caplog):
    path = tmp_path / "nli.csv"
    path.write_text(CSV)
    report = convert(str(path), str(tmp_path / "out"))
    assert report == {"read": 4, "written": 3, "dropped": 1, "problems": {"malformed_line": 1}}
    assert f"{path}:3: empty or missing 'hard_neg'" in caplog.text
    urls = expand_shards(str(tmp_path / "out" / "train"))
    records = [decode_record(s) for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]
    assert [r.query.text for r in records] == ["Two dogs run, on grass.", "A woman reads.", "A woman reads."]
    assert [r.negatives[0].text for r in records] == [
        "The dogs sleep indoors.",
        "Nobody is reading.",
        "The woman sleeps.",
    ]
    assert all(r.task_id == 1 and r.query.modality == "text" and not r.instructions for r in records)
    # the same positive sentence gets the same id, so it is masked as an in-batch duplicate
    assert records[1].positives[0].id == records[2].positives[0].id == text_id("A person is reading.")


def test_pairs_without_a_hard_negative_column_are_pair_data(tmp_path, caplog):
    path = tmp_path / "pairs.csv"
    path.write_text("sent0,sent1\nA man plays a guitar.,Someone makes music.\nA woman reads.,\n")
    report = convert(str(path), str(tmp_path / "out"))
    assert report == {"read": 2, "written": 1, "dropped": 1, "problems": {"malformed_line": 1}}
    assert f"{path}:3: empty or missing 'sent1'" in caplog.text
    urls = expand_shards(str(tmp_path / "out" / "train"))
    (record,) = [decode_record(s) for s in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]
    assert (record.query.text, record.positives[0].text, record.negatives) == (
        "A man plays a guitar.",
        "Someone makes music.",
        [],
    )
    (tmp_path / "bad.csv").write_text("sentence,other\na,b\n")
    with pytest.raises(LamraError, match=r"bad.csv:1: the header has no column 'sent0'"):
        convert(str(tmp_path / "bad.csv"), str(tmp_path / "out2"))
