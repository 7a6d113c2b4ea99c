"""The reference a user writes for prompt tuning: ``get_peft_model(PromptTuningConfig(TEXT init))`` +
``transformers.Trainer``, timed the way ``variants.ptray_train`` is (``StepResult``)."""

from __future__ import annotations

import tempfile
import time

import torch

from benchmarks.measure import PeakMemory, Shape, StepResult, sync
from ptray.data.batching import Encoded


def peft_model(model, tokenizer_dir: str, init_text: str, num_tokens: int):
    """What a user writes: PEFT prompt tuning with TEXT init on the same base model."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, prompt_tuning_init=PromptTuningInit.TEXT,
                                prompt_tuning_init_text=init_text, tokenizer_name_or_path=tokenizer_dir,
                                num_virtual_tokens=num_tokens)
    return get_peft_model(model, config)


def lm_records(data: list[Encoded], eos_id: int, shape: Shape | None = None, n_prompt: int = 0) -> list[dict]:
    """The usual causal-LM records: input = source + answer + EOS, labels -100 on the source.

    With ``shape``, each record also carries its real text tokens and model FLOPs (for the benchmark's accounting;
    the collator removes them)."""
    out = []
    for d in data:
        ans = d.answers[d.label] + [eos_id]
        ids = d.source + ans
        rec = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(d.source) + ans}
        if shape is not None:
            text = len(d.source) + len(ans) - 1
            rec.update(text_tokens=text, model_flops=shape.train_flops(text + n_prompt, len(ans)))
        out.append(rec)
    return out


def reference_train(model, tokenizer, tokenizer_dir: str, init_text: str, num_tokens: int, data: list[Encoded], *,
                    device: str, precision: str, batch_size: int, warmup: int, steps: int, seed: int = 0,
                    lr: float = 3e-2, shape: Shape | None = None, memory: bool | None = None,
                    expect_init: torch.Tensor | None = None) -> StepResult:
    """PEFT prompt tuning + ``transformers.Trainer`` (defaults: AdamW, linear schedule, grad clipping 1.0, random
    sampler), with ``DataCollatorForSeq2Seq`` (right padding, labels padded with -100).

    A callback times the steps after ``warmup`` (device synchronised); a wrapper around the collator records each
    batch's real tokens, so Trainer start-up is not timed and token counts match ptray's.
    """
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    shape = shape or Shape.of(model)
    pm = peft_model(model, tokenizer_dir, init_text, num_tokens)
    if expect_init is not None:  # equal settings: PEFT's TEXT init must start where ptray's does
        start = pm.prompt_encoder["default"].embedding.weight.detach().float().cpu()
        if not torch.equal(start, expect_init.float().cpu()):
            raise AssertionError("PEFT's TEXT-initialised prompt differs from ptray's init_prompt")
    base_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    seen: list[tuple[int, int, float]] = []  # per batch: real text tokens, sequences, model FLOPs

    def collator(features):
        seen.append((sum(f["text_tokens"] for f in features), len(features), sum(f["model_flops"] for f in features)))
        return base_collator([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features])

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, warmup + steps):
                sync(device)
                self.marks[state.global_step] = time.perf_counter()

    timer = Timer()
    with tempfile.TemporaryDirectory() as out_dir:
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=batch_size, learning_rate=lr, max_steps=warmup + steps,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=seed,
            use_cpu=device == "cpu", bf16=precision == "bf16", dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        records = lm_records(data, tokenizer.eos_token_id, shape, num_tokens)
        # a list of dicts is a map-style dataset (no `datasets` needed: torch, transformers, accelerate, peft only)
        trainer = Trainer(model=pm, args=args, train_dataset=records, data_collator=collator, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        with PeakMemory(device, memory) as mem:
            trainer.train()
        model.eval()  # Trainer left the shared base model in train mode
    window = seen[warmup:warmup + steps]
    result = StepResult(timer.marks[warmup + steps] - timer.marks[warmup], sum(w[0] for w in window),
                        sum(w[1] for w in window), sum(w[2] for w in window), mem.peak, steps)
    return result
