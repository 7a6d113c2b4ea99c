"""Special tokens as the model and its tokenizer define them, on tiny random models built offline.

- What ends an answer: a Llama-3-Instruct-style folder (``generation_config.json`` lists EOS ids [2, 0], the
  tokenizer's EOS is 0): exact match accepts either EOS id, as greedy ``generate`` stops at either (it was 0.00
  against generate's 1.00); the EOS trained on is the tokenizer's; the run's config records them.
- The init-text baseline of a Gemma2 (embedding scale inside the model's input path) equals the init text
  evaluated as plain tokens through the model's own forward.
- BOS: a tokenizer that starts each text with one (Llama, Gemma) gets it in every source, after the prompt, as PEFT
  puts it; the length checks count it; BLOOM's tokenizer adds none and its ids are unchanged.
- A pad token beyond the embedding rows is refused at load in one line.
"""

from __future__ import annotations

import pytest
import torch

from ptray.data.batching import Encoded, check_lengths, collate, encode, encode_all
from ptray.data.superglue import Example, load_split
from ptray.data.tasks import TASKS
from ptray.data.tokens import answer_ids_in_context, special_prefix, token_ids
from ptray.errors import PtrayError
from ptray.lm import families
from ptray.lm.evaluate import evaluate
from ptray.lm.forward import answer_logprobs
from ptray.lm.load import load_model, setup_model
from ptray.lm.special import end_ids, model_end_ids
from ptray.lm.tiny_model import build_tokenizer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
             pad_token_id=3, bos_token_id=1, eos_token_id=2)


def bos_tokenizer():
    """The tiny tokenizer, starting every text with ``<s>`` (id 1) by default, as Llama's and Gemma's do."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def _config(name: str, vocab: int):
    import transformers as tf

    if name == "llama":
        return tf.LlamaConfig(vocab_size=vocab, **SMALL)
    return tf.Gemma2Config(vocab_size=vocab, head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
                           final_logit_softcapping=2.0, **SMALL)


def _save(path, name, tok, edit=None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name, len(tok)))
    if edit is not None:
        edit(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _prompt(model, n, seed):
    scale = families.embed(model, torch.arange(4, 50)).float().std().item()
    return torch.randn(n, families.embed_dim(model), generator=torch.Generator().manual_seed(seed)) * scale


# --- what ends an answer -------------------------------------------------------------------------------------------


def _llama3_style(path):
    """A Llama whose generation config ends at [2, 0] while its tokenizer's EOS is 0 (Llama-3-Instruct's shape: the
    tokenizer names one of the model's EOS ids), and examples on which greedy decoding ends with id 2.

    The examples are (source, [g0]) with g0 the greedy first token; the LM head's row 2 is then set so that id 2 is
    the argmax right after g0 and not at the source's end. Returns ``(path, examples, prompt)``.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = bos_tokenizer()
    tok.eos_token = "<unk>"  # id 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama", len(tok)))
    model.eval()
    prompt = _prompt(model, 3, 0)
    gen = torch.Generator().manual_seed(1)
    examples, after, at_source = [], [], []
    with torch.no_grad():
        while len(examples) < 4:
            src = [1] + torch.randint(4, len(tok), (int(torch.randint(3, 9, (1,), generator=gen)),),
                                      generator=gen).tolist()
            x = torch.cat([prompt[None], families.embed(model, torch.tensor([src]))], 1)
            h = model.model(inputs_embeds=x).last_hidden_state[0, -1]
            g0 = int(model.lm_head(h).argmax())
            if g0 in (0, 2):
                continue
            x = torch.cat([x, families.embed(model, torch.tensor([[g0]]))], 1)
            examples.append((src, [g0]))
            at_source.append(h)
            after.append(model.model(inputs_embeds=x).last_hidden_state[0, -1])
        # row 2 with logit +40 after every answer and -40 at every source's end (8 equations, 64 unknowns)
        hidden = torch.stack(at_source + after)
        target = torch.tensor([-40.0] * 4 + [40.0] * 4)
        model.lm_head.weight[2] = torch.linalg.lstsq(hidden, target[:, None]).solution[:, 0]
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=3)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, examples, prompt


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path, examples, prompt = _llama3_style(tmp_path_factory.mktemp("llama3") / "model")
    model, tok = load_model(str(path))
    return path, model, tok, examples, prompt


