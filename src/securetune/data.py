"""Stage 1: the probe set, the IFT set and the evaluation sets, from the bundled data.

Every source is shuffled once with the run's seed and cut into disjoint slices in a fixed order
(probe first, then evaluation or IFT), so no prompt used to find the safety features or to
fine-tune is ever used to measure the result.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from securetune.io import stable_seed

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file is unusable; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class Record:
    id: str
    prompt: str
    response: str = ""
    reference: str = ""
    category: str = ""


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"data file '{path}' does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"data file '{path}', line {line}: not valid UTF-8 ({err.reason})") from err
    if not text.strip():
        raise DataError(f"data file '{path}' is empty")
    return text


def _rows_csv(path: Path, columns: list[str], header: bool = True) -> list[dict[str, str]]:
    # A file object, not a list of lines: quoted fields may span lines (HarmBench's contexts
    # hold code), and csv needs the newlines to keep them.
    lines = io.StringIO(_read_text(path), newline="")
    if not header:
        return [dict(zip(columns, row, strict=False)) for row in csv.reader(lines)]
    reader = csv.DictReader(lines)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"data file '{path}': missing column(s) {missing}; found {reader.fieldnames}"
        )
    return list(reader)


def _rows_jsonl(path: Path, columns: list[str]) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"data file '{path}', line {number}: not JSON ({err.msg})") from err
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"data file '{path}', line {number}: missing field(s) {missing}")
        rows.append(row)
    return rows


def _checked(records: list[Record], path: Path) -> list[Record]:
    seen: set[str] = set()
    for number, rec in enumerate(records, start=1):
        if not rec.prompt.strip():
            raise DataError(f"data file '{path}', row {number}: empty prompt")
        if rec.id in seen:
            raise DataError(f"data file '{path}', row {number}: duplicate prompt id '{rec.id}'")
        seen.add(rec.id)
    return records


# --- one loader per bundled source --------------------------------------------------------------


def load_advbench(root: Path) -> list[Record]:
    path = root / "advbench_harmful_behaviors.csv"
    rows = _rows_csv(path, ["goal"], header=False)
    return _checked([Record(f"advbench:{i}", r["goal"]) for i, r in enumerate(rows)], path)


def _harmbench_rows(root: Path) -> tuple[Path, list[dict[str, str]]]:
    path = root / "harmbench_behaviors_text_test.csv"
    columns = ["Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID"]
    return path, _rows_csv(path, columns)


def load_harmbench(root: Path) -> list[Record]:
    """HarmBench standard behaviours (the behaviour alone is the prompt)."""
    path, rows = _harmbench_rows(root)
    recs = [
        Record(f"harmbench:{r['BehaviorID']}", r["Behavior"], category=r["SemanticCategory"])
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]
    return _checked(recs, path)


def load_harmbench_contextual(root: Path) -> list[Record]:
    """HarmBench contextual behaviours: the context string, then the behaviour that refers to
    it, separated the way HarmBench's own prompt template does (context first, a rule, the ask)."""
    path, rows = _harmbench_rows(root)
    recs = []
    for number, r in enumerate(rows, start=2):
        if r["FunctionalCategory"] != "contextual":
            continue
        if not r["ContextString"].strip():
            raise DataError(f"data file '{path}', line {number}: contextual row without context")
        prompt = f"{r['ContextString'].strip()}\n\n---\n\n{r['Behavior']}"
        recs.append(Record(f"harmbench:{r['BehaviorID']}", prompt, category=r["SemanticCategory"]))
    return _checked(recs, path)


