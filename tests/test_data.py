"""Loaders: counts on the real files, normalisation, broken files with precise messages, Hub records."""

import json

import pytest

from ptray.data.superglue import _normalise, load_split, read_jsonl
from ptray.data.tasks import get_task
from ptray.errors import PtrayError

COUNTS = {"cb": (250, 56), "rte": (2490, 277), "copa": (400, 100), "wsc": (554, 104)}


@pytest.mark.parametrize("name", list(COUNTS))
def test_real_counts(name, data_dir):
    task = get_task(name)
    train, val = load_split(task, "train", data_dir), load_split(task, "val", data_dir)
    assert (len(train), len(val)) == COUNTS[name]
    assert all(ex.label is not None for ex in train + val)
    assert [ex.idx for ex in val] == list(range(len(val)))


def test_test_split_is_unlabeled(data_dir):
    test = load_split(get_task("wsc"), "test", data_dir)
    assert len(test) == 146 and all(ex.label is None for ex in test)


def test_label_distributions(data_dir):
    cb = load_split(get_task("cb"), "val", data_dir)
    labels = get_task("cb").labels
    counts = {name: sum(labels[ex.label] == name for ex in cb) for name in labels}
    assert counts == {"entailment": 23, "contradiction": 28, "neutral": 5}
    wsc = load_split(get_task("wsc"), "val", data_dir)
    assert sum(get_task("wsc").labels[ex.label] == "True" for ex in wsc) == 38


def test_quirks_kept(data_dir):
    wsc = {ex.idx: ex for ex in load_split(get_task("wsc"), "train", data_dir)}
    assert "\n" in wsc[234].fields["span1_text"]  # the formatter, not the loader, cleans it
    assert wsc[168].fields == wsc[216].fields  # an official duplicate stays
    copa = {ex.idx: ex for ex in load_split(get_task("copa"), "train", data_dir)}
    assert copa[128].fields["choice1"].startswith(" ")


def test_limit(data_dir):
    assert len(load_split(get_task("rte"), "val", data_dir, limit=7)) == 7


def _write(tmp_path, task_dir, split, lines):
    folder = tmp_path / task_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_missing_data_dir(tmp_path):
    with pytest.raises(PtrayError, match=r"data directory '.*nope' does not exist; pass --data-dir"):
        load_split(get_task("cb"), "train", tmp_path / "nope")


def test_missing_split(tmp_path):
    _write(tmp_path, "CB", "train", [json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0})])
    with pytest.raises(PtrayError, match=r"split file '.*CB/val.jsonl' is missing"):
        load_split(get_task("cb"), "val", tmp_path)


def test_bad_json_names_file_and_line(tmp_path):
    good = json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0})
    _write(tmp_path, "CB", "train", [good, '{"premise": "p", "hypo'])
    with pytest.raises(PtrayError, match=r"CB/train.jsonl:2: not valid JSON"):
        load_split(get_task("cb"), "train", tmp_path)


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    """A jsonl file saved by a Windows editor starts with a byte-order mark; it is read, not refused at line 1."""
    rows = [{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": i} for i in range(2)]
    (tmp_path / "CB").mkdir()
    (tmp_path / "CB" / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, rows)).encode())
    examples = load_split(get_task("cb"), "train", tmp_path)
    assert [(e.idx, e.fields["premise"], e.label) for e in examples] == [(0, "p", 2), (1, "p", 2)]  # neutral = 2


def test_missing_field_names_file_line_and_field(tmp_path):
    good = json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0})
    _write(tmp_path, "CB", "train", [good, good, json.dumps({"premise": "p", "label": "neutral", "idx": 2})])
    with pytest.raises(PtrayError, match=r"CB/train.jsonl:3: field 'hypothesis' is missing"):
        load_split(get_task("cb"), "train", tmp_path)


def test_wrong_type_names_field(tmp_path):
    rec = {"text": "t", "target": {"span1_text": "a", "span2_text": "b", "span1_index": "0", "span2_index": 1},
           "label": True, "idx": 0}
    _write(tmp_path, "WSC", "val", [json.dumps(rec)])
    with pytest.raises(PtrayError, match=r"WSC/val.jsonl:1: field 'span1_index' should be int, got '0'"):
        load_split(get_task("wsc"), "val", tmp_path)


