"""Tasks as data in a study: --task-file in sweeps/all.py (registered before --tasks is read, shipped to every worker
in the plan, --resume without the file, an edited file refused), WiC trainable, transfer-only targets (--targets:
a task without a training split is evaluated, never trained; training it is refused in one line)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from ptray.config import TrainConfig
from ptray.data.tasks import get_task, user_declarations
from ptray.errors import PtrayError
from ptray.plan import Plan
from ptray.study import store, tracking
from ptray.study.context import StudyContext
from ptray.study.driver import main
from ptray.study.flags import build_parser, plan_from_args, register_plan_tasks

SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "all.py"

# A task over CB's files that declares only the validation split: a held-out target, never trained.
HELDOUT = '''
name = "{name}"
version = {version}
labels = ["entailment", "contradiction", "neutral"]
init_text = "Is the claim true given the text?"
template = """
Text: {{premise}}
Claim: {{hypothesis}}
"""
[fields]
premise = "text"
hypothesis = "text"
[verbalizer]
entailment = "yes"
contradiction = "no"
neutral = "maybe"
[data]
dir_name = "CB"
splits = {splits}
'''


def task_file(tmp_path, name, splits='["val"]', version=1):
    path = tmp_path / f"{name}-v{version}.toml"
    path.write_text(HELDOUT.format(name=name, version=version, splits=splits))
    return path


@pytest.fixture(autouse=True)
def registry():
    """Each test's user tasks leave this process's registry with it (other tests list the registered tasks)."""
    from ptray.data import tasks

    saved = dict(tasks._USER)
    yield
    tasks._USER.clear()
    tasks._USER.update(saved)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def run_main(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_task_file_and_transfer_only_targets_reach_the_plan(workdir, tmp_path, data_dir, capsys):
    held = task_file(tmp_path, "heldout_cb")
    trainable = task_file(tmp_path, "trainable_cb", splits='["train", "val"]')
    args = build_parser().parse_args(["--task-file", str(held), "--task-file", str(trainable), "--tasks",
                                      "cb,trainable_cb,wic", "--targets", "heldout_cb", "--seeds", "0"])
    plan = plan_from_args(args)
    assert plan.tasks == ("cb", "trainable_cb", "wic") and plan.targets == ("heldout_cb",)
    assert plan.transfer_targets == ("cb", "trainable_cb", "wic", "heldout_cb")
    assert plan.num_evaluations == 3 * 4 + 4
    # the user tasks travel with the plan (built-in ones need nothing), and survive its JSON round trip
    assert [d["name"] for d in plan.task_declarations] == ["heldout_cb", "trainable_cb"]
    assert list(plan.task_declarations) == user_declarations(["heldout_cb", "trainable_cb"])
    again = Plan.from_json(plan.to_json())
    assert again.targets == plan.targets and again.task_declarations == plan.task_declarations
    code, out, err = run_main(capsys, "--task-file", str(held), "--tasks", "cb,wic", "--targets", "heldout_cb",
                              "--seeds", "0", "--smoke", "--data-dir", str(data_dir), "--dry-run")
    assert code == 0, err
    assert "2 trials (cb, wic x seeds 0)" in out
    assert "9 evaluations (2 prompts x 3 tasks + 3 no-prompt baselines)" in out
    assert "transfer only (not trained): heldout_cb" in out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "cb,heldout_cb2"], "error: task 'heldout_cb2' has no training split (its splits: val), so it cannot "
                                    "be trained; give it as a transfer-only target (--targets heldout_cb2)"),
    (["--tasks", "cb", "--targets", "cb"], "error: --targets lists 'cb', which --tasks trains; every trained task is "
                                           "a transfer target already"),
    (["--tasks", "cb", "--targets", "wic,wic"], "error: --targets lists wic more than once"),
    (["--tasks", "cb", "--targets", "nope"], "error: unknown task 'nope'"),
])
def test_training_a_transfer_only_task_is_refused_in_one_line(workdir, tmp_path, capsys, argv, message):
    held = task_file(tmp_path, "heldout_cb2")
    code, _, err = run_main(capsys, "--task-file", str(held), "--smoke", *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.strip().startswith(message), err
    assert not (workdir / "mlflow.db").exists() and not (workdir / "outputs").exists()  # nothing started
    with pytest.raises(PtrayError, match="has no training split"):  # ptray train and a trial refuse it too
        TrainConfig(task="heldout_cb2")


def test_resume_registers_the_plans_tasks_and_refuses_an_edited_task_file(workdir, tmp_path, data_dir, capsys):
    from ptray.data.task_schema import read_task_file

    original = task_file(tmp_path, "resumed_task", splits='["train", "val"]')
    mc = store.client(store.resolve_tracking_uri())
    exp = tracking.get_or_create_experiment(mc, "ptray-usertask")
    stored = {**Plan(study="usertask", tasks=("cb",), seeds=(0,), smoke=True, tiny_model=True, group_size=1,
                     train=TrainConfig(data_dir=str(data_dir))).to_json(),
              "tasks": ["cb", "resumed_task"], "task_declarations": [read_task_file(original)]}
    tracking.write_plan(mc, exp, "usertask", stored)
    # this process never read the file: --resume registers the task from the plan
    with pytest.raises(PtrayError):
        get_task("resumed_task")
    code, out, err = run_main(capsys, "--resume", "--study", "usertask", "--dry-run")
    assert code == 0, err
    assert "2 trials (cb, resumed_task x seeds 0)" in out and get_task("resumed_task").version == 1
    # the same file again is fine; an edited one (its digest differs) is refused in one line
    assert run_main(capsys, "--resume", "--study", "usertask", "--dry-run", "--task-file", str(original))[0] == 0
    edited = task_file(tmp_path, "resumed_task", splits='["train", "val"]', version=2)
    with pytest.raises(PtrayError, match=r"^--resume: task 'resumed_task' from study plan \(resumed_task\) differs "
                                         r"from the declaration the study started with \(digest \w+ != \w+\)"):
        register_plan_tasks({"task_declarations": [read_task_file(edited)]})  # this process has the plan's
    # as a user meets it: a new process, the edited file given again
    done = subprocess.run([sys.executable, str(SWEEP), "--resume", "--study", "usertask", "--dry-run", "--task-file",
                           str(edited)], cwd=workdir, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: --resume: task 'resumed_task' from {edited} differs from the declaration "
                                  f"the study started with (digest "), done.stderr


def test_a_worker_registers_the_study_tasks_from_its_context(tmp_path):
    """A Ray worker is a fresh process that never read the task file: the context it gets carries the
    declarations, and ``register_tasks`` (run by every trial and transfer task first) makes the task known."""
    task_file_path = task_file(tmp_path, "worker_task", splits='["train", "val"]')
    from ptray.data.tasks import register_task_files

    register_task_files([task_file_path])
    ctx = StudyContext(study="s", experiment_id="0", tracking_uri="sqlite:///x.db", train=TrainConfig(),
                       model_label="m", data_label=None, task_declarations=tuple(user_declarations(["worker_task"])))
    (tmp_path / "ctx.pkl").write_bytes(pickle.dumps(ctx))
    code = ("import pickle, sys; from ptray.data.tasks import get_task; "
            f"ctx = pickle.load(open({str(tmp_path / 'ctx.pkl')!r}, 'rb')); ctx.register_tasks(); "
            "t = get_task('worker_task'); "
            "print(t.name, t.splits, ctx.train_config('worker_task', 3).task)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "worker_task ('train', 'val') worker_task"