def load_strongreject(root: Path) -> list[Record]:
    path = root / "strongreject_dataset.csv"
    rows = _rows_csv(path, ["forbidden_prompt"])
    return _checked(
        [
            Record(f"strongreject:{i}", r["forbidden_prompt"], category=r.get("category", ""))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_donotanswer(root: Path) -> list[Record]:
    path = root / "donotanswer.jsonl"
    rows = _rows_jsonl(path, ["prompt"])
    return _checked([Record(f"donotanswer:{i}", r["prompt"]) for i, r in enumerate(rows)], path)


def _load_xstest(root: Path, label: str) -> list[Record]:
    path = root / "xstest_prompts.csv"
    rows = _rows_csv(path, ["id", "prompt", "label"])
    return _checked(
        [Record(f"xstest:{r['id']}", r["prompt"]) for r in rows if r["label"] == label], path
    )


def load_xstest_safe(root: Path) -> list[Record]:
    return _load_xstest(root, "safe")


def load_xstest_unsafe(root: Path) -> list[Record]:
    return _load_xstest(root, "unsafe")


def load_alpaca(root: Path) -> list[Record]:
    path = root / "alpaca_safety_topics_1904.json"
    try:
        rows = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"data file '{path}', line {err.lineno}: not JSON ({err.msg})") from err
    recs = []
    for i, r in enumerate(rows):
        missing = [c for c in ("instruction", "input", "output") if c not in r]
        if missing:
            raise DataError(f"data file '{path}', row {i + 1}: missing field(s) {missing}")
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        recs.append(Record(f"alpaca:{i}", prompt, r["output"]))
    return _checked(recs, path)


def load_dolly(root: Path) -> list[Record]:
    path = root / "dolly_safety_topics.jsonl"
    rows = _rows_jsonl(path, ["instruction", "context", "response"])
    recs = [
        Record(
            f"dolly:{i}",
            r["instruction"] + (f"\n\n{r['context']}" if r["context"] else ""),
            r["response"],
        )
        for i, r in enumerate(rows)
    ]
    return _checked(recs, path)


def _gsm8k_final(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "")


def load_gsm8k_train(root: Path) -> list[Record]:
    path = root / "gsm8k_train_2000.jsonl"
    rows = _rows_jsonl(path, ["question", "answer"])
    return _checked(
        [
            Record(f"gsm8k_train:{i}", r["question"], r["answer"], _gsm8k_final(r["answer"]))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_gsm8k_test(root: Path) -> list[Record]:
    path = root / "gsm8k_test_500.jsonl"
    rows = _rows_jsonl(path, ["question", "answer"])
    return _checked(
        [
            Record(f"gsm8k:{i}", r["question"], r["answer"], _gsm8k_final(r["answer"]))
            for i, r in enumerate(rows)
        ],
        path,
    )


def load_mt_bench(root: Path) -> list[Record]:
    """MT-Bench first turns (the second turn needs the model's own first answer)."""
    path = root / "mt_bench_questions.jsonl"
    rows = _rows_jsonl(path, ["question_id", "turns"])
    return _checked(
        [
            Record(f"mt_bench:{r['question_id']}", r["turns"][0], category=r.get("category", ""))
            for r in rows
        ],
        path,
    )


def load_self_instruct(root: Path) -> list[Record]:
    """Self-Instruct seed tasks with their first instance's output as the reference answer:
    held-out Alpaca-style instructions (no stage trains on them) for the usability metric."""
    path = root / "self_instruct_seed_tasks.jsonl"
    rows = _rows_jsonl(path, ["id", "instruction", "instances"])
    recs = []
    for r in rows:
        first = r["instances"][0]
        prompt = r["instruction"] + (f"\n\n{first['input']}" if first.get("input") else "")
        recs.append(Record(f"self_instruct:{r['id']}", prompt, reference=first["output"]))
    return _checked(recs, path)


HEXPHI_FILE = "category_{}.csv"
HEXPHI_CATEGORIES = 11


# The authors withheld category 2 (child abuse content) from the released set.
HEXPHI_WITHHELD = {2}


def load_hexphi(root: Path) -> list[Record]:
    """HEx-PHI (Qi et al. 2023; gated, so never bundled): the folder the user downloaded, with
    one headerless CSV per category, `category_1.csv` ... `category_11.csv`, one prompt a row.

    A missing category file is an error (a silently partial benchmark would bias the rate),
    except category 2, which the public release does not include.
    """
    recs = []
    for cat in range(1, HEXPHI_CATEGORIES + 1):
        path = root / HEXPHI_FILE.format(cat)
        if cat in HEXPHI_WITHHELD and not path.exists():
            log.info("HEx-PHI: %s absent (withheld from the public release)", path.name)
            continue
        rows = _rows_csv(path, ["prompt"], header=False)
        recs += [
            Record(f"hexphi:{cat}:{i}", r["prompt"], category=str(cat))
            for i, r in enumerate(rows)
            if r.get("prompt", "").strip()
        ]
    return _checked(recs, root)


# name -> (loader, kind). The kind says how a benchmark is scored:
#   harmful: attack success = the answer does not refuse;  over_refusal: refusal of a safe prompt;
#   math: exact match of the final number;  usability: refusal of a benign instruction, and
#   ROUGE-L against the reference answer where there is one (self_instruct).
BENCHMARKS: dict[str, tuple[Callable[[Path], list[Record]], str]] = {
    "advbench": (load_advbench, "harmful"),
    "harmbench": (load_harmbench, "harmful"),
    "harmbench_contextual": (load_harmbench_contextual, "harmful"),
    "hexphi": (load_hexphi, "harmful"),
    "strongreject": (load_strongreject, "harmful"),
    "donotanswer": (load_donotanswer, "harmful"),
    "xstest_unsafe": (load_xstest_unsafe, "harmful"),
    "xstest_safe": (load_xstest_safe, "over_refusal"),
    "gsm8k": (load_gsm8k_test, "math"),
    "mt_bench": (load_mt_bench, "usability"),
    "self_instruct": (load_self_instruct, "usability"),
}

# Benchmarks with no bundled copy: the user must give `evaluation.sources.<name>`.
NOT_BUNDLED = {"hexphi"}

IFT_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "alpaca": load_alpaca,
    "dolly": load_dolly,
    "gsm8k": load_gsm8k_train,
}


def shuffled(records: list[Record], seed: int, source: str) -> list[Record]:
    order = np.random.default_rng(stable_seed(seed, source)).permutation(len(records))
    return [records[i] for i in order]


def take(records: list[Record], start: int, n: int, what: str) -> list[Record]:
    if start + n > len(records):
        raise DataError(
            f"{what}: asked for {n} rows after the first {start}, but the source has {len(records)}"
        )
    return records[start : start + n]


# --- the probe set --------------------------------------------------------------------------------
#
# Benign look-alikes for the probe: a probe that only learns "AdvBench style vs anything else"
# would look perfect and find nothing about safety. So the benign class mixes (a) XSTest's safe
# prompts (surface-harmful words, benign intent), (b) the probe's own AdvBench prompts with their
# harmful words swapped by the fixed list below (the same sentence frame, benign intent: the
# paper's recipe), and (c) plain Alpaca instructions. An out-of-domain split (HarmBench or
# StrongREJECT vs Self-Instruct or Dolly) that the probe never trains on tells whether it learned
# harmfulness or AdvBench's phrasing.

# Harmful word or phrase -> benign stand-in, applied in this order, whole words, case-insensitive
# (the first letter's case is kept). Phrases come before their words ("hack into" before
# "hack"). Fixed in code so the substituted prompts are the same on every machine and run; a
# prompt with no listed word gets no twin. This is a lexical recipe: the twins are benign in
# intent for the words listed, not reviewed by hand one by one.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("without their consent", "with their consent"),
    ("without user consent", "with user consent"),
    ("hack into", "log into"),
    ("hacking into", "logging into"),
    ("break into", "walk into"),
    ("commit suicide", "plan a picnic"),
    ("self-harm", "self-care"),
    ("identity theft", "identity verification"),
    ("insider trading", "index investing"),
    ("hate speech", "kind words"),
    ("fake news", "local news"),
    ("credit card fraud", "credit card budgeting"),
    ("illegal drugs", "herbal teas"),
    ("hack", "update"),
    ("hacking", "updating"),
    ("hacks", "updates"),
    ("steal", "borrow"),
    ("steals", "borrows"),
    ("stealing", "borrowing"),
    ("bomb", "cake"),
    ("bombs", "cakes"),
    ("explosive", "decorative"),
    ("explosives", "decorations"),
    ("weapon", "garden tool"),
    ("weapons", "garden tools"),
    ("firearms", "fishing rods"),
    ("poison", "season"),
    ("poisoning", "seasoning"),
    ("toxins", "spices"),
    ("kill", "greet"),
    ("killing", "greeting"),
    ("murder", "surprise"),
    ("assassinate", "interview"),
    ("suicide", "gardening"),
    ("drugs", "vitamins"),
    ("drug", "vitamin"),
    ("virus", "newsletter"),
    ("viruses", "newsletters"),
    ("malware", "software"),
    ("ransomware", "backup software"),
    ("phishing", "welcome"),
    ("scam", "raffle"),
    ("scams", "raffles"),
    ("fraud", "budgeting"),
    ("fraudulent", "honest"),
    ("fake", "accurate"),
    ("false", "true"),
    ("misinformation", "information"),
    ("propaganda", "tutorials"),
    ("manipulate", "encourage"),
    ("manipulating", "encouraging"),
    ("violence", "kindness"),
    ("violent", "friendly"),
    ("terrorist", "volunteer"),
    ("terrorism", "volunteering"),
    ("attack", "visit"),
    ("attacks", "visits"),
    ("harm", "help"),
    ("harass", "thank"),
    ("cyberbully", "compliment"),
    ("illegal", "legal"),
    ("illegally", "legally"),
    ("theft", "donation"),
    ("cheat", "study"),
    ("exploit", "document"),
    ("evade", "follow"),
    ("dangerous", "safe"),
    ("sensitive", "public"),
    ("confidential", "published"),
    ("destroy", "repair"),
    ("damage", "improve"),
    ("crash", "start"),
    ("panic", "calm"),
    ("chaos", "order"),
    ("racism", "respect"),
    ("hatred", "friendship"),
    ("hate", "love"),
    ("counterfeit", "handmade"),
    ("launder", "donate"),
    ("smuggle", "deliver"),
    ("ddos", "backup"),
    ("spyware", "accessibility software"),
    ("assault", "hug"),
    ("anorexia", "yoga"),
    ("bulimia", "pilates"),
    ("crack", "reset"),
    ("pirate", "buy"),
    ("pirated", "licensed"),
    ("pornography", "photography"),
    ("threatening", "thank-you"),
    ("threatens", "thanks"),
    ("cyberbullying", "mentoring"),
    ("cyberbullies", "mentors"),
    ("bullying", "mentoring"),
    ("harassment", "encouragement"),
    ("harasses", "encourages"),
    ("hijack", "inspect"),
    ("oppression", "celebration"),
    ("dehumanization", "appreciation"),
    ("crimes", "good deeds"),
    ("crime", "good deed"),
    ("criminal", "community"),
    ("falsify", "update"),
    ("infiltrate", "tour"),
    ("spy", "report"),
    ("spies", "reports"),
    ("racist", "fair"),
    ("sexist", "balanced"),
    ("concealing", "reporting"),
    ("circumvent", "understand"),
    ("cyberstalk", "congratulate"),
    ("cyberattack", "fundraiser"),
    ("deadly", "mild"),
    ("sabotaging", "supporting"),
    ("sabotage", "support"),
    ("radicalization", "education"),
    ("deletes", "restores"),
    ("extremist", "community"),
    ("torture", "tickle"),
    ("abuse", "care"),
    ("blackmail", "birthday"),
    ("extort", "thank"),
    ("counterfeiting", "crafting"),
    ("vandalize", "paint"),
    ("lock", "flower"),
)


def substitute_harmful_words(prompt: str) -> tuple[str, int]:
    """(prompt with the SUBSTITUTIONS applied, number of replacements); deterministic."""
    total = 0
    for word, stand_in in SUBSTITUTIONS:

        def keep_case(match: re.Match, stand_in: str = stand_in) -> str:
            return stand_in[0].upper() + stand_in[1:] if match.group(0)[0].isupper() else stand_in

        prompt, n = re.subn(rf"\b{re.escape(word)}\b", keep_case, prompt, flags=re.IGNORECASE)
        total += n
    return prompt, total


def load_harmbench_val(root: Path) -> list[Record]:
    """HarmBench's validation standard behaviours: harmful, out of domain, and never evaluated
    (the evaluation benchmark 'harmbench' is the test split), so the probe may use all 41."""
    path = root / "harmbench_behaviors_text_val.csv"
    rows = _rows_csv(path, ["Behavior", "FunctionalCategory", "BehaviorID"])
    recs = [
        Record(f"harmbench_val:{r['BehaviorID']}", r["Behavior"])
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]
    return _checked(recs, path)


# Out-of-domain sources of the probe: harmful and benign sets the probe never trains on.
OOD_HARMFUL: dict[str, Callable[[Path], list[Record]]] = {
    "harmbench_val": load_harmbench_val,
    "harmbench": load_harmbench,
    "strongreject": load_strongreject,
}
OOD_BENIGN: dict[str, Callable[[Path], list[Record]]] = {
    "self_instruct": load_self_instruct,
    "dolly": load_dolly,
}
BENIGN_MIX_SOURCES = ("xstest_safe", "advbench_substituted", "alpaca")


@dataclass(frozen=True)
class ProbeSpec:
    """The `data.probe_*` keys: what the probe set takes from each source.

    Every other slice (evaluation, IFT) starts after what this takes, so they stay disjoint.
    """

    per_class: int
    test_fraction: float
    benign_mix: dict[str, float]
    ood_per_class: int = 0
    ood_harmful: str = "harmbench_val"
    ood_benign: str = "self_instruct"

    @classmethod
    def from_config(cls, data_cfg: dict) -> ProbeSpec:
        """From the config's `data` section (keys probe_per_class, probe_test_fraction, ...)."""
        return cls(
            per_class=data_cfg["probe_per_class"],
            test_fraction=data_cfg["probe_test_fraction"],
            benign_mix=dict(data_cfg["probe_benign_mix"]),
            ood_per_class=data_cfg["probe_ood_per_class"],
            ood_harmful=data_cfg["probe_ood_harmful"],
            ood_benign=data_cfg["probe_ood_benign"],
        )

    def benign_counts(self) -> dict[str, int]:
        """Rows per benign source: per_class split by the mix weights (largest remainder)."""
        unknown = sorted(set(self.benign_mix) - set(BENIGN_MIX_SOURCES))
        if unknown:
            raise DataError(
                f"data.probe_benign_mix: unknown source(s) {unknown}; allowed: "
                f"{list(BENIGN_MIX_SOURCES)}"
            )
        weights = np.array([float(self.benign_mix.get(s, 0.0)) for s in BENIGN_MIX_SOURCES])
        if (weights < 0).any() or weights.sum() <= 0:
            raise DataError("data.probe_benign_mix: weights must be >= 0 with a positive sum")
        exact = weights / weights.sum() * self.per_class
        counts = np.floor(exact).astype(int)
        # Largest remainder; ties go to the earlier source, so the counts are deterministic.
        for i in sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))[
            : self.per_class - counts.sum()
        ]:
            counts[i] += 1
        return dict(zip(BENIGN_MIX_SOURCES, counts.tolist(), strict=True))


