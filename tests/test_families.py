"""Every supported model family through the same equality checks, on tiny random models built offline.

Per family: ptray's answer log-probabilities against the model's own forward; loss and prompt gradient against
PEFT; TEXT init against PEFT's; a saved prompt reloaded into PEFT; exact match against greedy ``generate``; the
shared-source evaluation against one pass per label; the effective prompt against the model's own modules written
out by hand; answer ids as tokenized in context; a BOS-adding tokenizer (Llama, Gemma) against PEFT on text
tokenised the usual way. Then the two cases from issue 10 with their right values (Gemma2's
final logit soft-capping, a Llama-2-style legacy SentencePiece tokenizer), Gemma 3's sliding window (sources
longer than it, and why the shared source pass must not be used there), and the load-time check of a family
outside the tested set.
"""

from __future__ import annotations

import pytest
import torch

from ptray.config import PromptInit
from ptray.data.batching import Encoded, collate, encode
from ptray.data.superglue import Example
from ptray.data.tasks import TASKS
from ptray.data.tokens import answer_ids_in_context, token_ids
from ptray.errors import PtrayError
from ptray.lm import families
from ptray.lm.check import check_model
from ptray.lm.evaluate import evaluate, shares_source
from ptray.lm.forward import answer_logprobs
from ptray.lm.load import load_model
from ptray.lm.prompt import init_prompt, save_adapter
from ptray.lm.tiny_model import build_tokenizer

INIT = TASKS["cb"].init_text
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)


def _config(name: str, vocab: int):
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if name == "bloom":
        return tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2, pad_token_id=3, **ids)
    if name == "gpt2":  # GPT-2 has no pad token
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **ids)
    if name == "opt":  # embeddings 32 wide, projected in and out of a 64-wide model
        return tf.OPTConfig(hidden_size=64, word_embed_proj_dim=32, ffn_dim=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, init_std=0.2, pad_token_id=3, **ids)
    if name == "llama":
        return tf.LlamaConfig(pad_token_id=3, **SMALL, **ids)
    if name == "qwen2":
        return tf.Qwen2Config(pad_token_id=3, **SMALL, **ids)
    if name == "gemma2":  # a small soft cap, so capping changes the numbers clearly; window larger than any input
        return tf.Gemma2Config(pad_token_id=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
                               final_logit_softcapping=2.0, **SMALL, **ids)
    if name == "gemma3_text":  # as gemma-3-270m: a tied head, local layers with a window, global ones without,
        # each kind with its own RoPE base (small bases here, so positions change the numbers clearly); the window
        # is shorter than most test sequences, so every check below runs across it
        return tf.Gemma3TextConfig(
            pad_token_id=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000.0}},
            **{**SMALL, "tie_word_embeddings": True}, **ids)
    raise ValueError(name)


WINDOW = 12  # Gemma 3's sliding window in its tiny config
NAMES = ["bloom", "gpt2", "opt", "llama", "qwen2", "gemma2", "gemma3_text"]


def _build(path, name, tokenizer=None):
    from transformers import AutoModelForCausalLM

    tok = tokenizer or build_tokenizer()
    if name == "gpt2":
        tok.pad_token = None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name, len(tok)))
    if name == "gemma3_text":
        # random tied weights scaled by sqrt(hidden) swamp the blocks: the head reads the input token back and
        # greedy decoding repeats it. Rows 1/sqrt(hidden) as large (as a trained Gemma's are small) let the blocks
        # decide, so the greedy checks see varied continuations
        model.get_input_embeddings().weight.data.mul_(model.config.hidden_size ** -0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=NAMES)
def fam(request, tmp_path_factory):
    """(name, folder, model, tokenizer, pad_id) of one family's tiny random model, loaded through ptray."""
    path = _build(tmp_path_factory.mktemp(request.param) / "model", request.param)
    model, tok = load_model(str(path))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    assert model.config.model_type == request.param
    return request.param, path, model, tok, pad


