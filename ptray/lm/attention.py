"""Fused attention for BLOOM: ALiBi as an additive bias to ``scaled_dot_product_attention``, with backward.

Hugging Face's BLOOM attention (transformers 5) is eager: ``baddbmm`` of the ALiBi bias with Q K^T, the mask added,
an fp32 softmax, then ``bmm`` with V; it materialises the [batch, heads, q, kv] scores and probabilities several
times and refuses ``set_attn_implementation`` ("does not follow the functional approach based on
AttentionInterface"). ``use_fused_attention(model)`` swaps each ``BloomAttention.forward`` for one that computes the
same thing with one ``torch.nn.functional.scaled_dot_product_attention`` call whose float ``attn_mask`` is
ALiBi (slope x key position, positions from the attention mask's cumsum, exactly as Hugging Face builds them) plus
the causal/padding mask Hugging Face already built. On CUDA that runs the memory-efficient (or cuDNN) kernel,
which takes an additive bias and has a backward pass; on CPU it is PyTorch's reference SDPA.

Everything around the attention core is Hugging Face's: the QKV projection, the KV cache update (``Cache``
objects, so ``generate`` and ptray's shared-source evaluation work unchanged), the output projection and dropout.
``output_attentions=True`` (SDPA returns no probabilities), a ``head_mask`` (transformers 4.x) and
``pretraining_tp > 1`` with ``slow_but_exact`` fall back to the original forward for that call.
``tests/test_attention.py`` checks logits, the soft prompt's gradient and generation against the eager model.

With the fused attention, BLOOM's MLP activation ``BloomGelu`` (the tanh GELU written out: ~9 elementwise kernels
forward, ~16 backward) is swapped for ``torch.nn.GELU(approximate="tanh")``, the same function in one fused kernel
each way (``use_fused_gelu``; its constant sqrt(2/pi) is BloomGelu's 0.79788456 to 1e-10, far below fp32 rounding);
``tests/test_gpu_path.py`` checks its values and gradient against ``BloomGelu``.

What the layers of one pass share is built once per pass (``_PerPass``): the [batch, heads, q, kv] bias, or for
the folded path the extra Q and K columns. ptray's own passes, whose rows are right-padded by construction, say so
(``right_padded_rows``), so the folded path needs no device sync to find out.

Other families: GPT-2, OPT, Llama and Qwen2 load with ``attn_implementation="sdpa"`` by default in transformers 5
(tested); Gemma2 loads eager (its attention-logit soft-capping). ``use_fused_attention`` leaves them as they are
(returns 0).
"""

from __future__ import annotations

import contextlib
import contextvars
import types
import weakref

import torch
import torch.nn.functional as F

_ALIGN = 16  # elements: the row alignment PyTorch's memory-efficient attention asks of an attn_mask
_ORIGINAL = "_ptray_eager_forward"  # marks a patched module; holds nothing (the class keeps the original)


def _fused_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    """``BloomAttention.forward`` (the signature of transformers 4.56 to 5.24) with the core as one SDPA call.

    alibi: [batch * heads, 1, kv] (slope x key position); attention_mask: None, or Hugging Face's 4D mask
    [batch, 1, q, kv] (additive float, or bool where True keeps a key). Returns ``(output, None)``.
    """
    if (output_attentions or kwargs.get("head_mask") is not None
            or (self.pretraining_tp > 1 and self.slow_but_exact)):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                  use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [batch, heads, len, head_dim] each
    if layer_past is not None:
        if kwargs.get("cache_position") is not None:  # transformers 4.x passes it on to static caches
            key, value = layer_past.update(key, value, self.layer_idx, {"cache_position": kwargs["cache_position"]})
        else:
            key, value = layer_past.update(key, value, self.layer_idx)
    kv_length = key.shape[2]
    per_pass = self._ptray_per_pass
    dropout = self.attention_dropout.p if self.training else 0.0
    if (per_pass.fold_alibi and q_length == kv_length
            and (_RIGHT_PADDED.get()
                 or per_pass.get(alibi, attention_mask, "right_padded", lambda: _right_padded(attention_mask)))):
        extra = per_pass.get(alibi, attention_mask, "folded", lambda: _folded_columns(
            alibi, batch_size, self.num_heads, q_length, self.head_dim, self.inv_norm_factor, query.dtype))
        context = _folded_alibi_attention(query, key, value, alibi, self.inv_norm_factor, dropout, extra)
    else:
        bias = per_pass.get(alibi, attention_mask, "bias", lambda: _bias(
            alibi, attention_mask, batch_size, self.num_heads, q_length, kv_length, query.dtype))
        # Hugging Face: softmax(alibi * beta + inv_norm_factor * Q K^T + mask); beta is 1.0 in every BLOOM.
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                 scale=self.inv_norm_factor)  # [batch, heads, q, head_dim]
    context = context.transpose(1, 2).reshape(batch_size, q_length, self.num_heads * self.head_dim)
    from transformers.models.bloom.modeling_bloom import dropout_add

    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def _bias(alibi, attention_mask, batch_size, num_heads, q_length, kv_length, dtype) -> torch.Tensor:
    """ALiBi + causal/padding mask as one additive bias [batch, heads, q, kv] (or broadcastable to it)."""
    bias = alibi.view(batch_size, num_heads, 1, -1)[..., :kv_length].to(dtype)
    if attention_mask is None:
        if q_length > 1:  # no mask given: causal only, the last q queries of a kv-long sequence
            causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=alibi.device).tril(kv_length - q_length)
            bias = bias.masked_fill(~causal, torch.finfo(dtype).min)
    elif attention_mask.dtype == torch.bool:
        bias = bias.masked_fill(~attention_mask[..., :kv_length], torch.finfo(dtype).min)
    else:
        bias = bias + attention_mask[..., :kv_length].to(dtype)
    # The memory-efficient CUDA kernel wants the bias's row strides to be multiples of 16 and otherwise copies it
    # into a padded buffer on every call (every layer): allocate that padding once and pass a view.
    bias = F.pad(bias, (0, -kv_length % _ALIGN))[..., :kv_length]
    return bias.expand(batch_size, num_heads, q_length, kv_length)