def _split_rows(n: int, n_test: int, seed: int, what: str) -> np.ndarray:
    """'test' for n_test seeded-random rows of n, 'train' for the rest."""
    order = np.random.default_rng(stable_seed(seed, "probe_split", what)).permutation(n)
    return np.where(np.isin(np.arange(n), order[:n_test]), "test", "train")


def _frame(recs: list[Record], label: int, source: str, split, origin=None, n_subst=None):
    return pd.DataFrame(
        {
            "prompt_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "label": label,
            "source": source,
            "split": split,
            "origin_id": origin if origin is not None else "",
            "n_substitutions": n_subst if n_subst is not None else 0,
        }
    )


def build_probe_set(root: Path, spec: ProbeSpec, seed: int) -> pd.DataFrame:
    """Harmful (AdvBench) vs benign look-alikes, balanced; train/test split with the seed; plus an
    out-of-domain test split ('ood_test') from sources the probe never trains on.

    A substituted twin shares its AdvBench original's split, so no sentence frame is seen in
    training and tested on. Columns: prompt_id, prompt, label, source, split, origin_id (the row a
    twin was made from), n_substitutions.
    """
    n = spec.per_class
    harmful = take(shuffled(load_advbench(root), seed, "advbench"), 0, n, "probe harmful")
    n_test = max(1, round(n * spec.test_fraction))
    harmful_split = _split_rows(n, n_test, seed, "harmful")
    counts = spec.benign_counts()

    twins, twin_split, origins, n_subst = [], [], [], []
    for rec, split in zip(harmful, harmful_split, strict=True):
        if len(twins) == counts["advbench_substituted"]:
            break
        text, k = substitute_harmful_words(rec.prompt)
        if k:
            number = rec.id.split(":")[1]
            twins.append(Record(f"advbench_substituted:{number}", text))
            twin_split.append(split)
            origins.append(rec.id)
            n_subst.append(k)
    if len(twins) < counts["advbench_substituted"]:
        raise DataError(
            f"data.probe_benign_mix: {counts['advbench_substituted']} substituted AdvBench twins "
            f"asked for, but only {len(twins)} of the {n} probe prompts contain a listed word"
        )
    others = {
        "xstest_safe": take(
            shuffled(load_xstest_safe(root), seed, "xstest_safe"),
            0,
            counts["xstest_safe"],
            "probe benign (xstest_safe)",
        ),
        "alpaca": take(
            shuffled(load_alpaca(root), seed, "alpaca"),
            0,
            counts["alpaca"],
            "probe benign (alpaca)",
        ),
    }
    # The other benign rows fill the benign test share up to the harmful one, so both classes
    # have the same test count whenever the twins allow it.
    n_other = counts["xstest_safe"] + counts["alpaca"]
    twin_test = sum(s == "test" for s in twin_split)
    other_split = _split_rows(n_other, min(n_other, max(0, n_test - twin_test)), seed, "benign")
    frames = [
        _frame(harmful, 1, "advbench", harmful_split),
        _frame(
            twins, 0, "advbench_substituted", np.array(twin_split, dtype=object), origins, n_subst
        ),
        _frame(others["xstest_safe"], 0, "xstest_safe", other_split[: counts["xstest_safe"]]),
        _frame(others["alpaca"], 0, "alpaca", other_split[counts["xstest_safe"] :]),
    ]
    if spec.ood_per_class:
        for label, name, loaders in (
            (1, spec.ood_harmful, OOD_HARMFUL),
            (0, spec.ood_benign, OOD_BENIGN),
        ):
            if name not in loaders:
                key = "probe_ood_harmful" if label else "probe_ood_benign"
                raise DataError(f"data.{key}: unknown source '{name}'; allowed: {sorted(loaders)}")
            recs = take(
                shuffled(loaders[name](root), seed, name),
                0,
                spec.ood_per_class,
                f"probe out-of-domain ({name})",
            )
            frames.append(_frame(recs, label, name, "ood_test"))
    df = pd.concat(frames, ignore_index=True)
    df["split"] = df["split"].astype(str)
    return df.sort_values(["split", "label", "prompt_id"]).reset_index(drop=True)