def _seqs(gen, vocab, n):
    return [(torch.randint(4, vocab, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist(),
             torch.randint(4, vocab, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist())
            for _ in range(n)]


def _prompt(model, n, seed):
    """Random prompt rows at the scale of the model's input vectors."""
    scale = families.embed(model, torch.arange(4, 50)).float().std().item()
    return torch.randn(n, families.embed_dim(model), generator=torch.Generator().manual_seed(seed)) * scale


def _own_logprobs(model, seqs, prompt, eos):
    """The model's own forward (full logits, one unpadded sequence at a time) at the answer positions."""
    out = []
    for src, ans in seqs:
        x = torch.cat([prompt[None], families.embed(model, torch.tensor([src + ans]))], 1)
        lp = model(inputs_embeds=x).logits[0].float().log_softmax(-1)
        pos = torch.arange(len(src) - 1, len(src) + len(ans)) + prompt.shape[0]
        out.append(lp[pos].gather(1, torch.tensor(ans + [eos])[:, None]).squeeze(1))
    return torch.cat(out)


def test_answer_logprobs_equal_the_models_forward(fam):
    name, _, model, tok, pad = fam
    seqs = _seqs(torch.Generator().manual_seed(1), len(tok), 6)
    prompt = _prompt(model, 5, 1)
    batch = collate(seqs, pad, tok.eos_token_id)
    assert (batch.attention_mask == 0).any()  # padding really occurs
    with torch.no_grad():
        fast, ok = answer_logprobs(model, batch, prompt)
        ref = _own_logprobs(model, seqs, prompt, tok.eos_token_id)
    torch.testing.assert_close(fast, ref, atol=3e-5, rtol=1e-5)
    assert ok.shape == fast.shape and fast.std() > 0.05  # the model is sensitive to its input


def test_eager_attention_equals_the_models_own_attention(fam):
    """ptray's CPU attention (``use_eager_attention``: Hugging Face's eager, for speed on CPU) gives the answer
    log-probabilities and the prompt gradient of the attention the model loaded with (SDPA where the family has it),
    with padding in the batch."""
    import copy

    from ptray.lm.load import use_eager_attention

    name, _, model, tok, pad = fam
    eager = copy.deepcopy(model)
    switched = use_eager_attention(eager)
    assert eager.config._attn_implementation == "eager" or name == "bloom"  # BLOOM's own attention is eager
    assert switched == (model.config._attn_implementation not in (None, "eager"))
    seqs = _seqs(torch.Generator().manual_seed(2), len(tok), 6)
    batch = collate(seqs, pad, tok.eos_token_id)
    grads = []
    for m in (model, eager):
        prompt = _prompt(model, 5, 2).requires_grad_()
        lp, _ = answer_logprobs(m, batch, prompt)
        lp.sum().backward()
        grads.append((lp.detach(), prompt.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-4)


def _reference_model(path):
    """The model as Hugging Face defines it, for PEFT to wrap: eager attention, which every family has and which
    applies Gemma 2's attention soft cap (transformers < 5 loads Gemma 2 with SDPA, dropping it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")


def _peft(path, n, init=None, token_dim=None):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    base = _reference_model(path)
    kw = dict(prompt_tuning_init=PromptTuningInit.RANDOM)
    if init:
        kw = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=init,
                  tokenizer_name_or_path=str(path))
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n,
                                                    token_dim=token_dim, **kw))
    model.eval()
    return model


def test_loss_and_gradient_equal_peft(fam):
    name, path, model, tok, pad = fam
    eos = tok.eos_token_id
    seqs = _seqs(torch.Generator().manual_seed(2), len(tok), 5)
    rows = _prompt(model, 6, 2)
    peft_model = _peft(path, 6, token_dim=families.embed_dim(model))
    emb = peft_model.prompt_encoder["default"].embedding
    emb.weight.data.copy_(rows)
    width = max(len(s) + len(a) + 1 for s, a in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (s, a) in enumerate(seqs):
        full = s + a + [eos]
        ids[i, :len(full)], mask[i, :len(full)] = torch.tensor(full), 1
        labels[i, len(s):len(full)] = torch.tensor(a + [eos])
    peft_loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    peft_loss.backward()

    prompt = torch.nn.Parameter(rows.clone())
    logp, _ = answer_logprobs(model, collate(seqs, pad, eos), prompt)
    loss = -logp.mean()
    loss.backward()
    torch.testing.assert_close(loss, peft_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompt.grad, emb.weight.grad, atol=1e-6, rtol=1e-4)
    assert prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3_text"])
def test_bos_tokenizer_loss_and_gradient_equal_peft_on_usual_tokens(tmp_path, name):
    """A tokenizer that starts each text with BOS (as Llama's and Gemma's): ptray's encoded sources carry it, and
    its loss and prompt gradient equal PEFT's on ``tokenizer(text + answer)`` + EOS (prompt rows, BOS, text)."""
    from tokenizers.processors import TemplateProcessing

    tok = build_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                              special_tokens=[("<s>", 1)])
    path = _build(tmp_path / name, name, tok)
    model, tok = load_model(str(path))
    task, eos, pad = TASKS["cb"], tok.eos_token_id, tok.pad_token_id
    pairs = [("It rained all day.", "the ground is wet"), ("A dog barks at night.", "a cat"), ("Snow.", "cold")]
    seqs, usual = [], []
    for i, (p, h) in enumerate(pairs):
        ex = Example("cb", "val", i, {"premise": p, "hypothesis": h}, i % 3)
        enc = encode(task, ex, tok, 128)
        seqs.append((enc.source, enc.answers[ex.label]))
        usual.append((tok(task.format(ex.fields) + task.answers[ex.label])["input_ids"], len(enc.source)))
        assert enc.source[0] == 1 and usual[-1][0] == enc.source + enc.answers[ex.label]
    rows = _prompt(model, 4, 7)
    peft_model = _peft(path, 4, token_dim=families.embed_dim(model))
    emb = peft_model.prompt_encoder["default"].embedding
    emb.weight.data.copy_(rows)
    width = max(len(ids) + 1 for ids, _ in usual)
    ids = torch.full((len(usual), width), pad)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (full, src) in enumerate(usual):
        full = full + [eos]
        ids[i, :len(full)], mask[i, :len(full)] = torch.tensor(full), 1
        labels[i, src:len(full)] = torch.tensor(full[src:])
    peft_loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    peft_loss.backward()
    prompt = torch.nn.Parameter(rows.clone())
    logp, _ = answer_logprobs(model, collate(seqs, pad, eos), prompt)
    loss = -logp.mean()
    loss.backward()
    torch.testing.assert_close(loss, peft_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prompt.grad, emb.weight.grad, atol=1e-6, rtol=1e-4)


def test_text_init_equals_peft(fam):
    name, path, model, tok, _ = fam
    n_text = len(token_ids(tok, INIT))
    for n in (n_text, n_text - 3, 2 * n_text + 1):
        peft_rows = _peft(path, n, init=INIT, token_dim=families.embed_dim(model)).prompt_encoder["default"]
        ours = init_prompt(model.get_input_embeddings(), tok, PromptInit.TEXT, INIT, num_tokens=n)
        torch.testing.assert_close(ours, peft_rows.embedding.weight.detach(), atol=0, rtol=0)
    raw = init_prompt(model.get_input_embeddings().weight, tok, PromptInit.TEXT, INIT)
    ours = init_prompt(model.get_input_embeddings(), tok, PromptInit.TEXT, INIT)
    if _scaled_embedding_module(model):  # Gemma2 on transformers 5, Gemma 3: the module scales by sqrt(hidden) = 8
        torch.testing.assert_close(ours, raw * 64 ** 0.5)
    else:
        assert torch.equal(ours, raw)


def _scaled_embedding_module(model) -> bool:
    """The Gemmas' sqrt(hidden) normaliser is inside the embedding module (Gemma2: in transformers 5; in the forward
    in 4.x)."""
    return hasattr(model.get_input_embeddings(), "embed_scale")


def test_saved_prompt_reloads_into_peft(fam, tmp_path):
    from peft import PeftModel

    name, path, model, tok, pad = fam
    rows = _prompt(model, 4, 3)
    save_adapter(rows, tmp_path / "prompt", str(path), INIT)
    peft_model = PeftModel.from_pretrained(_reference_model(path), str(tmp_path / "prompt"))
    peft_model.eval()
    seqs = _seqs(torch.Generator().manual_seed(3), len(tok), 3)
    with torch.no_grad():
        ours, _ = answer_logprobs(model, collate(seqs, pad, tok.eos_token_id), rows)
        theirs = []
        for s, a in seqs:
            ids = torch.tensor([s + a])
            lp = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 4:].float().log_softmax(-1)
            pos = torch.arange(len(s) - 1, len(s) + len(a))
            theirs.append(lp[pos].gather(1, torch.tensor(a + [tok.eos_token_id])[:, None]).squeeze(1))
    torch.testing.assert_close(ours, torch.cat(theirs), atol=3e-5, rtol=1e-5)


def _greedy(model, src, prompt, max_new, eos, pad):
    x = torch.cat([prompt[None], families.embed(model, torch.tensor([src]))], 1)
    out = model.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out[0].tolist()


def test_exact_match_equals_greedy_generate(fam):
    """Examples built from real greedy continuations (right, wrong answer token, wrong at EOS), both paths."""
    name, _, model, tok, pad = fam
    gen = torch.Generator().manual_seed(4)
    prompt = _prompt(model, 3, 4)
    vocab, checked, right = len(tok), 0, 0
    for _ in range(4):
        src = torch.randint(4, vocab, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen).tolist()
        g = _greedy(model, src, prompt, 3, None, pad)
        eos = g[2]
        if eos in g[:2]:
            continue
        examples = [(src, [g[0], g[1]]), (src, [g[0], (g[1] + 1) % vocab or 5]), (src, [g[0]])]
        data = [Encoded(i, s, (a,), 0) for i, (s, a) in enumerate(examples)]
        # None: the path ptray picks; True only where it is exact (Gemma 3: sequences within its window)
        for share in (None, False) + ((True,) if shares_source(model, data, 3) else ()):
            res = evaluate(model, data, prompt, batch_size=2, pad_id=pad, eos_id=eos, share_source=share)
            for (s, a), em in zip(examples, res.em_correct):
                assert em == int(_greedy(model, s, prompt, len(a) + 1, eos, pad)[:len(a) + 1] == a + [eos])
                checked, right = checked + 1, right + em
    assert checked >= 12 and 0 < right < checked


def test_shared_source_equals_one_pass_per_label(fam):
    """Padded sources of several lengths; with Gemma 3, the shared pass only on sequences that fit its window (the
    rule: ``test_gemma3_sliding_window_rule``)."""
    name, _, model, tok, pad = fam
    g = torch.Generator().manual_seed(5)
    windowed = name == "gemma3_text"
    longest = WINDOW - 4 - 3 if windowed else 29  # prompt 4 + source + answer up to 3 within the window
    data = []
    for i in range(9):
        src = torch.randint(4, len(tok), (int(torch.randint(1, longest + 1, (1,), generator=g)),),
                            generator=g).tolist()
        answers = tuple(torch.randint(4, len(tok), (int(torch.randint(1, 4, (1,), generator=g)),),
                                      generator=g).tolist() for _ in range(2 + i % 2))
        data.append(Encoded(i, src, answers, i % 2))
    assert families.shares_source_up_to(model, 64) != windowed
    assert shares_source(model, data, 4)
    for prompt in (_prompt(model, 4, 5), None):
        kw = dict(batch_size=5, pad_id=pad, eos_id=tok.eos_token_id)
        ref = evaluate(model, data, prompt, share_source=False, **kw)
        got = evaluate(model, data, prompt, share_source=True, **kw)
        assert got.loss == pytest.approx(ref.loss, rel=1e-5)
        assert got.em_correct == ref.em_correct and got.rank_pred == ref.rank_pred


def test_effective_prompt_is_what_the_first_attention_reads(fam):
    """Written out by hand per family from the model's own weights (the definitions in ptray/lm/families.py)."""
    name, _, model, _, _ = fam
    w = _prompt(model, 5, 6)
    got = families.effective_prompt(model, w)
    base = getattr(model, "model", None) or model.base_model  # 4.56's Gemma3ForCausalLM: base_model is itself
    if name == "bloom":
        ln = base.word_embeddings_layernorm
        want = torch.nn.functional.layer_norm(w, (64,), ln.weight, ln.bias, ln.eps)
    elif name == "gpt2":
        ln = base.h[0].ln_1
        want = torch.nn.functional.layer_norm(w + base.wpe.weight[:5], (64,), ln.weight, ln.bias, ln.eps)
    elif name == "opt":
        dec = base.decoder
        x = dec.project_in(w) + dec.embed_positions.weight[2:7]  # OPT's learned positions start at offset 2
        ln = dec.layers[0].self_attn_layer_norm
        want = torch.nn.functional.layer_norm(x, (64,), ln.weight, ln.bias, ln.eps)
    else:
        norm = base.layers[0].input_layernorm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        gemma = name in ("gemma2", "gemma3_text")
        scale = (1 + norm.weight) if gemma else norm.weight  # Gemma's RMSNorm multiplies by 1 + weight
        if gemma and not _scaled_embedding_module(model):
            w = w * 64 ** 0.5  # transformers 4.x: the normaliser is applied in the forward, to the prompt rows too
        want = w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + eps) * scale
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)
    assert families.effective_definition(model).startswith("after ")


