"""The fused BLOOM attention (ptray/lm/attention.py) against Hugging Face's eager BLOOM on random inputs, fp32."""

from __future__ import annotations

import pytest
import torch

from ptray.data.batching import collate, encode_all
from ptray.data.superglue import load_split
from ptray.data.tasks import get_task
from ptray.lm.attention import fused_attention_enabled, use_fused_attention
from ptray.lm.evaluate import evaluate
from ptray.lm.forward import answer_logprobs
from ptray.lm.prompt import prepend


def _bloom(n_head: int, seed: int = 0):
    """A random BLOOM; 6 heads exercises ALiBi's slopes for a head count that is not a power of two."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=300, hidden_size=8 * n_head, n_layer=3, n_head=n_head, pad_token_id=3,
                         eos_token_id=2, bos_token_id=1, initializer_range=0.3)
    return BloomForCausalLM(config).eval().requires_grad_(False)


def _padded_batch(seed: int, lengths=(11, 7, 3, 9)):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(4, 300, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids.masked_fill(mask == 0, 3), mask


def _logits_and_grad(model, ids, mask, prompt):
    """Full logits [B, n + T, V] with ``prompt`` prepended, and d(loss)/d(prompt) for a loss over every kept logit."""
    prompt = prompt.clone().requires_grad_(True)
    embeds, full_mask = prepend(prompt, model.get_input_embeddings()(ids), mask)
    logits = model(inputs_embeds=embeds, attention_mask=full_mask).logits
    weights = torch.linspace(-1, 1, logits.shape[-1])  # any loss that reads every logit of real positions
    loss = (logits[full_mask.bool()] * weights).sum() + logits[full_mask.bool()].logsumexp(-1).sum()
    (grad,) = torch.autograd.grad(loss, prompt)
    return logits.detach(), full_mask.bool(), grad


@pytest.mark.parametrize("fold_alibi", [False, True])
@pytest.mark.parametrize("n_head", [4, 6])
def test_logits_and_prompt_gradient_match_eager(n_head, fold_alibi):
    model = _bloom(n_head)
    ids, mask = _padded_batch(1)
    prompt = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    ref_logits, keep, ref_grad = _logits_and_grad(model, ids, mask, prompt)
    assert use_fused_attention(model, fold_alibi=fold_alibi) == 3 and fused_attention_enabled(model)
    logits, _, grad = _logits_and_grad(model, ids, mask, prompt)
    assert ref_grad.abs().max() > 1e-3  # a gradient that is really there
    torch.testing.assert_close(logits[keep], ref_logits[keep], rtol=1e-5, atol=1e-5)
    # fp32 rounding differs between the fused and eager orders of operations: within 1e-5 of the gradient's scale
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
    # and without a prompt or padding (Hugging Face then builds ALiBi without a mask)
    full = torch.randint(4, 300, (2, 6))
    fused = model(input_ids=full).logits
    use_fused_attention(model, enabled=False)
    torch.testing.assert_close(fused, model(input_ids=full).logits, rtol=1e-5, atol=1e-5)


def test_disable_restores_eager_exactly():
    model = _bloom(4)
    ids, mask = _padded_batch(3)
    before = model(input_ids=ids, attention_mask=mask).logits
    use_fused_attention(model)
    use_fused_attention(model)  # idempotent
    assert use_fused_attention(model, enabled=False) == 3
    assert not fused_attention_enabled(model)
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_output_attentions_falls_back_to_eager():
    model = _bloom(4)
    ids, mask = _padded_batch(4)
    ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    use_fused_attention(model)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == ref.attentions[0].shape
    torch.testing.assert_close(out.attentions[0], ref.attentions[0])
    torch.testing.assert_close(out.logits, ref.logits)


@pytest.mark.parametrize("fold_alibi", [False, True])
def test_greedy_generate_with_kv_cache_matches_eager(fold_alibi):
    """Left-padded ``generate`` from embeddings runs the KV cache path (one query against cached keys)."""
    model = _bloom(6)
    lengths = (8, 5, 2)
    ids = torch.randint(4, 300, (3, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, 8 - n:] = 1  # generation pads on the left
    ids = ids.masked_fill(mask == 0, 3)
    kwargs = dict(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, max_new_tokens=6,
                  do_sample=False, pad_token_id=3, eos_token_id=None)
    ref = model.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
    use_fused_attention(model, fold_alibi=fold_alibi)  # left padding: never folded
    out = model.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref.scores), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold_alibi", [False, True])
def test_evaluate_and_answer_logprobs_match_eager(tiny, data_dir, fold_alibi):
    """ptray's own paths: training's answer log-probs, and evaluation's shared-source pass (KV cache repeated
    per label) with a prompt, on real CB examples."""
    model, tok = tiny
    task = get_task("cb")
    data = encode_all(task, load_split(task, "val", str(data_dir))[:12], tok, 128)
    batch = collate([(d.source, d.answers[d.label]) for d in data[:6]], tok.pad_token_id, tok.eos_token_id)
    prompt = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    try:
        ref_lp = answer_logprobs(model, batch, prompt)[0]
        ref = evaluate(model, data, prompt, 8, tok.pad_token_id, tok.eos_token_id)
        use_fused_attention(model, fold_alibi=fold_alibi)  # folded: the source pass; the answers' pass: bias
        lp = answer_logprobs(model, batch, prompt)[0]
        res = evaluate(model, data, prompt, 8, tok.pad_token_id, tok.eos_token_id)
    finally:
        use_fused_attention(model, enabled=False)  # the session fixture is shared with other tests
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    assert res.rank_pred == ref.rank_pred and res.em_correct == ref.em_correct
    assert res.loss == pytest.approx(ref.loss, rel=1e-5)


def test_bool_mask_equals_float_mask():
    """Hugging Face gives a float mask to BLOOM today; a bool one (True keeps a key) must mean the same."""
    model = _bloom(4)
    attn = model.transformer.h[0].self_attention
    use_fused_attention(model)
    hidden = torch.randn(2, 5, 32)
    alibi = model.transformer.build_alibi_tensor(torch.ones(2, 5, dtype=torch.long), 4, torch.float32)
    keep = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    keep[1, :, :, 3:] = False
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    a = attn(hidden, hidden, alibi, keep)[0]
    b = attn(hidden, hidden, alibi, additive)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "qwen2"])
def test_non_bloom_models_are_left_alone_and_use_sdpa(family):
    import transformers as T

    config = {
        "gpt2": lambda: T.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=100, bos_token_id=1, eos_token_id=2),
        "opt": lambda: T.OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                                   vocab_size=100, word_embed_proj_dim=32),
        "llama": lambda: T.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=100),
        "qwen2": lambda: T.Qwen2Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=100),
    }[family]()
    model = T.AutoModelForCausalLM.from_config(config)
    assert model.config._attn_implementation == "sdpa"  # transformers' default where the family supports it
    assert use_fused_attention(model) == 0 and not fused_attention_enabled(model)


def test_bias_is_built_once_per_forward(monkeypatch):
    """Every layer gets the same ALiBi and mask tensors: the [batch, heads, q, kv] bias is built by the first layer
    only, and built anew for the next pass (whose padding differs)."""
    import ptray.lm.attention as attention

    built = []
    real = attention._bias
    monkeypatch.setattr(attention, "_bias", lambda *a: built.append(real(*a)) or built[-1])
    model = _bloom(4)
    use_fused_attention(model)
    ids, mask = _padded_batch(6)
    model(input_ids=ids, attention_mask=mask)
    assert len(built) == 1
    # rows aligned to 16 elements (11 keys here), so CUDA's memory-efficient kernel takes the bias without a copy
    assert built[0].shape == (4, 4, 11, 11) and all(st % 16 == 0 for st in built[0].stride()[:-1])
    other = mask.clone()
    other[0, 5:] = 0
    fused = model(input_ids=ids, attention_mask=other).logits
    assert len(built) == 2
    use_fused_attention(model, enabled=False)
    keep = other.bool()
    torch.testing.assert_close(fused[keep], model(input_ids=ids, attention_mask=other).logits[keep],
                               rtol=1e-5, atol=1e-5)


def test_folded_alibi_is_used_for_right_padding_only(monkeypatch):
    """Right-padded passes without a cache never build the bias; left-padded ones (generation) do."""
    import ptray.lm.attention as attention

    built, folded = [], []
    real_bias, real_fold = attention._bias, attention._folded_alibi_attention
    monkeypatch.setattr(attention, "_bias", lambda *a: built.append(1) or real_bias(*a))
    monkeypatch.setattr(attention, "_folded_alibi_attention", lambda *a: folded.append(1) or real_fold(*a))
    model = _bloom(4)
    use_fused_attention(model, fold_alibi=True)
    ids, mask = _padded_batch(8)
    model(input_ids=ids, attention_mask=mask)
    assert (len(built), len(folded)) == (0, 3)
    model(input_ids=ids, attention_mask=mask.flip(1))  # left padding
    assert (len(built), len(folded)) == (1, 3)
