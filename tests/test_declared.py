"""Declared studies (ptray/study/study_file.py, ptray/study/declared.py): the shipped declarations in
sweeps/studies/, their grids, a user's file, and the one-line message of each kind of mistake."""

import re
import subprocess
import sys

import pytest

from ptray.config import TASK_NAMES, TrainConfig
from ptray.errors import PtrayError
from ptray.study.declared import Search, StudyRun
from ptray.study.study_file import STUDIES_DIR, load_study, parse_study, shipped_studies

PAPER_SEEDS = (0, 1, 2, 3)


def test_shipped_studies_load_with_their_grid_sizes():
    assert shipped_studies() == ("init", "length", "lr", "optimizer", "paper", "spot")
    # spot's grid as declared (conditions text and spot); sweeps/spot.py runs it as two phases (tests/test_spot.py)
    sizes = {"paper": 16, "init": 64, "length": 96, "optimizer": 64, "lr": 4, "spot": 32}
    for name, size in sizes.items():
        d = load_study(name)
        assert d.name == name and d.description and d.source == str(STUDIES_DIR / f"{name}.toml")
        assert d.size == size == len(d.grid()), name
        assert all(isinstance(r, StudyRun) for r in d.grid())
        for run in d.grid():  # every run's config is one TrainConfig accepts
            cfg = d.train_config(run)
            assert (cfg.task, cfg.seed) == (run.task, run.seed)
    paper = load_study("paper")
    assert paper.tasks == TASK_NAMES and paper.seeds == PAPER_SEEDS and not paper.conditions and not paper.search
    assert [(r.condition, r.overrides, r.task, r.seed) for r in paper.grid()[:2]] == [(None, {}, "cb", 0),
                                                                                      (None, {}, "cb", 1)]
    assert paper.train_config(paper.grid()[0]) == TrainConfig(task="cb", seed=0)  # the paper's defaults


def test_shipped_conditions():
    init = load_study("init")
    assert {c: o["init"] for c, o in init.conditions.items()} == {
        "text": "text", "random": "random", "sample_vocab": "sample_vocab", "class_labels": "class_labels"}
    # condition-major, then task, then seed
    assert [(r.condition, r.task, r.seed) for r in init.grid()[15:17]] == [("text", "wsc", 3), ("random", "cb", 0)]
    length = load_study("length")
    assert [o["num_tokens"] for o in length.conditions.values()] == [1, 5, 10, 20, 50, 100]
    assert all(r.overrides["init"] == "text" for r in length.grid())  # [train] reaches every condition
    opt = load_study("optimizer")
    assert [opt.train_config(r).optimizer for r in opt.grid()[::16]] == ["adam", "adamw", "adafactor", "sgd"]
    assert all(opt.train_config(r).lr is None for r in opt.grid())  # each at its default lr
    lr = load_study("lr")
    assert lr.search == {"lr": Search("lr", "loguniform", 1e-3, 1.0)}
    assert (lr.num_samples, lr.scheduler, lr.metric, lr.mode) == (16, "asha", "eval_loss", "min")
    assert lr.seeds == (0,) and lr.num_trials == 64
    assert lr.train_config(lr.grid()[0], lr=0.2).lr == 0.2  # a sampled value goes last


def test_tune_search_space():
    tune = pytest.importorskip("ray.tune")
    space = load_study("lr").tune_search_space()
    assert isinstance(space["lr"], tune.search.sample.Float)
    assert (space["lr"].lower, space["lr"].upper) == (1e-3, 1.0)
    assert load_study("paper").tune_search_space() == {}


