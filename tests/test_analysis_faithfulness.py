"""The faithfulness check scores every prompt of a task and its nearest-token versions in shared passes
(``evaluate_prompts``), with the numbers of one evaluation per prompt."""

from __future__ import annotations

import torch

from analysis import faithfulness
from analysis.records import PromptRun


def test_many_prompts_per_pass_give_the_one_at_a_time_numbers(tiny, data_dir, monkeypatch):
    import ptray.lm.evaluate as evaluate_module
    from ptray.lm.evaluate import evaluate_on_task

    model, tokenizer = tiny
    gen = torch.Generator().manual_seed(0)
    scale = model.get_input_embeddings().weight.std().item()
    cfg = {"data_dir": str(data_dir), "eval_split": "val", "max_eval_examples": 6, "max_length": 128}
    prompts = [PromptRun(f"{t}{s}", t, s, torch.randn(n, 64, generator=gen) * scale, cfg,
                         {"exact_match": 0.5, "rank_accuracy": 0.5})
               for t, n in (("cb", 4), ("copa", 3)) for s in (0, 1)]
    ids = [torch.randint(5, 200, (p.num_tokens,), generator=gen) for p in prompts]
    variants = {"nearest_raw": [faithfulness.discretise(model, i) for i in ids],
                "shuffled": [faithfulness.discretise(model, i.flip(0)) for i in ids]}
    calls = []
    many = evaluate_module.evaluate_prompts
    monkeypatch.setattr(evaluate_module, "evaluate_prompts",
                        lambda *a, **k: calls.append(len(a[2])) or many(*a, **k))
    table = faithfulness.faithfulness_table(prompts, variants, model, tokenizer, batch_size=8)
    assert calls == [2 * 3, 2 * 3]  # one call per task: its 2 prompts x (soft + 2 variants)
    assert table[["task", "seed"]].values.tolist() == [["cb", 0], ["cb", 1], ["copa", 0], ["copa", 1]]
    for i, p in enumerate(prompts):
        row = table.iloc[i]
        for name, prompt in [("soft", p.prompt)] + [(v, hard[i]) for v, hard in variants.items()]:
            one, _ = evaluate_on_task(model, tokenizer, p.task, prompt, data_dir=str(data_dir), split="val",
                                      max_examples=6, max_length=128, batch_size=8)
            assert row[f"{name}_exact_match"] == one.exact_match, (p.label, name)
            assert row[f"{name}_rank_accuracy"] == one.rank_accuracy, (p.label, name)
            assert row["num_examples"] == one.num_examples == 6
    # the variants differ from the soft prompt somewhere: the comparison above is not of one number with itself
    cols = [f"{n}_rank_accuracy" for n in ("soft", "nearest_raw", "shuffled")]
    assert table[cols].nunique(axis=1).max() > 1 or table[cols].std().max() > 0


def test_a_hard_prompt_is_the_tokens_input_vectors(tiny):
    model, _ = tiny
    ids = torch.tensor([5, 17, 5])
    hard = faithfulness.discretise(model, ids)
    assert hard.shape == (3, 64) and hard.dtype == torch.float32
    torch.testing.assert_close(hard, model.get_input_embeddings().weight[ids].detach())