def test_effective_rows_of_the_vocabulary(fam):
    """Position-free families map any rows (chunked) as their prompt rows; GPT-2/OPT rows depend on position: None."""
    name, _, model, _, _ = fam
    rows = families.embed(model, torch.arange(4, 41)).detach()
    got = families.effective_rows(model, rows, chunk=8)
    if name in ("gpt2", "opt"):
        assert got is None
    else:
        torch.testing.assert_close(got, families.effective_prompt(model, rows), atol=1e-6, rtol=1e-5)
        assert got.shape == (37, 64)


def test_answer_ids_are_tokenized_in_context(fam):
    name, _, _, tok, _ = fam
    task = TASKS["cb"]
    ex = Example("cb", "val", 0, {"premise": "It rained all day.", "hypothesis": "the ground is wet"}, 0)
    enc = encode(task, ex, tok, 256)
    text = task.format(ex.fields)
    for ids, answer in zip(enc.answers, task.answers):
        assert tok(text + answer, add_special_tokens=False)["input_ids"] == enc.source + ids


def test_train_save_and_reload_into_peft(fam, data_dir, tmp_path):
    """As a user would: ``train`` a CB prompt (a few examples, 2 epochs), ``save_run``, reload it into PEFT; the
    trained prompt lowers the loss it was trained on, and PEFT with the saved adapter scores what ptray reported."""
    from peft import PeftModel

    from ptray.config import TrainConfig
    from ptray.training.run_folder import save_run
    from ptray.training.train import train

    name, path, _, tok, _ = fam
    cfg = TrainConfig(task="cb", seed=0, model=str(path), data_dir=str(data_dir), max_epochs=2, batch_size=4,
                      lr=0.05, max_length=96, eval_split="train", max_train_examples=8, max_eval_examples=8,
                      device="cpu", precision="no")  # PEFT's fp32 loss is the reference
    result = train(cfg)
    out = save_run(result, tmp_path / "run")
    assert result.metrics["eval_loss"] < result.metrics["init_text_eval_loss"]
    assert result.resolved["transformers_version"] and result.resolved["torch_version"]

    from ptray.data.batching import encode_all
    from ptray.data.superglue import load_split

    peft_model = PeftModel.from_pretrained(_reference_model(path), str(out / "prompt"))
    peft_model.eval()
    n = result.prompt.shape[0]
    nll = count = 0.0
    data = encode_all(TASKS["cb"], load_split(TASKS["cb"], "train", str(data_dir))[:8], tok, 96)
    with torch.no_grad():
        for d in data:
            a = d.answers[d.label]
            ids = torch.tensor([d.source + a])
            lp = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, n:].float().log_softmax(-1)
            pos = torch.arange(len(d.source) - 1, len(d.source) + len(a))
            nll -= lp[pos].gather(1, torch.tensor(a + [tok.eos_token_id])[:, None]).sum().item()
            count += len(a) + 1
    assert nll / count == pytest.approx(result.metrics["eval_loss"], rel=1e-4)