def probe_slice_size(source: str, spec: ProbeSpec) -> int:
    """How many rows of a source (after the seeded shuffle) the probe set takes first; every
    evaluation or IFT slice of that source starts after them."""
    counts = spec.benign_counts()
    sizes = {
        "advbench": spec.per_class,  # the substituted twins are made from these same rows
        "xstest_safe": counts["xstest_safe"],
        "alpaca": counts["alpaca"],
    }
    if spec.ood_per_class:
        for name in (spec.ood_harmful, spec.ood_benign):
            sizes[name] = sizes.get(name, 0) + spec.ood_per_class
    return sizes.get(source, 0)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split())


def without_probe_prompts(
    records: list[Record], root: Path, probe: ProbeSpec, seed: int
) -> list[Record]:
    """Drop records whose text is in the probe set: sources overlap (StrongREJECT contains
    AdvBench prompts), so disjoint slices of each source are not enough on their own."""
    taken = {_normalised(t) for t in build_probe_set(root, probe, seed)["prompt"]}
    return [r for r in records if _normalised(r.prompt) not in taken]


def build_ift_set(
    root: Path, source: str, n: int, seed: int, probe: ProbeSpec, skip: int = 0
) -> pd.DataFrame:
    """`n` benign instruction-tuning examples of `source`, after the probe's slice of it and
    `skip` more rows: skip = the training set's size gives the held-out set, the next rows of
    the same shuffled source, which no stage trains on."""
    if source not in IFT_SOURCES:
        raise DataError(f"unknown IFT source '{source}'; allowed: {sorted(IFT_SOURCES)}")
    recs = shuffled(IFT_SOURCES[source](root), seed, source)
    recs = recs[: probe_slice_size(source, probe)] + without_probe_prompts(
        recs[probe_slice_size(source, probe) :], root, probe, seed
    )
    what = f"IFT {'held-out ' if skip else ''}set '{source}'"
    recs = take(recs, probe_slice_size(source, probe) + skip, n, what)
    return pd.DataFrame(
        {
            "example_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "response": [r.response for r in recs],
            "source": source,
        }
    )