def test_end_ids_come_from_the_generation_config(llama3):
    _, model, tok, _, _ = llama3
    assert tok.eos_token_id == 0 and model_end_ids(model) == (2, 0)
    assert end_ids(model, tok) == (0, 2)  # the tokenizer's EOS is trained (first); either ends an answer


def test_exact_match_accepts_any_eos_as_generate_does(llama3):
    """Greedy ``generate`` with the model's own generation config answers g0 then stops at id 2 on every example:
    1.00; ptray's exact match with the tokenizer's EOS alone was 0.00 (the fault), with the model's ends 1.00."""
    _, model, tok, examples, prompt = llama3
    data = [Encoded(i, s, (a,), 0) for i, (s, a) in enumerate(examples)]
    generated = []
    with torch.no_grad():
        for s, a in examples:
            x = torch.cat([prompt[None], families.embed(model, torch.tensor([s]))], 1)
            out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                 max_new_tokens=4, do_sample=False)[0].tolist()  # the model's own EOS ids
            generated.append(int(out == a + [2]))
    assert generated == [1, 1, 1, 1]
    for share in (True, False):
        kw = dict(batch_size=3, pad_id=tok.pad_token_id, share_source=share)
        assert evaluate(model, data, prompt, eos_id=(0,), **kw).exact_match == 0.0  # the tokenizer's EOS alone
        ends = evaluate(model, data, prompt, eos_id=end_ids(model, tok), **kw)
        assert ends.em_correct == generated and ends.exact_match == 1.0
        assert evaluate(model, data, prompt, eos_id=tok.eos_token_id, **kw).em_correct == generated  # int: all ends
    # the loss scores the EOS trained on (0), not the one greedy decoding picked
    batch = collate([(s, a) for s, a in examples], tok.pad_token_id, end_ids(model, tok)[0])
    assert batch.ans_tokens[batch.ans_end].tolist() == [0] * 4


def test_run_config_records_the_special_tokens(llama3, data_dir):
    from ptray.config import TrainConfig
    from ptray.training.train import train

    path, _, _, _, _ = llama3
    cfg = TrainConfig(task="cb", seed=0, model=str(path), data_dir=str(data_dir), max_epochs=1, batch_size=4,
                      lr=0.05, max_length=96, eval_split="train", max_train_examples=4, max_eval_examples=4,
                      device="cpu", baselines=False, precision="no")
    resolved = train(cfg).resolved
    assert resolved["eos_token_id"] == 0 and resolved["end_token_ids"] == [0, 2]
    assert resolved["bos_token_ids"] == [1] and resolved["pad_token_id"] == 3


# --- the init-text baseline through the model's own input path -----------------------------------------------------


def test_gemma_init_text_baseline_is_the_init_text_as_plain_tokens(tmp_path, data_dir):
    """The init text as a hard prompt equals the init text's tokens before each source through ``model(input_ids)``
    (Gemma2 scales its input embeddings by sqrt(hidden)); built from unscaled embedding rows it scored otherwise."""
    from ptray.config import TrainConfig
    from ptray.training.train import train

    path = _save(tmp_path / "gemma2", "gemma2", bos_tokenizer())
    cfg = TrainConfig(task="cb", seed=0, model=str(path), data_dir=str(data_dir), max_epochs=1, batch_size=4,
                      lr=0.05, max_length=96, eval_split="train", max_train_examples=4, max_eval_examples=6,
                      device="cpu", precision="no")
    baseline = train(cfg).evals["init_text"]
    model, tok = load_model(str(path))
    data = encode_all(TASKS["cb"], load_split(TASKS["cb"], "train", str(data_dir))[:6], tok, 96)
    init = token_ids(tok, TASKS["cb"].init_text)
    eos = end_ids(model, tok)[0]
    nll = count = 0.0
    with torch.no_grad():
        for d in data:
            a = d.answers[d.label]
            assert d.source[0] == 1  # Gemma's tokenizer starts the source with its BOS
            lp = model(input_ids=torch.tensor([init + d.source + a])).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(a) + 1) + len(init) + len(d.source) - 1
            nll -= lp[pos].gather(1, torch.tensor(a + [eos])[:, None]).sum().item()
            count += len(a) + 1
    assert baseline.loss == pytest.approx(nll / count, rel=1e-5)
    unscaled = model.get_input_embeddings().weight[torch.tensor(init)]
    old = evaluate(model, data, unscaled, 8, tok.pad_token_id, eos)
    assert abs(old.loss - baseline.loss) > 1e-3  # the fault: unscaled rows are another prompt