def test_a_user_file_outside_the_repo(tmp_path):
    path = tmp_path / "elsewhere" / "mine.toml"
    path.parent.mkdir()
    path.write_text('name = "mine"\ndescription = "two lrs on RTE"\ntasks = ["RTE"]\nseeds = [7, 9]\n'
                    '[train]\nmax_epochs = 3\nlr = 1\n'
                    '[conditions.low]\nlr = 0.01\n[conditions.sgd]\noptimizer = "sgd"\n')
    d = load_study(path)
    assert load_study(str(path)) == d
    assert d.name == "mine" and d.tasks == ("rte",) and d.seeds == (7, 9) and d.source == str(path)
    assert d.size == 4 and [r.condition for r in d.grid()] == ["low", "low", "sgd", "sgd"]
    assert d.grid()[0].overrides == {"max_epochs": 3, "lr": 0.01}  # the condition overrides [train]
    sgd = d.train_config(d.grid()[2], TrainConfig(model="m", max_epochs=50))
    assert (sgd.model, sgd.max_epochs, sgd.lr, sgd.optimizer, sgd.seed) == ("m", 3, 1.0, "sgd", 7)
    assert isinstance(sgd.lr, float)
    assert d.digest == load_study(path).digest and len(d.digest) == 64


BASE = 'name = "s"\ndescription = "d"\n'

# (file text, the expected one-line message after "bad.toml: ")
BAD = [
    (BASE + "task = 'cb'\n", "unknown field 'task' (did you mean 'tasks'?); known: name, description, tasks, seeds, "
                             "train, conditions, search, num_samples, scheduler, metric, mode"),
    ('description = "d"\n', "missing field 'name' (required: name, description)"),
    ('name = "a b"\ndescription = "d"\n', "field 'name': 'a b' is not a study id: use only ASCII letters"),
    ('name = "étude"\ndescription = "d"\n', "field 'name': 'étude' is not a study id: use only ASCII letters"),
    (BASE + '[conditions."../x"]\ninit = "random"\n', "field 'conditions.../x': condition name '../x': use only "
                                                      "ASCII letters (a-z, A-Z), digits, '-', '_' and '.', starting "
                                                      "with a letter or digit (it names runs and their folders)"),
    (BASE + "tasks = ['cb', 'boolq']\n", "field 'tasks': unknown task 'boolq'"),
    (BASE + "tasks = 'cb'\n", "field 'tasks': must be a non-empty list of task names, got 'cb'"),
    (BASE + "seeds = [0, -1]\n", "field 'seeds': "),
    (BASE + "seeds = [1, 1]\n", "field 'seeds': names a seed twice: [1, 1]"),
    (BASE + "[train]\nlearning_rate = 0.1\n", "unknown TrainConfig field 'train.learning_rate'"),
    (BASE + "[train]\nseed = 3\n", "field 'train.seed': the grid sets each run's seed; list them in the top-level "
                                   "'seeds' field"),
    (BASE + "[train]\nlr = -1\n", "field 'train.lr': lr must be a positive number or unset, got -1.0"),
    (BASE + "[conditions.x]\ninti = 'random'\n", "unknown TrainConfig field 'conditions.x.inti' (did you mean "
                                                 "'init'?)"),
    (BASE + "[conditions.x]\ninit = 'randm'\n", "field 'conditions.x.init': init must be one of ['text', 'random', "
                                                "'sample_vocab', 'class_labels', 'prompt'], got 'randm'"),
    (BASE + "[conditions.x]\noptimizer = 'lamb'\n", "field 'conditions.x.optimizer': optimizer must be one of adam, "
                                                    "adamw, adafactor, sgd, got 'lamb'"),
    (BASE + "[conditions.x]\nnum_tokens = '5'\n", "field 'conditions.x.num_tokens': must be an integer, got '5'"),
    (BASE + "[conditions.x]\nbaselines = 1\n", "field 'conditions.x.baselines': must be a boolean (true or false), "
                                               "got 1"),
    (BASE + "conditions = {}\n", "field 'conditions': is empty; declare at least one [conditions.NAME], or leave it "
                                 "out"),
    (BASE + "conditions = {x = 1}\n", "field 'conditions.x': must be a table of TrainConfig fields, got 1"),
    (BASE + "num_samples = 4\n", "field 'num_samples': only means something with a search; declare [search] or "
                                 "leave it out"),
    (BASE + "[search]\nlr = {distribution = 'normal', low = 0.1, high = 1}\n",
     "field 'search.lr.distribution': must be one of uniform, loguniform, randint, choice, got 'normal'"),
    (BASE + "[search]\nlr = {distribution = 'loguniform', low = 0.0, high = 1}\n",
     "field 'search.lr.low': a loguniform search needs low > 0, got 0.0"),
    (BASE + "[search]\nlr = {distribution = 'uniform', low = 1, high = 0.5}\n",
     "field 'search.lr': low must be below high, got low 1, high 0.5"),
    (BASE + "[search]\nlr = {distribution = 'uniform', low = -1, high = 0.5}\n",
     "field 'search.lr.low': lr must be a positive number or unset, got -1.0"),
    (BASE + "[search]\nlr = {distribution = 'uniform', high = 0.5}\n",
     "field 'search.lr': a uniform search needs 'low' and 'high'"),
    (BASE + "[search]\nlrr = {distribution = 'uniform', low = 0.1, high = 0.5}\n",
     "unknown TrainConfig field 'search.lrr' (did you mean 'lr'?)"),
    (BASE + "[search]\nbatch_size = {distribution = 'choice', values = [4, 0]}\n",
     "field 'search.batch_size.values': batch_size must be a positive integer, got 0"),
    (BASE + "[train]\nlr = 0.1\n[search]\nlr = {distribution = 'uniform', low = 0.1, high = 0.5}\n",
     "field 'search.lr': lr is also set in [train]; a searched field is set by the search"),
    (BASE + "scheduler = 'pbt'\n[search]\nlr = {distribution = 'uniform', low = 0.1, high = 0.5}\n",
     "field 'scheduler': must be one of fifo, asha, got 'pbt'"),
    (BASE + "metric = 'accuracy'\n[search]\nlr = {distribution = 'uniform', low = 0.1, high = 0.5}\n",
     "field 'metric': must be one of eval_loss, train_loss, best_eval_loss, exact_match, rank_accuracy"),
    (BASE + "mode = 'max'\n[search]\nlr = {distribution = 'uniform', low = 0.1, high = 0.5}\n",
     "field 'mode': eval_loss is better when lower, so mode must be 'min', got 'max'"),
    (BASE + "num_samples = 0\n[search]\nlr = {distribution = 'uniform', low = 0.1, high = 0.5}\n",
     "field 'num_samples': must be a positive integer, got 0"),
    (BASE + "name = 'again'\n", "not valid TOML: "),
]


