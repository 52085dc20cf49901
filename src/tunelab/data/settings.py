"""Settings of the data workbench steps, as strict pydantic models.

The same models serve the CLI verbs (``tunelab data clean ...`` flags fill them) and the
training config's ``data.prepare`` section (unknown keys are errors there as everywhere).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunelab.cli_args import POSITIONAL, field_of


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NormalizeSettings(_Strict):
    """Text normalisation applied to every prose field of a row."""

    unicode: Literal["NFKC", "NFC", "none"] = Field("NFKC", description="Unicode normal form (NFKC folds full-width forms).")
    whitespace: bool = Field(True, description="Trailing spaces per line removed, 3+ newlines to 2, ends stripped (indentation kept).")
    control: bool = Field(True, description="Remove control characters (except newline and tab) and zero-width spaces.")
    html: bool = Field(True, description="Unescape HTML entities and remove HTML tags (a known tag list: code with < > is safe).")


class LengthSettings(_Strict):
    """Drop rows outside a length range, in characters and/or tokens."""

    field: Literal["full", "prompt", "answer"] = Field("full", description="Which text is measured.")
    min_chars: int | None = Field(None, ge=0, description="Drop rows with fewer characters.")
    max_chars: int | None = Field(None, ge=1, description="Drop rows with more characters.")
    min_tokens: int | None = Field(None, ge=0, description="Drop rows with fewer tokens (needs a tokenizer).")
    max_tokens: int | None = Field(None, ge=1, description="Drop rows with more tokens (needs a tokenizer).")
    tokenizer: str | None = Field(None, description="Model whose tokenizer counts tokens (in a training config: model.path).")


class DedupSettings(_Strict):
    """Exact and near-duplicate removal (the first row of each group is kept)."""

    exact: bool = Field(True, description="Remove exact duplicates of the normalised text.")
    near: bool = Field(True, description="Remove near duplicates (MinHash LSH on character shingles).")
    threshold: float = Field(0.85, gt=0, le=1, description="Estimated Jaccard similarity at or above which rows are near duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: finer estimates, slower).")
    shingle: int = Field(5, ge=1, le=32, description="Characters per shingle.")
    key: Literal["full", "prompt"] = Field("full", description="Compare the whole row, or only its input (prompt).")


class ConflictSettings(_Strict):
    """The same (or near-same) input with different labels or answers."""

    policy: Literal["flag", "drop", "majority"] = Field(
        "flag", description="flag: keep and report; drop: remove every row of the group; majority: keep the most "
        "common answer (a tie removes the group).")
    near: bool = Field(True, description="Near-same inputs count as the same input (MinHash LSH).")
    threshold: float = Field(0.9, gt=0, le=1, description="Similarity of inputs counted as the same.")


class PiiSettings(_Strict):
    """Mask personal data with placeholders ([EMAIL], [PHONE], [ID_NUMBER])."""

    email: bool = True
    phone: bool = Field(True, description="Chinese mobile and landline numbers, +country numbers, (NNN) NNN-NNNN.")
    id_number: bool = Field(True, description="Chinese resident ID numbers (checksum-validated) and US SSNs.")


class CleanSettings(_Strict):
    """Which cleaning steps run (null disables a step). Order: normalise, PII, length, conflicts, exact, near."""

    normalize: NormalizeSettings | None = Field(default_factory=NormalizeSettings)
    pii: PiiSettings | None = None
    length: LengthSettings | None = None
    conflicts: ConflictSettings | None = Field(default_factory=ConflictSettings)
    dedup: DedupSettings | None = Field(default_factory=DedupSettings)


class SplitSettings(_Strict):
    """Train / validation / test split."""

    ratios: tuple[float, ...] = Field((0.7, 0.15, 0.15), description="Shares of train, validation[, test]; they must sum to 1.")
    stratify: bool = Field(True, description="Keep each label's share the same in every split (labelled rows).")
    group: Literal["near", "exact", "none"] = Field(
        "near", description="Keep duplicate clusters in one split: near (MinHash LSH), exact, or none.")
    threshold: float = Field(0.8, gt=0, le=1, description="Similarity that puts rows in one group (group: near).")
    seed: int = Field(0, description="Seed of the shuffle that assigns rows to splits.")

    @field_validator("ratios")
    @classmethod
    def _sum_to_one(cls, ratios: tuple[float, ...]) -> tuple[float, ...]:
        if not 2 <= len(ratios) <= 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
            raise ValueError(f"ratios must be 2 or 3 non-negative shares (each >= 0) summing to 1 "
                             f"(got {list(ratios)})")
        return ratios


class WeightSettings(_Strict):
    """Class-balanced sample weights, multiplied into each row's own weight."""

    scheme: Literal["inverse", "effective"] = Field(
        "inverse", description="inverse: N / (classes x count); effective: 1 / effective number of samples (Cui et al. 2019).")
    beta: float = Field(0.999, ge=0, lt=1, description="beta of the effective number (1 - beta^n) / (1 - beta).")
    by: Literal["label", "dataset"] = Field("label", description="Balance labels, or the datasets of data.train.")