def test_label_outside_task_labels(tmp_path):
    _write(tmp_path, "RTE", "train", [json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0})])
    message = r"RTE/train.jsonl:1: field 'label': label 'neutral' is not one of rte's labels"
    with pytest.raises(PtrayError, match=message):
        load_split(get_task("rte"), "train", tmp_path)


def test_missing_label_in_train(tmp_path):
    _write(tmp_path, "COPA", "train", [json.dumps(
        {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "idx": 0})])
    with pytest.raises(PtrayError, match=r"COPA/train.jsonl:1: field 'label' is missing"):
        load_split(get_task("copa"), "train", tmp_path)


def test_hub_and_local_records_normalise_alike(data_dir):
    """A Hub (aps/super_glue) row: integer label, flat WSC spans; it must equal the local record."""
    task = get_task("wsc")
    local = load_split(task, "val", data_dir)[0]
    hub_row = {"text": local.fields["text"], **{k: local.fields[k] for k in
               ("span1_text", "span2_text", "span1_index", "span2_index")},
               "label": task.labels[local.label], "idx": local.idx}
    assert _normalise(task, hub_row, "val", "hub row 0") == local
    cb = get_task("cb")
    assert _normalise(cb, {"premise": "p", "hypothesis": "h", "label": cb.labels[2], "idx": 0}, "val", "x").label == 2
    assert _normalise(cb, {"premise": "p", "hypothesis": "h", "label": -1, "idx": 0}, "test", "x").label is None


def test_read_hub_converts_integer_labels(monkeypatch, data_dir):
    """read_hub on rows shaped like aps/super_glue's (integer labels, flat spans, -1 for test) gives local records."""
    import datasets

    from ptray.data.superglue import read_hub

    task = get_task("wsc")
    local = load_split(task, "val", data_dir)[:5]
    rows = [{**{k: ex.fields[k] for k in task.fields}, "label": ex.label, "idx": ex.idx} for ex in local]
    seen = {}

    def fake_load_dataset(path, name, split):
        seen.update(path=path, name=name, split=split)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_hub(task, "val") == local
    assert seen == {"path": "aps/super_glue", "name": "wsc.fixed", "split": "validation"}


def test_hub_unreachable_says_how_to_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PtrayError, match=r"could not load aps/super_glue/cb \(train\) from the Hugging Face Hub "
                                         r"\(ConnectionError\); .*pass --data-dir DIR"):
        load_split(get_task("cb"), "train")


def test_unknown_split(data_dir):
    with pytest.raises(PtrayError, match="unknown split 'dev'; valid splits: train, val, test"):
        load_split(get_task("cb"), "dev", data_dir)


def test_read_jsonl_keeps_order(data_dir):
    rows = read_jsonl(get_task("copa"), "val", data_dir)
    assert rows[0].fields["question"] in ("cause", "effect") and rows[0].idx == 0


def test_wic_counts_and_records(data_dir):
    wic = get_task("wic")
    train, val, test = (load_split(wic, split, data_dir) for split in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (5428, 638, 1400)
    assert all(ex.label is not None for ex in train + val) and all(ex.label is None for ex in test)
    assert sum(wic.labels[ex.label] == "True" for ex in val) == 319
    assert val[0].fields == {  # the official file's 'version' is not a declared field: dropped
        "word": "class", "sentence1": "An emerging professional class.",
        "sentence2": "Apologizing for losing your temper, even though you were badly provoked, showed real class.",
        "start1": 25, "end1": 30, "start2": 85, "end2": 90}
    assert val[0].label == wic.labels.index("False")


def test_wic_hub_and_local_records_normalise_alike(monkeypatch, data_dir):
    """aps/super_glue's wic rows (integer label, no 'version') read into the same records as the official jsonl."""
    import datasets

    from ptray.data.superglue import read_hub

    task = get_task("wic")
    local = load_split(task, "val", data_dir)[:6]
    keys = ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2")
    rows = [{**{k: ex.fields[k] for k in keys}, "idx": ex.idx, "label": ex.label} for ex in local]
    seen = {}

    def fake_load_dataset(path, name, split):
        seen.update(path=path, name=name, split=split)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_hub(task, "val") == local
    assert seen == {"path": "aps/super_glue", "name": "wic", "split": "validation"}
    test_row = {**rows[0], "label": -1}
    assert _normalise(task, test_row, "test", "hub row 0").label is None
