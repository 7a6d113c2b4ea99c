"""Task files: the schema (a good file, each kind of bad file with its one-line message), registering user tasks
(and again from their declaration, as a worker does), a user task from file to token ids, and the built-in files
equal to the former Python declarations."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ptray.data import task_schema, tasks
from ptray.data.batching import encode_all
from ptray.data.superglue import load_split
from ptray.data.task import FORMATTERS, parse_template, register_formatter
from ptray.data.task_schema import task_from_declaration
from ptray.data.tasks import (
    BUILTIN_TASK_NAMES,
    TASK_NAMES,
    all_task_names,
    get_task,
    load_task_file,
    register_declaration,
    register_task_files,
    task_declaration,
    user_declarations,
)
from ptray.errors import PtrayError

GOOD = '''\
name = "nli3"
version = 2
labels = ["entailment", "contradiction", "neutral"]
init_text = "Does the hypothesis follow from the premise?"
template = """
Premise: {premise}
Hypothesis: {hypothesis}
Genre: {genre}
"""
answer_cue = "Answer:"

[fields]
premise = "text"
hypothesis = "text"
genre = { type = "string", values = ["fiction", "news"] }
pair_id = "int"

[verbalizer]
entailment = "yes"
contradiction = "no"
neutral = "maybe"

[data]
dir_name = "NLI3"
splits = ["train", "val"]
'''


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Every test starts (and leaves the process) with no user tasks registered."""
    monkeypatch.setattr(tasks, "_USER", {})


