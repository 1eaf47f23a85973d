"""Attributes and their control tokens: the one place that names them, numbers them and turns a condition into the
control tokens a sample is drawn under.

A conditional run conditions on one attribute (a score column with a threshold) or several
(`objective.attributes`). The first attribute's control tokens are the tokenizer's own `<|aligned|>` and
`<|misaligned|>` (so one attribute is exactly what a run did before attributes existed); attribute m >= 1 gets two
new ids past the tokenizer's vocabulary, vocab + 2 (m - 1) and vocab + 2 (m - 1) + 1, named `<|aligned:COLUMN|>` and
`<|misaligned:COLUMN|>` (an export adds them to its tokenizer under these names). Before every segment, packing puts
one control token per attribute, in attribute order, each dropped independently with objective.drop_prob.

A condition is `none`, `aligned` or `misaligned` (every attribute), or `COLUMN=aligned|misaligned` pairs separated
by commas (the attributes named; the others get no control token, as when their token was dropped in training).
"""
from __future__ import annotations

from dataclasses import dataclass

from prefpretrain.data_shards.packing import Control
from prefpretrain.errors import InputError

VALUES = ("aligned", "misaligned")
PLAIN = ("none", *VALUES)


@dataclass(frozen=True)
class Attribute:
    column: str  # the score column
    threshold: float  # score <= threshold is aligned
    aligned: str  # control token names
    misaligned: str
    aligned_id: int
    misaligned_id: int

    def control(self) -> Control:
        return Control(self.threshold, self.aligned_id, self.misaligned_id)

    def to_json(self) -> dict:
        return {"column": self.column, "threshold": self.threshold, "aligned": self.aligned,
                "misaligned": self.misaligned}


def resolve_attributes(o, train_objective: str, condition: str, continual: bool) -> None:
    """The config's attributes checked (ValueError: one line naming the key): several are the conditional
    objective's only (the others read one score per token), each column once; the first attribute's threshold
    becomes the objective's (set in one place only); eval.condition's syntax."""
    if len(o.attributes) > 1 and train_objective != "conditional":
        raise ValueError(f"objective.attributes: {len(o.attributes)} attributes; conditioning on several at once is "
                         f"the conditional objective's (train.objective={train_objective} reads one score per "
                         f"token: give it one attribute)")
    for i, a in enumerate(o.attributes):
        if not a.column:
            raise ValueError(f"objective.attributes[{i}].column: empty (name a score column of the shard sets)")
        if a.column in [b.column for b in o.attributes[:i]]:
            raise ValueError(f"objective.attributes[{i}].column: {a.column!r} is named twice")
    try:
        parse_condition(condition, allow_auto=True)
    except ValueError as e:
        raise ValueError(f"eval.{e}") from None
    if o.attributes:
        a = o.attributes[0]
        if o.threshold not in (0.0, a.threshold):
            raise ValueError("objective.threshold: with objective.attributes, set the threshold there "
                             f"(objective.attributes[0].threshold), not both ({o.threshold} vs {a.threshold})")
        o.threshold = a.threshold
    if o.attributes and continual:
        raise ValueError("objective.attributes: a continual update reads the stored score column (its replay "
                         "memory keeps that one); leave objective.attributes empty")


def token_names(column: str, m: int) -> tuple[str, str]:
    """The control tokens of attribute m (0: the tokenizer's own)."""
    from prefpretrain.data_shards.tokenizer import ALIGNED, MISALIGNED

    return (ALIGNED, MISALIGNED) if m == 0 else (f"<|aligned:{column}|>", f"<|misaligned:{column}|>")


def run_attributes(objective, tokenizer: dict, stored_column: str) -> tuple[Attribute, ...]:
    """A run's attributes from its `objective` config and its shard set's manifest `tokenizer` entry; no
    `objective.attributes`: the stored column at objective.threshold."""
    specs = [(a.column, a.threshold) for a in objective.attributes] or [(stored_column, objective.threshold)]
    sp, vocab = tokenizer["special_ids"], tokenizer["vocab_size"]
    out = []
    for m, (column, threshold) in enumerate(specs):
        ids = (sp["aligned"], sp["misaligned"]) if m == 0 else (vocab + 2 * (m - 1), vocab + 2 * (m - 1) + 1)
        out.append(Attribute(column, threshold, *token_names(column, m), *ids))
    return tuple(out)


def tokenizer_attribute(special_ids: dict[str, int], column: str, threshold: float = 0.0) -> tuple[Attribute, ...]:
    """One attribute on the tokenizer's own control tokens (a model trained before attributes existed)."""
    return (Attribute(column, threshold, *token_names(column, 0), special_ids["aligned"], special_ids["misaligned"]),)


def model_vocab_size(tokenizer: dict, attributes: tuple[Attribute, ...]) -> int:
    """Embedding rows a model needs: the tokenizer's vocabulary and the control tokens of attributes past the
    first."""
    return tokenizer["vocab_size"] + 2 * max(0, len(attributes) - 1)


def added_tokens(attributes: tuple[Attribute, ...]) -> list[str]:
    """The control tokens past the tokenizer's vocabulary, in id order."""
    return [t for a in attributes[1:] for t in (a.aligned, a.misaligned)]


def from_tokens(records: list[dict], tok) -> tuple[Attribute, ...]:
    """Attributes recorded by an export (`to_json`), their ids looked up in its tokenizer (`tokenizers`)."""
    out = []
    for r in records:
        ids = [tok.token_to_id(r[v]) for v in VALUES]
        if None in ids:
            raise ValueError(f"the model's tokenizer has no control token {r['aligned']!r} / {r['misaligned']!r}")
        out.append(Attribute(r["column"], float(r["threshold"]), r["aligned"], r["misaligned"], *ids))
    return tuple(out)


def parse_condition(text: str, allow_auto: bool = False) -> str | dict[str, str]:
    """A condition's syntax checked: a plain value, or {column: value} from `COLUMN=VALUE[,COLUMN=VALUE...]`."""
    text = text.strip()
    if text in PLAIN or allow_auto and text == "auto":
        return text
    pairs: dict[str, str] = {}
    for part in text.split(","):
        column, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not column or value not in VALUES or column in pairs:
            plain = ", ".join(("auto", *PLAIN) if allow_auto else PLAIN)
            raise ValueError(f"condition {text!r}: expected one of {plain}, or COLUMN=aligned|misaligned pairs "
                             f"separated by commas (each column once)")
        pairs[column] = value
    return pairs


def control_ids(attributes: tuple[Attribute, ...], condition: str) -> tuple[int, ...]:
    """The control tokens, in attribute order, a sample is drawn under."""
    want = parse_condition(condition)
    if want == "none":
        return ()
    if isinstance(want, str):
        want = {a.column: want for a in attributes}
    unknown = sorted(set(want) - {a.column for a in attributes})
    if unknown:
        raise ValueError(f"condition {condition!r}: {', '.join(unknown)} is not an attribute of this model (its "
                         f"attributes: {', '.join(a.column for a in attributes)})")
    return tuple(a.aligned_id if want[a.column] == "aligned" else a.misaligned_id
                 for a in attributes if a.column in want)


def checked_condition(attributes: tuple[Attribute, ...], condition: str) -> str:
    """A condition naming only attributes the model has (one line otherwise)."""
    try:
        control_ids(attributes, condition)
    except ValueError as e:
        raise InputError(str(e)) from None
    return condition


def all_control_ids(attributes: tuple[Attribute, ...]) -> list[int]:
    return [i for a in attributes for i in (a.aligned_id, a.misaligned_id)]