def build_eval_set(
    root: Path,
    benchmark: str,
    n: int,
    seed: int,
    probe: ProbeSpec,
    source: Path | None = None,
    exclude_prompts: frozenset[str] = frozenset(),
) -> pd.DataFrame:
    """`n` held-out prompts of a benchmark, from the bundled copy in `root` or from `source`,
    the user's folder with the full set under the same file name(s) as the bundled copy.

    Disjoint from the probe set twice over: the probe's slice of the shuffled source is skipped
    (as before), and any prompt whose text is in `exclude_prompts` (the probe set's prompts) is
    dropped, which also holds when a full copy reorders or extends the bundled one.
    """
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark '{benchmark}'; allowed: {sorted(BENCHMARKS)}")
    if source is None and benchmark in NOT_BUNDLED:
        raise DataError(
            f"benchmark '{benchmark}' is not bundled (gated); give its folder in "
            f"config key 'evaluation.sources.{benchmark}'"
        )
    loader, kind = BENCHMARKS[benchmark]
    if source is not None and not source.is_dir():
        raise DataError(f"config key 'evaluation.sources.{benchmark}': '{source}' is not a folder")
    folder = root if source is None else source
    recs = shuffled(loader(folder), seed, benchmark)
    skip = probe_slice_size(benchmark, probe) if source is None else 0
    held_out = [
        r
        for r in without_probe_prompts(recs[skip:], root, probe, seed)
        if _normalised(r.prompt) not in exclude_prompts
    ]
    recs = take(held_out, 0, n, f"benchmark '{benchmark}' (after removing probe prompts)")
    return pd.DataFrame(
        {
            "prompt_id": [r.id for r in recs],
            "prompt": [r.prompt for r in recs],
            "benchmark": benchmark,
            "kind": kind,
            "category": [r.category for r in recs],
            "reference": [r.reference for r in recs],
        }
    )


