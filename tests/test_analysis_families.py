"""analysis/ on tiny random models of other families: gated-MLP FFN neurons (Llama), Gemma2's embedding scale in
the analysis's init and nearest-token prompts, and the effective vocabulary from the family's rule."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis import faithfulness, inputs, predictors
from analysis.records import PromptRun, Study
from ptray.lm import families
from ptray.lm.tiny_model import build_tokenizer

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)


def _model(name: str, vocab: int = 300):
    """A tiny random model of one family (configs as in tests/test_families.py), fp32, eval mode."""
    import transformers as tf

    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    configs = {
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2, pad_token_id=3,
                                        **ids),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **ids),
        "opt": lambda: tf.OPTConfig(hidden_size=64, word_embed_proj_dim=32, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, init_std=0.2, pad_token_id=3,
                                    **ids),
        "llama": lambda: tf.LlamaConfig(pad_token_id=3, **SMALL, **ids),
        "qwen2": lambda: tf.Qwen2Config(pad_token_id=3, **SMALL, **ids),
        "gemma2": lambda: tf.Gemma2Config(pad_token_id=3, head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
                                          final_logit_softcapping=2.0, **SMALL, **ids),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[name]()).float().eval()


def _prompt(model, n: int, seed: int) -> torch.Tensor:
    """Random prompt rows at the scale of the model's input vectors."""
    scale = families.embed(model, torch.arange(4, 50)).float().std().item()
    return torch.randn(n, families.embed_dim(model), generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------------- FFN neurons
def test_llama_ffn_neurons_are_the_gated_product_that_enters_down_proj():
    model = _model("llama")
    prompt = _prompt(model, 5, 0)
    got = predictors.ffn_activations(model, [prompt])
    width = model.config.intermediate_size
    assert got.shape == (1, model.config.num_hidden_layers * width)
    # reference: each layer's MLP input, captured separately, through the gated MLP written out by hand
    seen = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for layer in model.model.layers]
    try:
        with torch.no_grad():
            model.model(inputs_embeds=prompt[None], attention_mask=torch.ones(1, 5, dtype=torch.long))
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(model.model.layers):
        mlp, x = layer.mlp, seen[i]  # [1, 5, hidden]: the whole sequence, as the model computes it
        with torch.no_grad():
            expected = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))[0, -1]
        np.testing.assert_array_equal(got[0, i * width:(i + 1) * width], expected.double().numpy())
    states = predictors.activation_states(model, [prompt])
    np.testing.assert_array_equal(states, (got > 0).astype(float))
    assert 0 < states.mean() < 1


@pytest.mark.parametrize("name,width", [("bloom", 4 * 64), ("gpt2", 4 * 64), ("opt", 128), ("llama", 128),
                                        ("qwen2", 128), ("gemma2", 128)])
def test_every_family_has_its_ffn_overlap(name, width):
    model = _model(name)
    prompts = [_prompt(model, 4, 1), _prompt(model, 3, 2), _prompt(model, 6, 3)]
    modules, side = predictors.ffn_neuron_modules(model)
    assert len(modules) == 2 and side == ("input" if name in ("llama", "qwen2", "gemma2") else "output")
    states = predictors.activation_states(model, prompts)
    assert states.shape == (3, 2 * width) and set(np.unique(states)) <= {0.0, 1.0}
    overlap = predictors.activation_overlap(states)
    assert np.allclose(np.diag(overlap), 1.0) and (overlap[~np.eye(3, dtype=bool)] < 1).all()


def test_a_model_without_recognisable_ffn_neurons_is_a_clear_error():
    class NoFFN(torch.nn.Module):  # an untested family whose layers are named nothing ptray knows
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)
            self.config = SimpleNamespace(model_type="nothing")
            self.base_model = self

    model = NoFFN()
    with pytest.raises(ValueError, match="no feed-forward neurons found in NoFFN"):
        predictors.ffn_neuron_modules(model)


# ----------------------------------------------------------------------------------------------- embedding scale
def _one_prompt_study(model, task: str = "cb") -> Study:
    from ptray.data.tasks import TASKS

    init_text = TASKS[task].init_text
    return Study("e", "s", [PromptRun("r0", task, 0, _prompt(model, 6, 0),
                                      {"init": "text", "init_text": init_text, "model": "tiny-gemma2"})])


def test_gemma2_init_and_nearest_token_prompts_are_input_vectors_with_the_embedding_scale():
    model = _model("gemma2", vocab=len(build_tokenizer()))
    tokenizer = build_tokenizer()
    study = _one_prompt_study(model)
    prepared = inputs.prepare(study, model, tokenizer)
    from analysis.nearest import init_token_ids

    ids = torch.tensor(init_token_ids(study.prompts[0], tokenizer))
    with torch.no_grad():
        expected = families.embed(model, ids).float()
        raw = model.get_input_embeddings().weight[ids].float()
    scale = model.config.hidden_size ** 0.5
    assert raw.norm() * scale == pytest.approx(float(expected.norm()), rel=1e-5)  # the scale exists: 8 here
    init = prepared.init["cb"]
    assert float(init.norm() / expected.norm()) == pytest.approx(1.0, abs=1e-6)  # raw rows would give 0.125
    torch.testing.assert_close(init, expected)
    hard = faithfulness.discretise(model, ids)
    assert float(hard.norm() / expected.norm()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(hard, expected)
    # every token's input vector, the vectors the nearest-token search compares with
    torch.testing.assert_close(prepared.embedding[ids], expected)
    # the init prompt's effective rows are the model's own first-norm output of those input vectors
    torch.testing.assert_close(prepared.init_effective["cb"], families.effective_prompt(model, expected))


def test_the_effective_vocabulary_is_the_familys_rule():
    for name in ("bloom", "llama", "gemma2"):
        model = _model(name)
        transform = inputs.vocabulary_transform(model)
        rows = families.embed(model, torch.arange(10, 30)).detach().float()
        torch.testing.assert_close(transform(rows), families.effective_rows(model, rows))
    for name in ("gpt2", "opt"):  # effective rows depend on their positions: no effective vocabulary
        assert inputs.vocabulary_transform(_model(name)) is None
