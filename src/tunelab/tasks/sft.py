"""``task: sft``: supervised fine-tuning on chats and instructions; the loss on the assistant's tokens."""

from __future__ import annotations

from tunelab.data.batching import rows_packed, rows_unpacked
from tunelab.data.cache import encode_records_cached
from tunelab.data.preference import pair_kind
from tunelab.data.workbench import prepare_records
from tunelab.errors import UserError
from tunelab.tasks.common import refuse_empty, reject_counts, report
from tunelab.tasks.lm import CausalLMTask
from tunelab.tasks.protocol import PreparedData


class SFT(CausalLMTask):
    name = "sft"

    def rows(self, cfg, tokenizer, run, console, is_main: bool) -> PreparedData:
        d = cfg.data
        prep = prepare_records(cfg, run, console, is_main)  # read + data.prepare steps (clean, split, mix, weights)
        refuse_preference_data(prep, cfg.task)
        rejects = prep.rejects
        encode = dict(train_on=d.train_on, max_length=d.max_length, truncation=d.truncation, use_cache=d.cache)
        train_enc, tok_rejects, hit = encode_records_cached(prep.train, tokenizer, **encode)
        eval_enc, eval_tok_rejects, _ = encode_records_cached(prep.eval, tokenizer, **encode)
        rejects += tok_rejects + eval_tok_rejects
        refuse_empty(train_enc, rejects, run, is_main, "sample")
        groups = prep.groups(train_enc)
        if d.packing:
            train_rows, eval_rows = rows_packed(train_enc, d.max_length, groups), rows_packed(eval_enc, d.max_length)
        else:
            train_rows, eval_rows = rows_unpacked(train_enc, groups), rows_unpacked(eval_enc)
        summary = {
            "files": prep.files, "eval_files": prep.eval_files,
            "train_samples": len(train_enc), "eval_samples": len(eval_enc),
            "train_rows": len(train_rows), "eval_rows": len(eval_rows),
            "train_tokens": sum(len(e.input_ids) for e in train_enc),
            "train_target_tokens": sum(r.n_targets for r in train_rows),
            "truncated": sum(1 for e in train_enc + eval_enc if e.truncated),
            "tokenized_from_cache": hit, **reject_counts(rejects),
            **({"prepare": prep.report} if prep.report else {}),
        }
        report(summary, rejects, run, console, is_main,
               f"data: {summary['train_samples']} train / {summary['eval_samples']} eval samples, "
               f"{summary['train_tokens']:,} train tokens in {summary['train_rows']} rows"
               + (" (tokenised data from the cache)" if hit else ""))
        strata = prep.strata(train_enc) if d.sampler != "random" else None
        return PreparedData(train_rows, eval_rows, summary, prep.datasets, strata)


def refuse_preference_data(prep, task: str) -> None:
    """Preference pairs or KTO samples given to a task that trains on one reply: a one-line error."""
    for which, records, files in (("data.train", prep.train, prep.files), ("data.eval", prep.eval, prep.eval_files)):
        kind = pair_kind(records)
        if kind is not None:
            what = "preference pairs (chosen / rejected)" if kind == "pairs" else "KTO samples (messages + label)"
            raise UserError(f"{which}: {', '.join(f['path'] for f in files)} holds {what}, but task is {task}. Set "
                            f"task: preference (preference.loss: {'dpo' if kind == 'pairs' else 'kto'}) or task: reward, "
                            "or give chats with one reply")