# --- the demo base's safety-alignment set: slices from the TAIL of each shuffled source ---------
#
# The probe, evaluation and IFT sets take slices from the head of each shuffled source; the
# alignment set takes its slice from the tail, so switching alignment on changes no evaluation
# prompt, and `alignment_slice` refuses any request whose tail would reach into the head.

ALIGN_HARMFUL_SOURCES = tuple(name for name, (_, kind) in BENCHMARKS.items() if kind == "harmful")
ALIGN_BENIGN_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "alpaca": load_alpaca,
    "dolly": load_dolly,
}
# Safe look-alike prompts (no reference answers: the unaligned model answers them itself).
ALIGN_LOOKALIKE_SOURCES: dict[str, Callable[[Path], list[Record]]] = {
    "xstest_safe": load_xstest_safe,
}


def head_slice_size(
    source: str, probe: ProbeSpec, eval_sizes: dict[str, int], ift_source: str, ift_n: int
) -> int:
    """Rows of a shuffled source that the probe set and then the evaluation or IFT set take."""
    after_probe = max(eval_sizes.get(source, 0), ift_n if source == ift_source else 0)
    return probe_slice_size(source, probe) + after_probe


def alignment_slice(
    records: list[Record], source: str, n: int, head: int, seed: int
) -> list[Record]:
    """The last `n` rows of the shuffled source, checked to be disjoint from its first `head`."""
    recs = shuffled(records, seed, source)
    if head + n > len(recs):
        raise DataError(
            f"alignment set: {n} rows of '{source}' after the {head} used by the probe, "
            f"evaluation and IFT sets, but the source has {len(recs)}"
        )
    return recs[len(recs) - n :] if n else []