class AugmentSettings(_Strict):
    """Augmented copies of training rows (never of validation or test rows)."""

    ops: list[Literal["synonym", "insert", "swap", "delete", "reorder", "paraphrase", "backtranslate"]] = Field(
        default_factory=lambda: ["swap", "delete"], description="Operations; each makes `copies` new rows per source row.")
    copies: int = Field(1, ge=1, le=16, description="Augmented rows per operation and source row.")
    alpha: float = Field(0.1, gt=0, le=0.5, description="Share of words changed by an EDA operation.")
    field: Literal["prompt", "answer", "both"] = Field("prompt", description="Which text is changed.")
    synonyms: str | None = Field(None, description="Synonym file: JSON {word: [synonyms]} or lines 'word syn1 syn2'. "
                                 "Without it, WordNet (English) when its data is installed.")
    model: str | None = Field(None, description="Causal LM for paraphrase / backtranslate (e.g. smollm2-135m-instruct).")
    pivot: str = Field("French", description="Pivot language of back-translation.")
    max_new_tokens: int = Field(128, ge=1, description="Longest model reply (paraphrase / backtranslate).")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Model sampling temperature; 0 is greedy (every "
                               "copy alike). Sampling is seeded per call from `seed`, so runs repeat.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling share when temperature > 0.")
    seed: int = Field(0, description="Seed of the operations' random choices and of model sampling.")
    limit: int | None = Field(None, ge=1, description="Augment at most this many source rows.")


class MixSettings(_Strict):
    """How several training files are mixed (each `data.train` entry may carry `name` and `ratio`)."""

    strategy: Literal["concat", "ratio", "temperature"] = Field(
        "concat", description="concat: all rows once; ratio: shares from each entry's `ratio`; temperature: "
        "shares proportional to size^(1/temperature).")
    temperature: float = Field(2.0, gt=0, description="Temperature T of the temperature strategy (1 = by size).")
    size: int | None = Field(None, ge=1, description="Rows of the mixed set (default: all rows of all files).")
    seed: int = 0


class PrepareSection(_Strict):
    """Data-workbench steps run before tokenisation (cached by a fingerprint; report in the run)."""

    clean: CleanSettings | None = Field(None, description="Clean / deduplicate / resolve conflicts in the training data.")
    split: SplitSettings | None = Field(
        None, description="Split the training data: its 2nd share becomes the validation data (data.eval), a 3rd "
        "share a held-out test file written into the run directory.")
    augment: AugmentSettings | None = Field(None, description="Augment the training rows (after the split).")
    weights: WeightSettings | None = Field(None, description="Class-balanced sample weights for the loss.")


# ----------------------------------------------------------------------------- the `tunelab data` verbs' options
# Each verb's flags (tunelab.cli_args builds them from these models). Step settings are reused
# field by field, so a flag has the same type, range and description as the config key.

def _format():
    return Field("auto", description="Row format (auto detects it).")


def _force(what: str):
    return Field(False, description=f"Replace {what}.")


class InspectOptions(_Strict):
    """``tunelab data inspect``."""

    target: str = Field(description="A data file, or a training config (.yaml): its files, model and max_length.",
                        json_schema_extra=POSITIONAL)
    model: str | None = Field(None, description="Tokenizer for token lengths (an alias or model folder).")
    max_length: int | None = Field(None, ge=1, description="Report the share of rows over this many tokens.")
    html: str | None = Field(None, description="Write an HTML page with histograms here.")
    json_out: str | None = Field(None, description="Write the statistics as JSON here.",
                                 json_schema_extra={"cli": {"flag": "--json"}})
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")
    threshold: float = field_of(DedupSettings, "threshold")
    force: bool = _force("an existing --html / --json file")