# --- BOS -----------------------------------------------------------------------------------------------------------


def test_source_starts_as_the_tokenizer_starts_a_text(tiny):
    """A BOS tokenizer's source is ``tokenizer(text)`` (BOS included); BLOOM's tokenizer adds none: unchanged ids."""
    task = TASKS["cb"]
    ex = Example("cb", "val", 0, {"premise": "It rained all day.", "hypothesis": "the ground is wet"}, 0)
    text = task.format(ex.fields)
    tok = bos_tokenizer()
    enc = encode(task, ex, tok, 256)
    assert special_prefix(tok) == [1] and enc.source == tok(text)["input_ids"] and enc.source[0] == 1
    for ids, answer in zip(enc.answers, task.answers):
        assert enc.source + ids == tok(text + answer)["input_ids"]
    _, bloom = tiny
    assert special_prefix(bloom) == []
    assert encode(task, ex, bloom, 256).source == token_ids(bloom, text) == bloom(text)["input_ids"]


def test_length_checks_and_truncation_count_the_bos(tiny):
    task = TASKS["cb"]
    tok, plain = bos_tokenizer(), build_tokenizer()
    need = len(token_ids(plain, task.answer_cue)) + max(
        len(a) for a in answer_ids_in_context(plain, task.answer_cue, task.answers))
    check_lengths(task, plain, need)  # without a BOS the cue and answer fit exactly
    with pytest.raises(PtrayError, match=rf"--max-length {need} cannot hold cb's answer cue 'Answer:' and longest "
                                         rf"answer \(1 BOS \+ "):
        check_lengths(task, tok, need)
    check_lengths(task, tok, need + 1)
    ex = Example("cb", "val", 0, {"premise": "The cat sat on the mat. " * 30, "hypothesis": "A cat."}, 0)
    enc = encode(task, ex, tok, 40)
    assert enc.truncated and enc.length <= 40 and enc.source[0] == 1  # the BOS is kept and counted


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_bos_source_equals_the_models_forward_on_usual_tokens(tmp_path, name):
    """No prompt: ptray's answer log-probabilities equal the model's forward on ``tokenizer(text + answer)``."""
    path = _save(tmp_path / name, name, bos_tokenizer())
    model, tok = load_model(str(path))
    task = TASKS["rte"]
    seqs, ref = [], []
    with torch.no_grad():
        for i, (p, h) in enumerate([("It rained all day.", "the ground is wet"), ("A dog barks.", "a cat")]):
            ex = Example("rte", "val", i, {"premise": p, "hypothesis": h}, i % 2)
            enc = encode(task, ex, tok, 128)
            a = enc.answers[ex.label]
            seqs.append((enc.source, a))
            ids = tok(task.format(ex.fields) + task.answers[ex.label])["input_ids"] + [tok.eos_token_id]
            lp = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
            pos = torch.arange(len(enc.source) - 1, len(ids) - 1)
            ref.append(lp[pos].gather(1, torch.tensor(ids[len(enc.source):])[:, None]).squeeze(1))
        ours, _ = answer_logprobs(model, collate(seqs, tok.pad_token_id, tok.eos_token_id), None)
    torch.testing.assert_close(ours, torch.cat(ref), atol=3e-5, rtol=1e-5)


# --- special ids inside the embeddings -----------------------------------------------------------------------------


def test_pad_token_beyond_the_embeddings_is_refused_at_load(tmp_path):
    """A pad token added to the tokenizer, the model not resized: refused in one line (was an IndexError)."""
    tok = build_tokenizer()
    rows = len(tok)
    path = _save(tmp_path / "m", "llama", tok)
    tok.add_special_tokens({"pad_token": "<newpad>"})
    tok.save_pretrained(path)
    with pytest.raises(PtrayError, match=rf"^the pad token id {rows} is outside the model's {rows} embedding rows "
                                         r"\(a token added to the tokenizer without resizing the model\); resize "
                                         r"the embeddings .* or use another pad token that the model has$"):
        load_model(str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = (AutoModelForCausalLM.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)))
    with pytest.raises(PtrayError, match=r"^the pad token id"):
        setup_model(str(path), "cpu", "no", loaded=loaded)
