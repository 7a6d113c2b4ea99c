"""Soft-prompt init and the PEFT adapter round trip."""

import json

import pytest
import torch

from ptray.config import PromptInit
from ptray.data.tasks import TASKS
from ptray.data.tokens import token_ids
from ptray.errors import PtrayError
from ptray.lm.prompt import init_prompt, load_adapter, prepend, save_adapter

INIT = TASKS["cb"].init_text


def test_text_init_is_init_text_embeddings(tiny):
    model, tok = tiny
    emb = model.get_input_embeddings().weight
    ids = token_ids(tok, INIT)
    rows = init_prompt(emb, tok, "text", INIT)
    assert rows.shape == (len(ids), emb.shape[1]) and rows.dtype == torch.float32
    assert torch.equal(rows, emb[torch.tensor(ids)].float())


def test_fixed_n_matches_peft_text_init(tiny, tiny_model_dir):
    """Repeat/truncate exactly like PEFT's TEXT init, for n above and below the text's length."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    n_text = len(token_ids(tok, INIT))
    for n in (n_text - 4, 2 * n_text + 3):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        peft_model = get_peft_model(base, PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n, prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=INIT, tokenizer_name_or_path=str(tiny_model_dir)))
        ours = init_prompt(model.get_input_embeddings().weight, tok, PromptInit.TEXT, INIT, num_tokens=n)
        assert torch.equal(ours, peft_model.prompt_encoder["default"].embedding.weight.detach())


def test_random_and_vocab_init(tiny):
    model, tok = tiny
    emb = model.get_input_embeddings().weight
    r1 = init_prompt(emb, tok, "random", INIT, num_tokens=6, seed=3)
    assert r1.shape == (6, emb.shape[1]) and torch.equal(r1, init_prompt(emb, tok, "random", INIT, 6, seed=3))
    assert not torch.equal(r1, init_prompt(emb, tok, "random", INIT, 6, seed=4))
    v = init_prompt(emb, tok, "sample_vocab", INIT, num_tokens=5, seed=0)
    # every row is some vocabulary row
    assert all(any(torch.equal(row, e) for e in emb.detach()) for row in v)


def test_prepend_puts_the_fp32_prompt_first_in_the_embeddings_dtype():
    weight = torch.randn(3, 8)  # the trained prompt stays fp32 whatever the model's dtype
    embeds = torch.randn(2, 4, 8).bfloat16()
    x, mask = prepend(weight, embeds, torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert x.shape == (2, 7, 8) and x.dtype == torch.bfloat16
    assert torch.equal(x[1, :3], weight.bfloat16()) and torch.equal(x[:, 3:], embeds)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]


def test_peft_round_trip_same_logits(tiny, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    rows = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    save_adapter(rows, tmp_path / "prompt", str(tiny_model_dir), INIT)
    cfg = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 6
    assert torch.equal(load_adapter(tmp_path / "prompt"), rows)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "prompt"))
    peft_model.eval()
    ids = torch.tensor([token_ids(tok, "Premise: it rained. Answer:")])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 6:]
        x = torch.cat([rows[None], model.get_input_embeddings()(ids)], 1)
        ours = model(inputs_embeds=x).logits[0, 6:]
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=1e-5)


def test_load_adapter_rejects_other_folders(tmp_path):
    with pytest.raises(PtrayError, match="is not a prompt adapter folder"):
        load_adapter(tmp_path)
