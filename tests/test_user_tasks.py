"""A task a user declares in a file works in the commands: declared, trained, recorded."""

import json

from ptray.training.train import main

USER_TASK = '''
name = "premise_yes_no"
version = 3
labels = ["entailment", "contradiction", "neutral"]
init_text = "Is the hypothesis true given the premise?"
template = """
Text: {premise}
Claim: {hypothesis}
"""
[fields]
premise = "text"
hypothesis = "text"
[verbalizer]
entailment = "yes"
contradiction = "no"
neutral = "unclear"
[data]
dir_name = "CB"
splits = ["train", "val"]
'''


def test_train_with_a_task_file(tiny_model_dir, data_dir, tmp_path, capsys):
    task_file = tmp_path / "mine.toml"
    task_file.write_text(USER_TASK)
    out = tmp_path / "run"
    code = main(["--task-file", str(task_file), "--task", "premise_yes_no", "--seed", "0", "--model",
                 str(tiny_model_dir), "--data-dir", str(data_dir), "--output-dir", str(out), "--max-epochs", "1",
                 "--max-train-examples", "8", "--max-eval-examples", "8", "--no-baselines"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "premise_yes_no" and config["template_version"] == 3
    assert config["verbalizer"] == {"entailment": "yes", "contradiction": "no", "neutral": "unclear"}
    assert config["init_text"] == "Is the hypothesis true given the premise?" and len(config["task_digest"]) == 12


def test_unknown_task_without_its_file_is_one_line(tiny_model_dir, data_dir, tmp_path, capsys):
    code = main(["--task", "never_declared", "--seed", "0", "--model", str(tiny_model_dir), "--data-dir",
                 str(data_dir), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "never_declared" in err[0]


def test_the_analysis_knows_the_user_tasks_a_study_stored(tmp_path):
    """``ptray analyse`` in a fresh process: the plan's stored declarations are registered before any run is read."""
    import subprocess
    import sys

    (tmp_path / "mine.toml").write_text(USER_TASK)
    code = f"""
import json
from mlflow import MlflowClient
from analysis.mlflow_io import register_study_tasks
from ptray.data.tasks import get_task, load_task_file
from ptray.data.task_schema import read_task_file
decl = read_task_file({str(tmp_path / 'mine.toml')!r})
client = MlflowClient("sqlite:///{tmp_path / 'm.db'}")
exp_id = client.create_experiment("ptray-s")
client.set_experiment_tag(exp_id, "ptray.plan.s", json.dumps({{"task_declarations": [decl]}}))
try:
    get_task("premise_yes_no")
    raise SystemExit("known before registration")
except ValueError:
    pass
register_study_tasks(client.get_experiment(exp_id))
print(get_task("premise_yes_no").version)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "3"
