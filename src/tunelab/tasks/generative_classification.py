"""``task: generative_classification``: the label is the assistant's answer; evaluation parses it."""

from __future__ import annotations

from tunelab.data.tasks import generative_task_rows
from tunelab.data.workbench import prepare_records
from tunelab.objectives.causal_lm import CausalLMLoss
from tunelab.objectives.classification import GenerativeEval
from tunelab.tasks.lm import CausalLMTask, lm_with_method
from tunelab.tasks.pretrain import task_data
from tunelab.tasks.protocol import PreparedData


class GenerativeClassification(CausalLMTask):
    name = "generative_classification"
    labelled = True
    builds_without_data = False  # its evaluation needs the eval prompts; the model is the sft one

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        prep = prepare_records(cfg, run, console, is_main)
        rows = generative_task_rows(cfg.data, cfg.classification, tokenizer, prep.train, prep.eval,
                                    seed_rejects=prep.rejects)
        return task_data(cfg, rows, prep, run, console, is_main)

    def model_and_loss(self, cfg, data, dtype, tokenizer):
        model = lm_with_method(cfg, dtype)
        gen = GenerativeEval(model, tokenizer, data.task.eval_prompts, data.task.labels,
                             max_new_tokens=cfg.classification.max_new_tokens, batch_size=cfg.train.batch_size * 4)
        return model, CausalLMLoss(model), lambda accelerator: gen.run(accelerator)[0]
