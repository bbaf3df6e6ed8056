"""Score stage: DataComp-style filters on score columns the input already ships (no Spark in here).

    score = ScoreParams(min_score=(("clip_b32_similarity_score", 0.28),),
                        top_fraction=(("clip_l14_similarity_score", 0.3),))
    rules = resolve_rules(score, thresholds)        # thresholds: the pool's quantiles, computed by the job
    decided = decide_part(chunk, rules)             # {row in part: ledger fields} for the rows it decides

The cheapest stage, and the first: it reads only the score columns (CommonPool metadata ships
clip_b32_similarity_score and clip_l14_similarity_score), before any caption is parsed or image
fetched. A row passes when every rule holds: value >= threshold. `--min-score COLUMN=THRESHOLD` gives
a fixed threshold; `--score-top-fraction COLUMN=F` keeps DataComp's "top F": the threshold is the
(1-F) quantile of the column over all input rows, computed once per run in one pass on the cluster
(jobs/cat_filter.py: Spark's approxQuantile, relative rank error QUANTILE_RELATIVE_ERROR; exact below
1/QUANTILE_RELATIVE_ERROR rows) and recorded in manifest.json and stats.json.

Rules are checked in order (the --min-score ones as given, then the --score-top-fraction ones), and
the first that fails decides: a null or NaN value fails the row (`score_missing`), a value below the
threshold drops it (`score_below_threshold`); the ledger row holds the column, the value and the
threshold (score_column, score, score_threshold).

`--stages` (parse_stages) names the stages to run, in pipeline order: `auto`, `all`, `caption`, or a
comma list such as `score`, `score,caption`, `score,caption,download,textspot` or `score,download,textspot`
(no caption rules: rows that pass the score stage go on unparsed). Download comes with textspot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from pipeline.store import storage
from pipeline.store.partitions import Chunk, InputError, read_chunk_salvaging

QUANTILE_RELATIVE_ERROR = 1e-4   # approxQuantile's rank error: 0.01% of the rows (exact below 10,000 rows)
QUANTILE_METHOD = "spark approxQuantile (Greenwald-Khanna), one pass over all input rows; null/NaN ignored"
PIPELINE = (S.STAGE_SCORE, S.STAGE_CAPTION, S.STAGE_DOWNLOAD, S.STAGE_TEXTSPOT)


@dataclass(frozen=True)
class ScoreParams:
    min_score: tuple[tuple[str, float], ...] = ()      # (column, threshold)
    top_fraction: tuple[tuple[str, float], ...] = ()   # (column, fraction kept)

    def __post_init__(self):
        object.__setattr__(self, "min_score", tuple((str(c), float(t)) for c, t in self.min_score))
        object.__setattr__(self, "top_fraction", tuple((str(c), float(f)) for c, f in self.top_fraction))
        for c, f in self.top_fraction:
            if not 0 < f <= 1:
                raise ValueError(f"--score-top-fraction {c}={f}: the fraction kept must be in (0, 1]")
        for c, t in self.min_score:
            if math.isnan(t):
                raise ValueError(f"--min-score {c}: the threshold is NaN")

    @property
    def enabled(self) -> bool:
        return bool(self.min_score or self.top_fraction)

    def columns(self) -> list[str]:
        return list(dict.fromkeys(c for c, _ in self.min_score + self.top_fraction))

    def to_dict(self) -> dict:
        return {"min_score": [list(x) for x in self.min_score], "top_fraction": [list(x) for x in self.top_fraction]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ScoreParams":
        d = d or {}
        return cls(tuple(tuple(x) for x in d.get("min_score", [])), tuple(tuple(x) for x in d.get("top_fraction", [])))


def parse_assignment(text: str, option: str) -> tuple[str, float]:
    """'COLUMN=VALUE' -> (column, value); ValueError naming the option otherwise."""
    column, sep, value = text.rpartition("=")
    try:
        if not sep or not column:
            raise ValueError
        return column, float(value)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected COLUMN=NUMBER, e.g. clip_l14_similarity_score=0.3") from None


# ---------------------------------------------------------------- which stages run
@dataclass(frozen=True)
class StagePlan:
    score: bool       # the score stage runs
    caption: bool     # the caption rules run (else rows that pass the score stage are kept there)
    images: str       # "auto": the image stages where the input allows; "all": required; "none"


def caption_rules_run(stages: str) -> bool:
    """Whether the caption rules run under --stages `stages` (without them rows pass on unparsed)."""
    return stages in ("auto", "all") or S.STAGE_CAPTION in [s.strip() for s in stages.split(",")]


def parse_stages(stages: str, score: ScoreParams) -> StagePlan:
    """--stages -> StagePlan. auto / all run the score stage when score filters are given."""
    if stages in ("auto", "all"):
        return StagePlan(score.enabled, True, stages)
    names = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in names if s not in PIPELINE]
    if unknown or not names:
        raise InputError(f"--stages {stages!r}: use auto, all, or a comma list of {', '.join(PIPELINE)} in that order")
    if names != sorted(names, key=PIPELINE.index) or len(set(names)) != len(names):
        raise InputError(f"--stages {stages!r}: stages must be listed once each, in pipeline order "
                         f"({', '.join(PIPELINE)})")
    if S.STAGE_SCORE in names and not score.enabled:
        raise InputError(f"--stages {stages!r} names the score stage but no --min-score / --score-top-fraction is given")
    if score.enabled and S.STAGE_SCORE not in names:
        raise InputError(f"--min-score / --score-top-fraction given but --stages {stages!r} leaves out the score stage")
    image_stages = [s for s in names if s in (S.STAGE_DOWNLOAD, S.STAGE_TEXTSPOT)]
    if S.STAGE_DOWNLOAD in names and S.STAGE_TEXTSPOT not in names:
        raise InputError(f"--stages {stages!r}: download without textspot is not supported (images are fetched "
                         f"to be text-spotted)")
    images = "none" if not image_stages else "all"
    return StagePlan(S.STAGE_SCORE in names, S.STAGE_CAPTION in names, images)


# ---------------------------------------------------------------- rules and decisions
@dataclass(frozen=True)
class Rule:
    column: str
    threshold: float                  # value >= threshold passes (inf when the column holds no value at all)
    fraction: float | None = None     # set for a --score-top-fraction rule

    def to_dict(self) -> dict:
        return {"column": self.column, "threshold": None if math.isinf(self.threshold) else self.threshold,
                "fraction": self.fraction}

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        return cls(d["column"], math.inf if d["threshold"] is None else d["threshold"], d.get("fraction"))


def quantile_requests(score: ScoreParams) -> list[tuple[str, float]]:
    """(column, probability) pairs whose quantiles the job computes: 1 - F for each top fraction."""
    return [(c, 1.0 - f) for c, f in score.top_fraction]


def resolve_rules(score: ScoreParams, quantiles: list[float | None]) -> list[Rule]:
    """The rules in checking order; `quantiles` aligned with quantile_requests (None: no values)."""
    rules = [Rule(c, t) for c, t in score.min_score]
    for (c, f), q in zip(score.top_fraction, quantiles):
        rules.append(Rule(c, math.inf if q is None else float(q), f))
    return rules


def thresholds_record(rules: list[Rule]) -> dict:
    """What manifest.json and stats.json say about the score stage."""
    return {"rules": [r.to_dict() for r in rules], "keep": "value >= threshold for every rule; null/NaN fails",
            "quantile": {"method": QUANTILE_METHOD, "relative_error": QUANTILE_RELATIVE_ERROR}}


def check_columns(plan, score: ScoreParams) -> None:
    """Every input file has every score column, numeric (from the footers; InputError names the file)."""
    for path in plan.columns:
        schema = storage.parquet_file(path).schema_arrow
        for c in score.columns():
            if c not in schema.names:
                raise InputError(f"score column {c!r} not found in {path} (score filters read Parquet input's own "
                                 f"columns); columns found: {schema.names}")
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
                raise InputError(f"score column {c!r} in {path} is {t}, not a number")


def score_values(table: pa.Table, column: str) -> np.ndarray:
    """A score column as float64 with NaN for null."""
    arr = pc.cast(table.column(column), pa.float64())
    return arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False) if arr.null_count == 0 else \
        np.array([np.nan if v is None else v for v in arr.to_pylist()], dtype=np.float64)


def read_scores(chunk: Chunk, rules: list[Rule]) -> pa.Table:
    """The part's score columns (rows of unreadable row groups come back null; the caption stage
    fails those rows as input_read_error before the score stage looks at them)."""
    columns = list(dict.fromkeys(r.column for r in rules))
    table, _ = read_chunk_salvaging(chunk, columns)
    return table


def decide(table: pa.Table, rules: list[Rule]) -> dict[int, dict]:
    """{row: ledger fields} for the rows the rules fail (first failing rule decides); others pass."""
    out: dict[int, dict] = {}
    values = {c: score_values(table, c) for c in dict.fromkeys(r.column for r in rules)}
    for rule in rules:
        v = values[rule.column]
        missing = np.isnan(v)
        below = ~missing & (v < rule.threshold)
        for i in np.flatnonzero(missing | below):
            i = int(i)
            if i in out:
                continue
            threshold = None if math.isinf(rule.threshold) else rule.threshold
            if missing[i]:
                out[i] = {"status": S.FAILED, "reason": S.R_SCORE_MISSING, "score_column": rule.column,
                          "score": None, "score_threshold": threshold,
                          "error_message": f"{rule.column} is null or NaN"}
            else:
                out[i] = {"status": S.DROPPED, "reason": S.R_SCORE_BELOW, "score_column": rule.column,
                          "score": float(v[i]), "score_threshold": threshold}
    return out


def decide_part(chunk: Chunk, rules: list[Rule]) -> dict[int, dict]:
    return decide(read_scores(chunk, rules), rules) if rules else {}


# ---------------------------------------------------------------- what a re-decision may change
def check_redecidable(old: ScoreParams, new: ScoreParams, old_rules: list[Rule], new_rules: list[Rule],
                      caption_ran: bool) -> list[str]:
    """Problems (empty: none) with re-deciding a source scored by `old` with `new`: rows a source
    dropped here were never parsed or fetched, so every old rule must stay, at least as strict,
    unless the source ran the score stage alone (nothing came after it)."""
    if not caption_ran:
        return []
    problems = []
    new_fixed = dict(new.min_score)
    for c, t in old.min_score:
        if c not in new_fixed or new_fixed[c] < t:
            problems.append(f"min_score {c}: {new_fixed.get(c)} < {t}: rows below {t} were dropped by the score "
                            f"stage, never parsed or fetched")
    new_top = {r.column: r for r in new_rules if r.fraction is not None}
    for r in old_rules:
        if r.fraction is None:
            continue
        n = new_top.get(r.column)
        if n is None or n.fraction > r.fraction:
            problems.append(f"score_top_fraction {r.column}: {n.fraction if n else 'none'} keeps more than "
                            f"{r.fraction}: rows below its threshold were never parsed or fetched")
        elif n.threshold < r.threshold:   # a slightly smaller fraction whose approximate quantile came out lower
            problems.append(f"score_top_fraction {r.column}={n.fraction}: threshold {n.threshold} < {r.threshold} "
                            f"of {r.fraction}: rows below {r.threshold} were never parsed or fetched")
    return problems