def _file(tmp_path, text=GOOD, name="nli3.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_file(tmp_path):
    task = load_task_file(_file(tmp_path))
    assert task.name == "nli3" and task.version == 2 and task.dir_name == "NLI3"
    assert task.fields == ("premise", "hypothesis", "genre", "pair_id")
    assert task.text_fields == ("premise", "hypothesis") and task.int_fields == ("pair_id",)
    assert task.allowed_values == {"genre": ("fiction", "news")}
    assert task.splits == ("train", "val") and task.hub_config is None and task.hub_dataset is None
    assert task.answers == (" yes", " no", " maybe")
    ex = {"premise": " It  rained\n all day. ", "hypothesis": "The ground is wet.", "genre": "news", "pair_id": 4}
    assert task.format(ex) == "Premise: It rained all day.\nHypothesis: The ground is wet.\nGenre: news\nAnswer:"
    assert task.source == str(tmp_path / "nli3.toml") and "nli3" not in all_task_names()  # loaded, not registered


def test_defaults(tmp_path):
    text = GOOD.replace('answer_cue = "Answer:"\n', "").replace('dir_name = "NLI3"\nsplits = ["train", "val"]\n', "")
    task = load_task_file(_file(tmp_path, text))
    assert task.answer_cue == "Answer:" and task.dir_name == "nli3" and task.splits == ("train", "val", "test")
    assert task.hub_splits == {"train": "train", "val": "validation", "test": "test"}


def _edit(old, new):
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


BAD = {
    "unknown field": (_edit("version = 2", "version = 2\ntemplat = 'x'"),
                      r"unknown field 'templat' \(valid: name, version, .*\); did you mean 'template'\?"),
    "unknown data field": (_edit('dir_name = "NLI3"', 'dirname = "NLI3"'),
                           r"unknown field 'data.dirname' .*did you mean 'data.dir_name'\?"),
    "unknown field key": (_edit("values = [", "valuez = ["), r"unknown field 'fields.genre.valuez'"),
    "missing field": (_edit('init_text = "Does the hypothesis follow from the premise?"\n', ""),
                      r"field 'init_text' is missing"),
    "missing table": (GOOD.split("[verbalizer]")[0] + GOOD.split('neutral = "maybe"\n')[1],
                      r"field 'verbalizer' is missing"),
    "wrong type": (_edit('init_text = "Does the hypothesis follow from the premise?"', "init_text = 3"),
                   r"field 'init_text' should be a string, got an integer 3"),
    "wrong type labels": (_edit('labels = ["entailment", "contradiction", "neutral"]', 'labels = "yes"'),
                          r"field 'labels' should be a non-empty list of strings, got a string 'yes'"),
    "version string": (_edit("version = 2", 'version = "2"'), r"field 'version' must be an integer >= 1, got a "
                       r"string '2'"),
    "version zero": (_edit("version = 2", "version = 0"), r"field 'version' must be an integer >= 1, got an "
                     r"integer 0"),
    "version float": (_edit("version = 2", "version = 1.5"), r"field 'version' must be an integer >= 1, got a "
                      r"number 1.5"),
    "bad name": (_edit('name = "nli3"', 'name = "My Task"'), r"field 'name' must be ASCII lower case letters"),
    "non-ASCII name": (_edit('name = "nli3"', 'name = "tâche"'), r"field 'name' must be ASCII lower case letters "
                       r"\(a-z\), digits, '-' or '_', starting with a letter, at most 64 characters; got 'tâche'"),
    "long name": (_edit('name = "nli3"', f'name = "{"t" * 65}"'), r"field 'name' must be ASCII lower case letters"),
    "undeclared placeholder": (_edit("{hypothesis}", "{hypothesys}"), r"field 'template': placeholder {hypothesys} "
                               r"names no declared field \(declared: premise, hypothesis, genre, pair_id\); did you "
                               r"mean {hypothesis}\?"),
    "stray brace": (_edit("Genre: {genre}", "Genre: {genre"), r"field 'template': unmatched '{' at character \d+ "
                    r"\(write {{ for a literal brace\)"),
    "placeholder not a name": (_edit("{genre}", "{0}"), r"field 'template': placeholder \{0\} is not a field name"),
    "verbalizer missing label": (_edit('neutral = "maybe"', ""), r"field 'verbalizer' has no answer words for "
                                 r"label 'neutral'"),
    "verbalizer extra label": (_edit('neutral = "maybe"', 'neutral = "maybe"\nunsure = "idk"'),
                               r"field 'verbalizer' names 'unsure', which is not a label"),
    "shared answer": (_edit('neutral = "maybe"', 'neutral = "no"'), r"labels 'contradiction' and 'neutral' share "
                      r"the answer 'no'"),
    "answer with space": (_edit('neutral = "maybe"', 'neutral = " maybe"'), r"field 'verbalizer.neutral': answer "
                          r"words must be single-spaced"),
    "one label": (_edit('labels = ["entailment", "contradiction", "neutral"]', 'labels = ["entailment"]'),
                  r"field 'labels' needs at least two labels"),
    "duplicate label": (_edit('"contradiction", "neutral"]', '"neutral", "neutral"]'),
                        r"field 'labels' lists 'neutral' twice"),
    "unknown field type": (_edit('hypothesis = "text"', 'hypothesis = "txt"'), r"field 'fields.hypothesis': unknown "
                           r"type 'txt' \(valid: text, string, int\); did you mean 'text'\?"),
    "no text field": (_edit('premise = "text"\nhypothesis = "text"', 'premise = "string"\nhypothesis = "string"'),
                      r"declares no field of type 'text'"),
    "reserved field": (_edit('pair_id = "int"', 'label = "string"'), r"field 'fields.label': 'idx' and 'label' are "
                       r"read from every record"),
    "values on int": (_edit('pair_id = "int"', 'pair_id = { type = "int", values = ["1"] }'),
                      r"field 'fields.pair_id.values': only string fields"),
    "unknown formatter": (_edit('answer_cue = "Answer:"', 'answer_cue = "Answer:"\nformatter = "cpoa"'),
                          r"field 'formatter': unknown formatter 'cpoa' \(registered: copa.*\); did you mean "
                          r"'copa'\?"),
    "formatter field": (_edit('answer_cue = "Answer:"', 'answer_cue = "Answer:"\nformatter = "copa"'),
                        r"field 'formatter': 'copa' reads field 'question', which 'fields' does not declare"),
    "cue whitespace": (_edit('answer_cue = "Answer:"', 'answer_cue = "Answer: "'), r"field 'answer_cue' must not "
                       r"end with whitespace"),
    "unknown split": (_edit('splits = ["train", "val"]', 'splits = ["train", "dev"]'), r"field 'data.splits': "
                      r"unknown split 'dev' \(valid: train, val, test\)"),
    "dir_name path": (_edit('dir_name = "NLI3"', 'dir_name = "../NLI3"'), r"field 'data.dir_name' must be one "
                      r"folder name"),
    "not toml": (_edit('name = "nli3"', 'name = "nli3'), r"not valid TOML \(.*line 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_gives_one_line_naming_file_and_field(tmp_path, case):
    text, message = BAD[case]
    path = _file(tmp_path, text)
    with pytest.raises(PtrayError) as info:
        load_task_file(path)
    assert str(info.value).startswith(f"{path}: "), str(info.value)
    assert "\n" not in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_each_part_of_a_task_file_has_its_own_check():
    """The checks are split by the part of the file they judge (as a study file's are), none of them a long
    function; the messages above pin what they say."""
    source = Path(task_schema.__file__).read_text()
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lines = {n.name: n.end_lineno - n.lineno + 1 for n in functions}
    assert max(lines.values()) <= 45, lines
    parts = {"name", "version", "fields", "labels", "verbalizer", "formatter", "template", "answer_cue", "data"}
    assert parts <= set(vars(task_schema._Check))


def test_missing_file(tmp_path):
    with pytest.raises(PtrayError, match=r"task file '.*nope.toml' does not exist"):
        load_task_file(tmp_path / "nope.toml")


def test_a_byte_order_mark_is_read_not_refused(tmp_path):
    """Windows editors save UTF-8 with a byte-order mark; TOML forbids it at line 1, column 1, but it is no part of
    the content: the file reads as the same task (CRLF line ends too)."""
    path = tmp_path / "nli3.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode())
    task = load_task_file(path)
    plain = load_task_file(_file(tmp_path, name="plain.toml"))
    assert task.declaration == plain.declaration and task.format({"premise": "a", "hypothesis": "b", "genre": "news",
                                                                  "pair_id": 1}) == plain.format(
        {"premise": "a", "hypothesis": "b", "genre": "news", "pair_id": 1})


def test_template_syntax():
    assert parse_template("{a}{{x}}{b}") == (("", "a"), ("{x}", "b"))
    assert parse_template("no placeholders") == (("no placeholders", None),)
    with pytest.raises(ValueError, match=r"unmatched '}'"):
        parse_template("a } b")


def test_register_and_look_up(tmp_path):
    path = _file(tmp_path)
    (task,) = register_task_files([path])
    assert get_task("NLI3") is task and all_task_names() == (*BUILTIN_TASK_NAMES, "nli3")
    assert TASK_NAMES == ("cb", "rte", "copa", "wsc")  # the default study stays the paper's
    assert register_task_files([path]) == (task,)  # the same file again: nothing changes
    with pytest.raises(PtrayError, match=r"unknown task 'nli'; valid tasks: cb, rte, copa, wsc\. Did you mean "
                                         r"'nli3'\? Other registered tasks: wic, nli3\."):
        get_task("nli")


def test_name_clash_with_builtin_is_refused(tmp_path):
    path = _file(tmp_path, GOOD.replace('name = "nli3"', 'name = "cb"'))
    with pytest.raises(PtrayError) as info:
        register_task_files([path])
    assert str(info.value) == f"{path}: task name 'cb' is a built-in task's; choose another name"
    assert get_task("cb").source.endswith("task_files/cb.toml")


def test_two_files_one_name_differently_is_refused(tmp_path):
    first = _file(tmp_path)
    second = _file(tmp_path, GOOD.replace("version = 2", "version = 3"), name="other.toml")
    with pytest.raises(PtrayError, match=rf"{second}: task 'nli3' is already registered from {first}, declared "
                                         r"differently"):
        register_task_files([first, second])


def test_declaration_travels_as_json(tmp_path):
    """A worker process knows the task from its declaration alone (the dict that travels with the config)."""
    (task,) = register_task_files([_file(tmp_path)])
    decl = task_declaration("nli3")
    assert user_declarations() == [decl] and user_declarations(["cb"]) == [] and user_declarations(["nli3"]) == [decl]
    wire = json.dumps(decl)
    tasks._USER.clear()  # a fresh process
    again = register_declaration(json.loads(wire))
    assert again == task and again.digest == task.digest
    assert register_declaration(json.loads(wire)) is again  # a second registration is a no-op
    ex = {"premise": "p", "hypothesis": "h", "genre": "news", "pair_id": 1}
    code = ("import json, sys; from ptray.data.tasks import register_declaration, get_task; "
            "register_declaration(json.loads(sys.stdin.read())); t = get_task('nli3'); "
            f"print(json.dumps([t.format({ex!r}), t.answers, t.digest]))")
    out = subprocess.run([sys.executable, "-c", code], input=wire, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [task.format(ex), list(task.answers), task.digest]
    # builtin tasks have declarations too: they rebuild equal, and registering one is a no-op
    assert task_from_declaration(task_declaration("copa")) == get_task("copa")
    assert register_declaration(task_declaration("copa")) is get_task("copa") and "copa" not in tasks._USER


def test_task_file_flag(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    tasks.add_task_file_argument(parser)
    assert parser.parse_args([]).task_files == []
    args = parser.parse_args(["--task-file", str(_file(tmp_path)), "--task-file", str(_file(tmp_path, name="b.toml"))])
    assert [t.name for t in register_task_files(args.task_files)] == ["nli3", "nli3"]
    decls = user_declarations(["nli3"])
    tasks._USER.clear()  # a worker
    assert [t.name for t in tasks.register_declarations(decls)] == ["nli3"] and get_task("nli3").version == 2


def test_task_pickles(tmp_path):
    """Ray pickles what it ships: a Task (its formatter is a name, resolved in the receiving process)."""
    import pickle

    task = load_task_file(_file(tmp_path))
    for original in (task, get_task("copa"), get_task("wic")):
        again = pickle.loads(pickle.dumps(original))
        assert again == original and again.declaration == original.declaration
    ex = {"premise": "p", "choice1": "a", "choice2": "b", "question": "cause"}
    assert pickle.loads(pickle.dumps(get_task("copa"))).format(ex) == get_task("copa").format(ex)


def test_schema_docstring_examples_run():
    import doctest

    import ptray.data.task
    import ptray.data.task_schema

    results = [doctest.testmod(m, raise_on_error=False) for m in (ptray.data.task, ptray.data.task_schema)]
    assert sum(r.attempted for r in results) >= 3 and sum(r.failed for r in results) == 0


def test_user_task_from_file_to_token_ids(tmp_path, tiny):
    """Declare a task, register it, read its jsonl folder, encode it: the data path of a user task."""
    _, tok = tiny
    (task,) = register_task_files([_file(tmp_path)])
    data = tmp_path / "data" / "NLI3"
    data.mkdir(parents=True)
    rows = [{"premise": "The cat sat on the mat. " * (1 + 30 * (i == 2)), "hypothesis": f"A cat sat {i}.",
             "genre": ("news", "fiction")[i % 2], "pair_id": 10 + i, "label": task.labels[i % 3], "idx": i,
             "extra": "ignored"} for i in range(4)]
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_split(get_task("nli3"), "train", tmp_path / "data")
    assert [ex.label for ex in examples] == [0, 1, 2, 0] and [ex.idx for ex in examples] == [0, 1, 2, 3]
    assert examples[1].fields == {"premise": "The cat sat on the mat. ", "hypothesis": "A cat sat 1.",
                                  "genre": "fiction", "pair_id": 11}  # raw; undeclared fields dropped
    assert len(load_split(task, "val", tmp_path / "data")) == 4
    with pytest.raises(PtrayError, match=r"task 'nli3' has no test split \(its declaration, .*nli3.toml, lists: "
                                         r"train, val\)"):
        load_split(task, "test", tmp_path / "data")
    encoded = encode_all(task, examples, tok, 64)
    assert tok.decode(encoded[0].source) == ("Premise: The cat sat on the mat.\nHypothesis: A cat sat 0.\nGenre: "
                                             "news\nAnswer:")
    assert [tok.decode(a) for a in encoded[0].answers] == [" yes", " no", " maybe"]
    assert not encoded[0].truncated and encoded[2].truncated and encoded[2].length <= 64
    assert tok.decode(encoded[2].source).endswith("\nHypothesis: A cat sat 2.\nGenre: news\nAnswer:")
    bad = tmp_path / "bad" / "NLI3"
    bad.mkdir(parents=True)
    (bad / "train.jsonl").write_text(json.dumps({**rows[0], "genre": "poetry"}) + "\n")
    with pytest.raises(PtrayError, match=r"NLI3/train.jsonl:1: field 'genre' must be 'fiction' or 'news', got "
                                         r"'poetry'"):
        load_split(task, "train", tmp_path / "bad")


def test_user_task_on_the_hub(tmp_path, monkeypatch):
    import datasets

    text = _edit('dir_name = "NLI3"', 'hub_dataset = "me/nli3"\nhub_splits = { val = "dev" }')
    task = load_task_file(_file(tmp_path, text))
    seen = {}

    def fake_load_dataset(path, name, split):
        seen.update(path=path, name=name, split=split)
        return [{"premise": "p", "hypothesis": "h", "genre": "news", "pair_id": 1, "label": 2, "idx": 0}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (ex,) = load_split(task, "val")  # the task's own Hub dataset wins over the run's default
    assert seen == {"path": "me/nli3", "name": None, "split": "dev"} and ex.label == 2
    local_only = load_task_file(_file(tmp_path, GOOD, name="local.toml"))
    with pytest.raises(PtrayError, match=r"task 'nli3' declares no Hub dataset .*pass --data-dir DIR with "
                                         r"DIR/NLI3/val.jsonl"):
        load_split(local_only, "val")


def test_formatter_registry():
    assert FORMATTERS["copa"].reads == ("question",) and FORMATTERS["copa"].provides == ("question_text",)
    with pytest.raises(ValueError, match="formatter 'copa' is already registered"):
        register_formatter("copa", reads=(), provides=())(lambda fields: {})
    with pytest.raises(PtrayError, match="copa formatter: field 'question' must be 'cause' or 'effect'"):
        get_task("copa").format({"premise": "p", "choice1": "a", "choice2": "b", "question": "why"})


# --- the built-in files are the former Python declarations -------------------------------------------------------

def _clean(text):
    return " ".join(str(text).split())


def _former_cb(ex):
    return f"Premise: {_clean(ex['premise'])}\nHypothesis: {_clean(ex['hypothesis'])}\nAnswer:"


def _former_copa(ex):
    question = {"cause": "What was the cause?", "effect": "What happened as a result?"}[ex["question"]]
    return (f"Premise: {_clean(ex['premise'])}\n{question}\n"
            f"1: {_clean(ex['choice1'])}\n2: {_clean(ex['choice2'])}\nAnswer:")


def _former_wsc(ex):
    return (f"Text: {_clean(ex['text'])}\n"
            f'Does the pronoun "{_clean(ex["span2_text"])}" refer to "{_clean(ex["span1_text"])}"?\nAnswer:')


FORMER = {  # ptray.tasks before task files (commit 741da52): every field, and the formatter
    "cb": dict(dir_name="CB", hub_config="cb", fields=("premise", "hypothesis"), text_fields=("premise", "hypothesis"),
               labels=("entailment", "contradiction", "neutral"),
               verbalizer={"entailment": "yes", "contradiction": "no", "neutral": "maybe"},
               init_text="Does the hypothesis entail, contradict or is neutral about the premise?",
               allowed_values={}, version=1, formatter=_former_cb),
    "rte": dict(dir_name="RTE", hub_config="rte", fields=("premise", "hypothesis"),
                text_fields=("premise", "hypothesis"), labels=("entailment", "not_entailment"),
                verbalizer={"entailment": "yes", "not_entailment": "no"},
                init_text="Does the hypothesis entail, or not entail the premise?", allowed_values={}, version=1,
                formatter=_former_cb),
    "copa": dict(dir_name="COPA", hub_config="copa", fields=("premise", "choice1", "choice2", "question"),
                 text_fields=("premise", "choice1", "choice2"), labels=("0", "1"), verbalizer={"0": "1", "1": "2"},
                 init_text="Pick the correct choice given the premise and the question.",
                 allowed_values={"question": ("cause", "effect")}, version=1, formatter=_former_copa),
    "wsc": dict(dir_name="WSC", hub_config="wsc.fixed",
                fields=("text", "span1_text", "span2_text", "span1_index", "span2_index"), text_fields=("text",),
                labels=("False", "True"), verbalizer={"False": "no", "True": "yes"},
                init_text="Given the following text, decide whether the span1_text is referenced by the pronoun in "
                          "span2_text",
                allowed_values={}, version=1, formatter=_former_wsc),
}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_builtin_file_is_the_former_declaration(name, data_dir):
    task, former = get_task(name), dict(FORMER[name])
    formatter = former.pop("formatter")
    assert {key: getattr(task, key) for key in former} == former
    assert task.answer_cue == "Answer:" and task.splits == ("train", "val", "test") and task.hub_dataset is None
    for split in ("train", "val", "test"):
        for ex in load_split(task, split, data_dir):
            assert task.format(ex.fields) == formatter(ex.fields)
            emptied = {**ex.fields, **{f: "" for f in task.text_fields}}  # what truncation's floor formats
            assert task.format(emptied) == formatter(emptied)


def test_builtin_declarations_are_plain_data():
    for name in BUILTIN_TASK_NAMES:
        decl = task_declaration(name)
        assert json.loads(json.dumps(decl)) == decl and decl["name"] == name
        assert task_from_declaration(decl) == get_task(name)


def test_schema_docstring_example_is_the_cb_file():
    """The annotated example in ptray.data.task_schema's docstring is a valid file declaring the built-in CB."""
    import textwrap

    import ptray.data.task_schema as schema

    example = textwrap.dedent(schema.__doc__.split("annotated::\n")[1].split("\nA record")[0])
    task = task_from_declaration(schema.parse_task_toml(example, "docstring"), "docstring")
    assert task == get_task("cb") and task.declaration == task_declaration("cb")