class CleanOptions(_Strict):
    """``tunelab data clean``: one flag per step setting; :meth:`settings` builds the steps."""

    input: str = Field(description="The data file to clean.", json_schema_extra=POSITIONAL)
    out: str = Field(description="Output file (its extension picks the format); never the input; must not exist "
                     "unless --force.")
    removed: str | None = Field(None, description="Removed-rows file (default <out>.removed.jsonl); must not exist "
                                "unless --force.")
    force: bool = _force("an existing --out / removed-rows file")
    format: str = _format()
    normalize: bool = Field(True, description="NFKC / whitespace / control / HTML cleanup.")
    pii: bool = Field(False, description="Mask e-mails, phone and ID numbers.")
    min_chars: int | None = field_of(LengthSettings, "min_chars")
    max_chars: int | None = field_of(LengthSettings, "max_chars")
    min_tokens: int | None = field_of(LengthSettings, "min_tokens")
    max_tokens: int | None = field_of(LengthSettings, "max_tokens")
    tokenizer: str | None = field_of(LengthSettings, "tokenizer", description="Model whose tokenizer counts tokens "
                                     "for --min-tokens / --max-tokens.")
    length_field: Literal["full", "prompt", "answer"] = field_of(LengthSettings, "field")
    conflicts: Literal["flag", "drop", "majority", "off"] = Field(
        "flag", description="Same input, different answers: flag (keep, report), drop (every row of the group), "
        "majority (keep the most common answer), off.")
    exact: bool = field_of(DedupSettings, "exact")
    near: bool = field_of(DedupSettings, "near")
    threshold: float = field_of(DedupSettings, "threshold")
    key: Literal["full", "prompt"] = field_of(DedupSettings, "key")

    def settings(self) -> CleanSettings:
        lengths = (self.min_chars, self.max_chars, self.min_tokens, self.max_tokens)
        return CleanSettings(
            normalize=NormalizeSettings() if self.normalize else None,
            pii=PiiSettings() if self.pii else None,
            length=None if all(v is None for v in lengths) else LengthSettings(
                field=self.length_field, min_chars=self.min_chars, max_chars=self.max_chars,
                min_tokens=self.min_tokens, max_tokens=self.max_tokens, tokenizer=self.tokenizer),
            conflicts=None if self.conflicts == "off" else ConflictSettings(policy=self.conflicts),
            dedup=None if not (self.exact or self.near) else DedupSettings(
                exact=self.exact, near=self.near, threshold=self.threshold, key=self.key),
        )


class SplitOptions(SplitSettings):
    """``tunelab data split``: the split settings, plus the files."""

    input: str = Field(description="The data file to split.", json_schema_extra=POSITIONAL)
    out_dir: str = Field(description="Folder for train/val[/test] (or fold_i/...) files; it must not hold split "
                         "files already, unless --force.")
    force: bool = _force("the split files already in --out-dir")
    kfold: int | None = Field(None, ge=2, description="Write K folds instead (fold_i/train, fold_i/val).")
    format: str = _format()

    def settings(self) -> SplitSettings:
        return SplitSettings(**self.model_dump(include=set(SplitSettings.model_fields)))


class LeakageOptions(_Strict):
    """``tunelab data leakage``."""

    files: list[str] = Field(description="TRAIN, then the files checked against it (TEST ...).",
                             json_schema_extra={"cli": {"positional": True, "nargs": "+"}})
    threshold: float = Field(0.8, gt=0, le=1, description="Near-duplicate Jaccard threshold.")
    fail: bool = Field(False, description="Exit 1 when anything leaks (for CI).")


class AgreementOptions(_Strict):
    """``tunelab data agreement``."""

    input: str = Field(description="Rows with several annotations each.", json_schema_extra=POSITIONAL)
    column: str = Field("labels", description="List column holding the annotations.")
    annotators: list[str] | None = Field(None, description="One column per annotator instead.",
                                         json_schema_extra={"cli": {"nargs": "+"}})
    out: str | None = Field(None, description="Write rows with the majority label (label_tie flags ties); must "
                            "not exist unless --force.")
    force: bool = _force("an existing --out file")
    show: int = Field(20, ge=0, description="Disagreements to print.")


class AugmentOptions(AugmentSettings):
    """``tunelab data augment``: the augment settings, plus the files."""

    ops: list[Literal["synonym", "insert", "swap", "delete", "reorder", "paraphrase", "backtranslate"]] = field_of(
        AugmentSettings, "ops", json_schema_extra={"cli": {"nargs": "+"}})
    input: str = Field(description="The data file to augment.", json_schema_extra=POSITIONAL)
    out: str = Field(description="Output file (originals, then augmented rows); must not exist unless --force.")
    force: bool = _force("an existing --out file")
    format: str = _format()

    def settings(self) -> AugmentSettings:
        return AugmentSettings(**self.model_dump(include=set(AugmentSettings.model_fields)))


class WeightsOptions(_Strict):
    """``tunelab data weights``."""

    input: str = Field(description="Labelled rows.", json_schema_extra=POSITIONAL)
    out: str = Field(description="Output file (the rows with a weight column); must not exist unless --force.")
    force: bool = _force("an existing --out file")
    scheme: Literal["inverse", "effective"] = field_of(WeightSettings, "scheme")
    beta: float = field_of(WeightSettings, "beta")
    format: str = _format()
