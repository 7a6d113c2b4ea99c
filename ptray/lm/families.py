"""Model families: the one place that knows how a causal LM turns token ids into input vectors, hidden states into
logits, where its positions come from, and what its "effective" prompt is.

ptray computes several things its own way instead of calling ``model(...)``: the LM head only at the answer
positions (``ptray.lm.forward.answer_logprobs``), the TEXT init of a soft prompt, the answer ids, and a shared-source
evaluation that repeats one KV cache over the labels. Each must equal what the model itself does. This module is
the contract; ``tests/test_families.py`` runs every family below through the same equality checks against the
model's own forward, greedy ``generate`` and PEFT.

Per family (``FAMILIES``):

- input vectors: ``embed(model, ids)`` calls the model's input-embedding module, which is also what PEFT prepends
  the prompt to. Gemma2's sqrt(hidden) normaliser lives in that module in transformers 5 (in the model's forward
  in 4.x: then it scales the prompt rows too); Gemma 3's (``gemma3_text``) is in the module in every release.
  Either way the soft prompt lives in the space of ``embed``'s output.
  OPT's embeddings are ``word_embed_proj_dim`` wide and ``project_in`` maps them to the hidden size, so a prompt row
  is as wide as the embedding module, not ``hidden_size``.
- logits: the base model's ``last_hidden_state`` already has the final norm (and OPT's ``project_out``); then the LM
  head, then Gemma2's ``final_logit_softcapping`` (``cap * tanh(logits / cap)``; computed in fp32 here).
- positions, for the shared-source evaluation (prompt + source once, its KV cache repeated per label, answers
  appended after the padded source): BLOOM's ALiBi comes from the attention mask's cumulative sum, so padding
  holes are skipped; GPT-2 (absolute), OPT (learned, offset 2; its default is the mask's cumulative sum too) and
  RoPE models (Llama, Qwen2, Gemma2, Gemma 3: the same positions rotate its local layers with one base and its
  global layers with another) get ``position_ids`` that skip pads, passed explicitly. Sliding-window attention
  counts cache slots, holes included, so a model with a window (Gemma2; Gemma 3 on its ``sliding_attention``
  layers, 5 of every 6) shares the source only when the whole padded sequence fits in it; the per-label path has
  no holes (right padding) and is exact at any length.
- effective prompt (what the analysis calls "effective"): the prompt rows as the first attention reads them, i.e.
  the output of the first normalisation the rows go through, computed by the model itself (a forward hook), so
  every input transform before it is included:
  BLOOM: ``word_embeddings_layernorm``; Llama, Qwen2, Gemma2, Gemma 3: the first block's ``input_layernorm``
  (RMSNorm, weight included; after the Gemmas' normaliser); GPT-2: the first block's ``ln_1`` of token + position
  embedding, and OPT (pre-norm configs): the first block's ``self_attn_layer_norm`` after ``project_in`` + learned
  positions. For GPT-2 and OPT the rows depend on their positions 0..n-1, which a prepended prompt always occupies:
  that is what the model sees, and dropping the positions would describe rows the model never reads. OPT post-norm
  configs (``do_layer_norm_before=False``, e.g. opt-350m) and families outside the tested set: None (report "n/a").
  ``effective_rows`` maps other rows (the vocabulary) the same way where that is position-free (not GPT-2/OPT).

A model of another ``model_type`` is checked once, at load time, with the same equality checks on a few random
inputs (``ptray.lm.check.check_model``, called by ``load_model``): it is refused with a one-line ``PtrayError``
naming the failed check, or accepted with the shared source pass only if that check passed too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ptray.errors import PtrayError


@dataclass(frozen=True)
class Family:
    """What ptray knows about one model family.

    ``positions``: where positions come from ("mask": from the attention mask, as BLOOM's ALiBi; "ids": from
    ``position_ids``, which ptray passes explicitly when a cache is reused).
    ``effective_norm``: attribute path, from the base model, of the module whose output is the effective prompt;
    None where undefined. ``shares_source``: whether the shared-source evaluation is exact (before the sliding
    window rule). ``tested``: one of the families tests/test_families.py checks (else checked at load time).
    """

    name: str
    positions: str
    effective_norm: str | None
    shares_source: bool = True
    tested: bool = True


FAMILIES: dict[str, Family] = {
    "bloom": Family("bloom", "mask", "word_embeddings_layernorm"),
    "gpt2": Family("gpt2", "ids", "h.0.ln_1"),
    "opt": Family("opt", "ids", "decoder.layers.0.self_attn_layer_norm"),
    "llama": Family("llama", "ids", "layers.0.input_layernorm"),
    "qwen2": Family("qwen2", "ids", "layers.0.input_layernorm"),
    "gemma2": Family("gemma2", "ids", "layers.0.input_layernorm"),
    "gemma3_text": Family("gemma3_text", "ids", "layers.0.input_layernorm"),
}

CHECKED = "_ptray_family"  # the Family ptray.lm.check found for an untested model, kept on the model object


def family(model) -> Family:
    """The ``Family`` of ``model`` (a ``*ForCausalLM``): a tested one, or what ``ptray.lm.check.check_model`` found.

    Raises PtrayError for an untested ``model_type`` that was not checked (``load_model`` checks every model it
    loads; a model built another way goes through ``check_model`` first).
    """
    known = FAMILIES.get(getattr(model.config, "model_type", None))
    if known is not None:
        return known
    cached = model.__dict__.get(CHECKED)
    if cached is None:
        raise PtrayError(
            f"model type {getattr(model.config, 'model_type', None)!r} is outside the tested families "
            f"({', '.join(FAMILIES)}) and has not been checked; load it with ptray.lm.load.load_model, or call "
            f"ptray.lm.check.check_model(model) first"
        )
    return cached


def embed(model, ids: torch.Tensor) -> torch.Tensor:
    """Input vectors [..., embed_dim] of token ``ids`` [...]: the model's input-embedding module, scale included.

    This is the space the soft prompt lives in (PEFT prepends its prompt to the same vectors).
    """
    module = model.get_input_embeddings()
    return module(ids.to(module.weight.device))


def embed_dim(model) -> int:
    """Width of a prompt row: the input-embedding width (OPT's ``word_embed_proj_dim``, else ``hidden_size``)."""
    return model.get_input_embeddings().weight.shape[1]


def logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., vocab] from the base model's last hidden states [..., hidden], as the model computes them:
    the LM head, then final logit soft-capping where the config has it (Gemma2)."""
    out = model.get_output_embeddings()(hidden).float()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        out = torch.tanh(out / cap) * cap
    return out


def _accepts_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(base_model(model).forward).parameters


def position_ids(model, attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor | None:
    """``position_ids`` [B, T] that skip padding (None where positions come from the mask, as BLOOM's ALiBi).

    ``attention_mask`` [B, past + T] covers the cached positions too; a pad repeats a neighbour's position (it is
    never attended to and its output never read).
    """
    if family(model).positions == "mask" and not _accepts_position_ids(model):
        return None
    pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return pos[:, past:]


def _cache_keyword(model) -> str:
    # transformers 4.x and 5.17 name the KV cache `past_key_values`; 5.24 names it `cache` (the old name deprecated,
    # to be removed in 5.40): use the name the installed release declares
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a base-model output, under either release's name (``cache`` or ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def base_model(model):
    """The model without its LM head: ``model.base_model``, or ``model.model`` where the class's
    ``base_model_prefix`` names no attribute (transformers 4.56's ``Gemma3ForCausalLM``: ``base_model`` is then the
    model itself, whose forward returns logits, not ``last_hidden_state``)."""
    base = model.base_model
    if base is model and isinstance(getattr(model, "model", None), torch.nn.Module):
        base = model.model
    return base


def base_forward(model, embeds: torch.Tensor, attention_mask: torch.Tensor, cache=None,
                 position_ids: torch.Tensor | None = None, use_cache: bool = False):
    """The base model (no LM head) on ``embeds`` [B, T, embed_dim] after ``cache`` (a KV cache, or None); returns
    its output: ``last_hidden_state`` [B, T, hidden_out] and, with ``use_cache``, the cache (``output_cache``).
    Only public keyword arguments are used, under the names the installed transformers declares."""
    kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask, "use_cache": use_cache}
    if cache is not None:
        kwargs[_cache_keyword(model)] = cache
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return base_model(model)(**kwargs)


def shares_source_up_to(model, length: int | None = None) -> bool:
    """Whether the shared-source evaluation is exact on ``model`` for padded sequences of ``length`` tokens
    (prompt + source + answer; None: any length). Sliding-window attention counts padded cache slots, so a model
    with a window shares only sequences that fit in it."""
    if not family(model).shares_source:
        return False
    config = model.config
    window = getattr(config, "sliding_window", None)
    # Gemma 3 names each layer's attention; a window no layer uses changes nothing
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return True
    if window and getattr(config, "use_sliding_window", True) is not False:
        return length is not None and length <= window
    return True


class _Captured(Exception):
    pass


def effective_prompt(model, weight: torch.Tensor) -> torch.Tensor | None:
    """The prompt rows [n, hidden] (fp32, CPU) as the model's first attention reads them, or None where the family
    defines no effective prompt (report "n/a"). See the module docstring for each family's definition.

    ``weight`` [n, embed_dim] is the soft prompt, in ``embed``'s space. The rows go through the model's own forward
    (positions 0..n-1, as when prepended) up to that normalisation, whose output a forward hook captures.
    """
    fam = family(model)
    path = fam.effective_norm
    if path is None or (fam.name == "opt" and not getattr(model.config, "do_layer_norm_before", True)):
        return None
    module = base_model(model).get_submodule(path)
    captured = {}

    def hook(_module, _args, out):
        captured["rows"] = out[0] if isinstance(out, tuple) else out
        raise _Captured

    param = model.get_input_embeddings().weight
    x = weight.detach().to(param.device, param.dtype).unsqueeze(0)
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=param.device)
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            base_forward(model, x, mask)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "rows" not in captured:
        return None
    return captured["rows"][0].float().cpu()


_EFFECTIVE_DEFINITIONS = {
    "bloom": "after BLOOM's word_embeddings_layernorm",
    "gpt2": "after the first block's ln_1, position embeddings (0..n-1) added",
    "opt": "after project_in, learned positions (0..n-1) and the first block's self_attn_layer_norm",
    "llama": "after the first block's input RMSNorm (weight included)",
    "qwen2": "after the first block's input RMSNorm (weight included)",
    "gemma2": "after the sqrt(hidden) normaliser and the first block's input RMSNorm (weight included)",
    "gemma3_text": "after the sqrt(hidden) normaliser and the first block's input RMSNorm (weight included)",
}


def effective_definition(model) -> str | None:
    """One line saying what ``effective_prompt`` computes for ``model``'s family, or None where it is undefined
    (the report then says n/a)."""
    fam = family(model)
    if fam.effective_norm is None or (fam.name == "opt" and not getattr(model.config, "do_layer_norm_before", True)):
        return None
    return _EFFECTIVE_DEFINITIONS.get(fam.name)


def effective_rows(model, rows: torch.Tensor, chunk: int = 256) -> torch.Tensor | None:
    """Any embedding rows [N, embed_dim] (e.g. the whole vocabulary, for nearest tokens in the effective space)
    mapped as ``effective_prompt`` maps prompt rows, in chunks of ``chunk`` rows; fp32 on the CPU, [N, hidden].

    None where the effective prompt is undefined, and for GPT-2 and OPT, whose effective rows depend on the
    position (a vocabulary row has none).
    """
    if family(model).name in ("gpt2", "opt"):
        return None
    parts = []
    for start in range(0, rows.shape[0], chunk):
        part = effective_prompt(model, rows[start:start + chunk])
        if part is None:
            return None
        parts.append(part)
    return torch.cat(parts)