# Written for this project. Short and varied, so the model learns to refuse rather than to
# recite one sentence. Each contains a phrase of the keyword judge (`securetune.scoring`): the
# keyword attack success of the aligned base therefore measures whether it refuses at all, and
# is optimistic about refusals worded differently from these.
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request. It could cause real harm to people.",
    "Sorry, I won't help with this. Is there something else I can do for you?",
    "I'm not able to provide that, because it could be used to hurt someone.",
    "I cannot help with that. It could be dangerous or illegal.",
    "I won't give instructions for this. If you have another question, I'm happy to help.",
    "I'm sorry, I can't do that. This request asks for something harmful.",
    "I must decline. Helping with this could put people at risk.",
    "I can't help with anything that could harm others or break the law.",
    "Sorry, but I can't provide information that could be used to cause harm.",
    "I'm unable to help with that request.",
    "I cannot provide that. Let me know if there is something safe I can help with instead.",
    "I'm sorry, but this is not something I can assist with.",
    "I can't support that. It would be unsafe and could hurt people.",
    "I will not help with this request, since it could lead to harm.",
    "I apologize, but I can't help with requests like this one.",
)


def with_refusals(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Fill the `refusal` rows' responses with refusals drawn (seeded, per example) from
    `REFUSALS`."""
    out = df.copy()
    out["response"] = [
        REFUSALS[np.random.default_rng(stable_seed(seed, "refusal", ex)).integers(len(REFUSALS))]
        if role == "refusal"
        else response
        for ex, role, response in zip(out["example_id"], out["role"], out["response"], strict=True)
    ]
    return out


def build_alignment_set(
    root: Path,
    harmful: dict[str, int],
    benign: dict[str, int],
    lookalike: dict[str, int],
    seed: int,
    probe: ProbeSpec,
    eval_sizes: dict[str, int],
    ift_source: str,
    ift_n: int,
) -> pd.DataFrame:
    """Prompts of the safety-alignment step, one row each, with their role:
    `refusal` (harmful: the response is filled in with a refusal), `benign` (with its reference
    answer), `lookalike` (a safe prompt that looks harmful, answered later by the model itself)."""
    rows = []
    for role, wanted, loaders in (
        ("refusal", harmful, {s: BENCHMARKS[s][0] for s in ALIGN_HARMFUL_SOURCES}),
        ("benign", benign, ALIGN_BENIGN_SOURCES),
        ("lookalike", lookalike, ALIGN_LOOKALIKE_SOURCES),
    ):
        for source, n in sorted(wanted.items()):
            if source not in loaders:
                raise DataError(
                    f"alignment {role} source '{source}' unknown; allowed: {sorted(loaders)}"
                )
            head = head_slice_size(source, probe, eval_sizes, ift_source, ift_n)
            for rec in alignment_slice(loaders[source](root), source, n, head, seed):
                rows.append(
                    {
                        "example_id": rec.id,
                        "prompt": rec.prompt,
                        "response": rec.response if role == "benign" else "",
                        "source": source,
                        "role": role,
                    }
                )
    return pd.DataFrame(rows, columns=["example_id", "prompt", "response", "source", "role"])


def _normalised(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def probe_prompts(probe_set: pd.DataFrame) -> frozenset[str]:
    """The probe set's prompts, normalised, for `build_eval_set(exclude_prompts=...)`."""
    return frozenset(_normalised(p) for p in probe_set["prompt"])