@pytest.mark.parametrize("text, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_each_mistake_is_one_line_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PtrayError) as err:
        load_study(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith("bad.toml: " + message), text


def test_a_byte_order_mark_is_read_not_refused(tmp_path):
    """A study file saved with a UTF-8 byte-order mark (Windows editors) is the same study."""
    text = 'name = "mine"\r\ndescription = "d"\r\ntasks = ["rte"]\r\nseeds = [1]\r\n'
    (tmp_path / "plain.toml").write_text(text)
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    bom, plain = load_study(tmp_path / "bom.toml"), load_study(tmp_path / "plain.toml")
    assert (bom.name, bom.tasks, bom.seeds, bom.digest) == ("mine", ("rte",), (1,), plain.digest)
    assert parse_study("\ufeff" + text).name == "mine"


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(PtrayError, match=r"^unknown study 'inti'; shipped studies: init, length, lr, optimizer, "
                                         r"paper, spot\. Did you mean 'init'\? Or give the path of a study file "
                                         r"\(\.toml\)$"):
        load_study("inti")
    with pytest.raises(PtrayError, match=r"^study file '.*nope\.toml' not found$"):
        load_study(tmp_path / "nope.toml")
    with pytest.raises(PtrayError, match="^<study>: missing field 'description'"):
        parse_study('name = "x"')


def test_the_declarations_load_on_python_310_rules():
    """The module reads TOML with tomllib (3.11+) or tomli (3.10, a declared dependency), as the task files do."""
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "ptray" / "study" / "study_file.py").read_text()
    assert re.search(r"import tomllib\nexcept ModuleNotFoundError:.*\n\s+import tomli as tomllib", source)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'tomli>=2; python_version < \\"3.11\\"' in pyproject


def test_loading_a_study_imports_neither_torch_nor_ray():
    code = ("import sys; from ptray.study.study_file import load_study; [load_study(n) for n in "
            "('paper', 'init', 'length', 'optimizer', 'lr')]; print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