def _right_padded(attention_mask) -> bool:
    """Whether every row's real tokens come first (right padding, or none), from Hugging Face's causal 4D mask:
    its last query row allows exactly the real keys. One device sync, once per pass."""
    if attention_mask is None:
        return True
    last = attention_mask[:, 0, -1, :]
    real = last if last.dtype == torch.bool else last == 0
    return bool((real[:, 1:] <= real[:, :-1]).all())


def _folded_alibi_attention(query, key, value, alibi, scale: float, dropout: float, extra=None) -> torch.Tensor:
    """Causal attention with ALiBi for right-padded rows and no cache, with no [batch, heads, q, kv] bias at all.

    ALiBi adds slope x key position to every score of a key, whatever the query: that is one more dot-product
    term. So each query gets two extra dimensions of 1 and each key the value slope x position / scale, split in a
    high and a low part (exact to ~2^-16 in bf16, where one part would round it); SDPA's scale x (Q K^T) then
    holds the bias, and the only mask left is the causal one (``is_causal``), which flash kernels take. Padding
    keys come after every real token, so no real query sees them; padded queries compute values nobody reads.
    Head dims are zero-padded to a multiple of 8, as flash kernels want. ``extra``: the columns appended to Q and
    K (``_folded_columns``, the same for every layer of a pass); None builds them here.
    """
    batch, heads, length, dim = query.shape
    if extra is None:
        extra = _folded_columns(alibi, batch, heads, length, dim, scale, query.dtype)
    q_extra, k_extra = extra
    q = torch.cat([query, q_extra], dim=-1)
    k = torch.cat([key, k_extra], dim=-1)
    v = F.pad(value, (0, q_extra.shape[-1]))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scale)
    return out[..., :dim]


