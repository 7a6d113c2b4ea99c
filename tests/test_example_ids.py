"""Two records of a split under one idx gave two numbers for one run (rank accuracy 0.375 on 8 examples in the
run, 0.50 on 4 in the analysis, which keys by idx): such a split is refused, naming the file and the ids."""

import json
import shutil

import pytest

from ptray.data.superglue import load_split
from ptray.data.tasks import get_task
from ptray.errors import PtrayError
from ptray.training.train import main


def _copy_cb(data_dir, tmp_path, val_records):
    root = tmp_path / "data"
    (root / "CB").mkdir(parents=True)
    shutil.copy(data_dir / "CB" / "train.jsonl", root / "CB" / "train.jsonl")
    (root / "CB" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val_records))
    return root


def test_repeated_idx_in_a_split_is_refused(data_dir, tmp_path):
    val = [json.loads(line) for line in (data_dir / "CB" / "val.jsonl").read_text().splitlines()[:8]]
    for i, r in enumerate(val):
        r["idx"] = i % 4  # the case: 0,1,2,3,0,1,2,3
    root = _copy_cb(data_dir, tmp_path, val)
    with pytest.raises(PtrayError, match=r"CB/val.jsonl: 4 idx value\(s\) appear more than once \(0, 1, 2, 3\); every "
                                         r"record of a split needs its own idx"):
        load_split(get_task("cb"), "val", root)


def test_the_train_command_refuses_it_in_one_line(tiny_model_dir, data_dir, tmp_path, capsys):
    val = [json.loads(line) for line in (data_dir / "CB" / "val.jsonl").read_text().splitlines()[:3]]
    val[2]["idx"] = val[0]["idx"]
    root = _copy_cb(data_dir, tmp_path, val)
    code = main(["--task", "cb", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir", str(root),
                 "--output-dir", str(tmp_path / "run"), "--max-epochs", "1", "--max-train-examples", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"appear more than once ({val[0]['idx']})" in err[0]
    assert not (tmp_path / "run").exists()


def test_official_splits_have_unique_ids(data_dir):
    for name in ("cb", "rte", "copa", "wsc", "wic"):
        for split in ("train", "val", "test"):
            load_split(get_task(name), split, data_dir)  # raises on a repeated idx