def test_gemma2_final_logit_softcapping(tmp_path):
    """ptray's answer log-probabilities include Gemma2's soft cap (the model's own logits; PEFT agrees above).
    Without the cap (the bug in issue 10) the same example scores differently."""
    path = _build(tmp_path / "gemma2", "gemma2")
    model, tok = load_model(str(path))
    src, ans = [40, 41, 42, 43, 44], [50]
    batch = collate([(src, ans)], tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        ours, _ = answer_logprobs(model, batch, None)
        raw_logits = model.lm_head(model.model(input_ids=batch.input_ids).last_hidden_state)[0, 4:6].float()
        own = model(input_ids=batch.input_ids).logits[0, 4:6].float()
    cap = model.config.final_logit_softcapping
    assert cap == 2.0
    torch.testing.assert_close(own, torch.tanh(raw_logits / cap) * cap)  # what the model itself does
    want = own.log_softmax(-1)[[0, 1], [50, tok.eos_token_id]]
    uncapped = raw_logits.log_softmax(-1)[[0, 1], [50, tok.eos_token_id]]
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    assert (ours - uncapped).abs().max() > 0.5  # the cap matters here: skipping it is a different number
    assert own.abs().max() <= cap


def test_gemma2_attention_softcap_is_kept(tmp_path, monkeypatch):
    """Gemma 2 soft-caps its attention logits (``attn_logit_softcapping``). A model that loaded another attention
    (transformers < 5 loads it with SDPA, which drops the cap) runs eager after ``load_model``, on every transformers
    version, and scores as the model's definition (Hugging Face's eager attention) does; with another cap it scores
    differently, so the check can fail."""
    import copy

    from transformers import AutoModelForCausalLM

    from ptray.lm.load import keep_attention_softcap

    path = _build(tmp_path / "gemma2", "gemma2")
    model, tok = load_model(str(path))
    assert model.config._attn_implementation == "eager" and model.config.attn_logit_softcapping == 50.0
    def with_sdpa():
        try:
            sdpa = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa")  # what 4.x loads
        except ValueError:  # transformers 5 refuses SDPA for Gemma 2; the same state, as 4.x leaves it
            sdpa = AutoModelForCausalLM.from_pretrained(str(path))
            sdpa.config._attn_implementation = "sdpa"
        return sdpa

    sdpa = with_sdpa()
    assert keep_attention_softcap(sdpa) and sdpa.config._attn_implementation == "eager"
    assert not keep_attention_softcap(sdpa)  # eager already
    import ptray.lm.load as load

    monkeypatch.setattr(load, "use_eager_attention", lambda model: False)  # a model that cannot switch
    with pytest.raises(PtrayError, match="soft-caps its attention logits, which its sdpa attention drops"):
        keep_attention_softcap(with_sdpa())
    monkeypatch.undo()
    low_cap = copy.deepcopy(model)  # a cap this low changes the scores: the cap is on ptray's path
    low_cap.config.attn_logit_softcapping = 0.05
    for layer in low_cap.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.05
    seqs = _seqs(torch.Generator().manual_seed(4), len(tok), 4)
    batch = collate(seqs, tok.pad_token_id, tok.eos_token_id)
    with torch.no_grad():
        ours, _ = answer_logprobs(model, batch, None)
        ref, _ = answer_logprobs(_reference_model(path), batch, None)
        other, _ = answer_logprobs(low_cap, batch, None)
    torch.testing.assert_close(ours, ref, atol=3e-5, rtol=1e-5)
    assert (ours - other).abs().max() > 1e-3
    # asked for fused attention (auto on a GPU), Gemma 2 runs eager, and the record says what ran
    from ptray.lm.attention import attention_implementation
    from ptray.lm.load import setup_model

    fused, _, _ = setup_model(str(path), "cpu", "no", attention="fused")
    assert attention_implementation(fused) == "eager"


def test_gemma3_sliding_window_rule(tmp_path, monkeypatch):
    """Gemma 3 as gemma-3-270m is built (tied head, sqrt(hidden) input scale, a window on its local layers, a RoPE
    base per layer kind). On sources longer than the window ptray scores every label as the model's own forward
    does (one unpadded sequence at a time), and it does not share the source pass there: the window counts the
    padding holes between a short source and its answers, so forced, that pass gives other numbers."""
    path = _build(tmp_path / "gemma3", "gemma3_text")
    model, tok = load_model(str(path))
    cfg = model.config
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"} and cfg.sliding_window == WINDOW
    bases = {kind: cfg.rope_parameters[kind]["rope_theta"] for kind in ("sliding_attention", "full_attention")}
    assert bases == {"sliding_attention": 10.0, "full_attention": 1000.0}
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(families.embed(model, ids), model.get_input_embeddings().weight[ids] * 64 ** 0.5)

    g = torch.Generator().manual_seed(8)

    def rand(lo, hi):
        return torch.randint(4, len(tok), (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    data = [Encoded(i, rand(2, 4 * WINDOW), (rand(1, 3), rand(1, 4), rand(1, 3)), i % 3) for i in range(8)]
    assert sum(len(d.source) > WINDOW for d in data) >= 4 and len({len(d.source) for d in data}) >= 4
    prompt, eos = _prompt(model, 4, 8), tok.eos_token_id
    kw = dict(batch_size=6, pad_id=tok.pad_token_id, eos_id=eos)
    assert not shares_source(model, data, 4)
    with pytest.raises(ValueError, match="share_source=True is not exact"):
        evaluate(model, data, prompt, share_source=True, **kw)
    with torch.no_grad():
        got = evaluate(model, data, prompt, **kw)  # the path ptray picks: one pass per label
        own = [[_own_logprobs(model, [(d.source, a)], prompt, eos) for a in d.answers] for d in data]
    gold = torch.cat([own[i][d.label] for i, d in enumerate(data)])
    assert got.loss == pytest.approx(-gold.mean().item(), rel=1e-5)
    assert got.rank_pred == [max(range(3), key=lambda k: lp[k].sum().item()) for lp in own]

    monkeypatch.setattr(families, "shares_source_up_to", lambda model, length=None: True)
    forced = evaluate(model, data, prompt, share_source=True, **kw)
    assert abs(forced.loss - got.loss) > 1e-3


def _legacy_sentencepiece_tokenizer():
    """A Llama-2-style SentencePiece BPE tokenizer: "▁" prepended to the text, so a word tokenized alone after a
    space gets a bare '▁' piece (Llama-2's legacy behaviour), built with ``tokenizers`` offline."""
    from tokenizers import SentencePieceBPETokenizer, decoders, normalizers
    from transformers import PreTrainedTokenizerFast

    from ptray.lm.tiny_model import _corpus

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(_corpus(), vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                           initial_alphabet=["\n"], show_progress=False)
    tok = sp._tokenizer  # then Llama-2's tokenizer.json pipeline: prepend "▁", spaces to "▁", no pre-tokenizer
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def test_sentencepiece_legacy_answer_ids(tmp_path):
    """Answer " no" alone is ['▁', '▁no']; after the cue the tokenizer produces '▁no' alone. ptray trains and
    scores the in-context ids, so exact match is what greedy decoding produces; a Llama on this tokenizer agrees."""
    tok = _legacy_sentencepiece_tokenizer()
    alone = tok.convert_ids_to_tokens(tok(" no", add_special_tokens=False)["input_ids"])
    assert alone == ["▁", "▁no"]  # the legacy behaviour is really there
    cue = tok.convert_ids_to_tokens(tok("Hypothesis: wet\nAnswer: no", add_special_tokens=False)["input_ids"])
    assert cue[-3:] == ["ns", "wer:", "▁no"]  # in context: issue 10's pieces
    task = TASKS["rte"]
    ex = Example("rte", "val", 0, {"premise": "It rained all day.", "hypothesis": "the ground is wet"}, 1)
    enc = encode(task, ex, tok, 256)
    text = task.format(ex.fields)
    assert [tok.convert_ids_to_tokens(a) for a in enc.answers] == [["▁yes"], ["▁no"]]
    assert tok.convert_ids_to_tokens(enc.source)[-1] != "▁"
    for ids, answer in zip(enc.answers, task.answers):
        assert tok(text + answer, add_special_tokens=False)["input_ids"] == enc.source + ids
        assert tok.decode(enc.source + ids) == text + answer

    # the whole chain on a Llama with this tokenizer: greedy continuation == the in-context ids -> exact match
    model, tok = load_model(str(_build(tmp_path / "llama-sp", "llama", tok)))
    with torch.no_grad():
        g = model.generate(input_ids=torch.tensor([enc.source]), max_new_tokens=2, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=None)[0, len(enc.source):].tolist()
    answer_text = tok.decode(g[:1])  # whatever the model says first, as text, made the gold answer
    ids = answer_ids_in_context(tok, text, [answer_text])[0]
    assert ids == g[:1], (ids, g)  # the text re-tokenizes to the greedy token: exact match holds with EOS = g[1]
    res = evaluate(model, [Encoded(0, enc.source, (ids,), 0)], None, 4, tok.pad_token_id, g[1])
    assert res.em_correct == [1]


@pytest.mark.parametrize("kind", ["mistral", "qwen3"])
def test_untested_family_passes_the_load_time_checks(tmp_path, kind):
    """Mistral (RoPE, like Llama) and Qwen3 (RMSNorm on queries and keys) pass the checks at load time."""
    import transformers as tf

    tok = build_tokenizer()
    ids = dict(vocab_size=len(tok), pad_token_id=3, bos_token_id=1, eos_token_id=2)
    if kind == "mistral":
        cfg = tf.MistralConfig(sliding_window=None, **ids, **SMALL)
    else:
        cfg = tf.Qwen3Config(head_dim=16, **ids, **SMALL)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"))
    fam = families.family(model)
    assert fam.name == kind and not fam.tested and fam.shares_source and fam.positions == "ids"
    assert families.effective_prompt(model, torch.zeros(2, 64)) is None  # undefined: the report says n/a
    assert families.effective_definition(model) is None


def test_untested_family_failing_a_check_is_refused(tmp_path):
    """Cohere scales its logits (logit_scale): ptray's answer log-probabilities would differ, so it is refused."""
    from transformers import AutoModelForCausalLM, CohereConfig

    tok = build_tokenizer()
    cfg = CohereConfig(vocab_size=len(tok), pad_token_id=3, bos_token_id=1, eos_token_id=2, logit_scale=0.25,
                       **SMALL)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(PtrayError, match=r"model type 'cohere' is not supported: ptray's logits at the answer "
                                         r"positions differ from the model's own \(max log-probability difference"):
        load_model(str(tmp_path / "m"))


def test_untested_family_that_cannot_run_is_refused_in_one_line(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(_build(tmp_path / "m", "llama")))
    model.config.model_type = "somelm"

    def no_embeds(*args, **kwargs):
        raise ValueError("inputs_embeds is not supported\nsecond line")

    monkeypatch.setattr(model, "forward", no_embeds)
    with pytest.raises(PtrayError, match=r"^model type 'somelm' is not supported: ptray's checks could not run it "
                                         r"\(ValueError: inputs_embeds is not supported\); supported families: bloom"):
        check_model(model)  # load_model runs this check on every model it loads