def _folded_columns(alibi, batch: int, heads: int, length: int, dim: int, scale: float,
                    dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns ``_folded_alibi_attention`` appends to Q and K [batch, heads, length, 2 + pad] each: (1, 1, 0...)
    for every query; (hi, lo, 0...) for every key, hi + lo = slope x key position / ``scale``; zero padding makes
    the head dim a multiple of 8."""
    x = alibi.view(batch, heads, -1, 1)[:, :, :length].float() / scale
    hi = x.to(dtype)
    lo = (x - hi.float()).to(dtype)
    pad = -(dim + 2) % 8
    q_extra = F.pad(hi.new_ones(batch, heads, length, 2), (0, pad))
    k_extra = F.pad(torch.cat([hi, lo], dim=-1), (0, pad))
    return q_extra, k_extra


_RIGHT_PADDED = contextvars.ContextVar("ptray_right_padded_rows", default=False)


@contextlib.contextmanager
def right_padded_rows():
    """Within the block, the caller promises that every forward pass has right-padded rows (real tokens first, as
    ``ptray.lm.prompt.prepend`` and ``ptray.data.batching.collate`` build them): the folded path then skips its
    check of the mask, a device sync per pass. Passes with cached keys are never folded, whatever the promise."""
    token = _RIGHT_PADDED.set(True)
    try:
        yield
    finally:
        _RIGHT_PADDED.reset(token)


class _PerPass:
    """What the layers of one forward pass share, computed by the first layer and reused by the others: every
    layer gets the same ``alibi`` and mask tensors, so the [batch, heads, q, kv] bias is built (and, for backward,
    kept) once per pass instead of once per layer. The keys are weak references: a later pass has new tensors."""

    def __init__(self, fold_alibi: bool):
        self.fold_alibi = fold_alibi
        self._keys: tuple = (None, None)
        self._values: dict = {}

    def get(self, alibi: torch.Tensor, mask: torch.Tensor | None, name: str, build):
        ref_alibi, ref_mask = self._keys
        same_mask = (ref_mask is None and mask is None) or (ref_mask is not None and ref_mask() is mask)
        if ref_alibi is None or ref_alibi() is not alibi or not same_mask:
            self._values = {}
            self._keys = (weakref.ref(alibi), weakref.ref(mask) if mask is not None else None)
        if name not in self._values:
            self._values[name] = build()
        return self._values[name]


def _bloom_attentions(model) -> list[torch.nn.Module]:
    from transformers.models.bloom.modeling_bloom import BloomAttention

    return [m for m in model.modules() if isinstance(m, BloomAttention)]


def use_fused_attention(model, enabled: bool = True, fold_alibi: bool = False) -> int:
    """Run ``model``'s BLOOM attention through ``scaled_dot_product_attention`` (``enabled=False``: back to eager).

    ``fold_alibi``: passes with right-padded rows and no cached keys (training, the source pass of evaluation)
    carry ALiBi inside Q and K and use only the causal mask (``_folded_alibi_attention``: flash kernels become
    eligible, no [batch, heads, q, kv] bias); other passes use the bias. Off by default until a GPU run shows it
    pays (``benchmarks/gpu.py`` measures both).

    BLOOM's MLP GELU goes with it (``use_fused_gelu``: the same function in one kernel).

    Works on a ``BloomForCausalLM``/``BloomModel`` or anything holding one (a PEFT model). Returns the number of
    attention modules now patched (enabled) or restored (disabled); 0 for models that are not BLOOM (their
    Hugging Face code picks SDPA itself). Idempotent. Raises nothing on non-BLOOM models.
    """
    modules = _bloom_attentions(model)
    use_fused_gelu(model, enabled)
    per_pass = _PerPass(fold_alibi)  # one per model: its layers see the same alibi and mask
    for module in modules:
        if enabled:
            module.forward = types.MethodType(_fused_forward, module)
            module._ptray_per_pass = per_pass
            setattr(module, _ORIGINAL, True)
        elif getattr(module, _ORIGINAL, False):
            del module.forward  # the instance attribute goes; the class's eager forward is found again
            del module._ptray_per_pass
            delattr(module, _ORIGINAL)
    return len(modules)


def fused_attention_enabled(model) -> bool:
    """Whether every BLOOM attention module of ``model`` runs the fused path (False if it has none)."""
    modules = _bloom_attentions(model)
    return bool(modules) and all(getattr(m, _ORIGINAL, False) for m in modules)


def attention_implementation(model) -> str:
    """What computes ``model``'s attention now, for the run's record: ``"ptray-fused"`` (BLOOM through
    ``use_fused_attention``), else Hugging Face's own choice, ``config._attn_implementation`` (``"eager"``,
    ``"sdpa"``, ...; a Gemma 2 that asked for fused attention runs eager for its soft cap, and says so here), or
    ``"unknown"`` where the config names none."""
    if fused_attention_enabled(model):
        return "ptray-fused"
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "unknown")


_GELU = "_ptray_fused_gelu"  # marks an MLP whose BloomGelu was swapped


def use_fused_gelu(model, enabled: bool = True) -> int:
    """Swap each BLOOM MLP's ``BloomGelu`` for ``torch.nn.GELU(approximate="tanh")`` (``enabled=False``: back).

    Both compute 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) with its exact derivative; the fused one in one
    kernel each way instead of BloomGelu's chain of elementwise ones (in bf16 it rounds once instead of after every
    step). ``use_fused_attention`` calls it. Returns the number of MLPs now swapped (enabled) or restored
    (disabled); 0 for models that are not BLOOM. Idempotent. Raises nothing.
    """
    from transformers.models.bloom.modeling_bloom import BloomGelu, BloomMLP

    mlps = [m for m in model.modules() if isinstance(m, BloomMLP)]
    for mlp in mlps:
        if enabled:
            mlp.gelu_impl = torch.nn.GELU(approximate="tanh")
            setattr(mlp, _GELU, True)
        elif getattr(mlp, _GELU, False):
            mlp.gelu_impl = BloomGelu()  # stateless: a new one is the original
            delattr(mlp, _GELU)
    return len(mlps)
