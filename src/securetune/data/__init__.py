"""Stage 1: the probe set, the IFT set, the evaluation sets and the alignment set, from the
bundled data. Torch-free: its jobs start in well under a second.

Every source is shuffled once with the run's seed and cut into disjoint slices in a fixed order
(probe first, then evaluation or IFT; alignment from the tail), so no prompt used to find the
safety features or to fine-tune is ever used to measure the result. The later stages read the
probe set's table to know what it took.

Modules: `sources` (loaders and registries), `substitutions` (the benign twins' word list),
`slices` (seeded slices and the probe set's exclusion), and one module per stage with its
settings and entry function: `probe_set`, `ift_set`, `eval_set`, `alignment`.
"""

from securetune.data.alignment import (
    ALIGN_BENIGN_SOURCES,
    ALIGN_HARMFUL_SOURCES,
    ALIGN_LOOKALIKE_SOURCES,
    REFUSALS,
    AlignmentSetSettings,
    alignment_slice,
    build_alignment_set,
    head_slice_size,
    prepare_alignment_set,
    with_refusals,
)
from securetune.data.eval_set import EvalSetSettings, build_eval_set, prepare_eval_set
from securetune.data.ift_set import IftSetSettings, build_ift_set, prepare_ift_set
from securetune.data.probe_set import (
    ProbeSetSettings,
    ProbeSpec,
    build_probe_set,
    prepare_probe_set,
)
from securetune.data.slices import (
    probe_prompts,
    probe_slice_size,
    read_probe_set,
    shuffled,
    take,
    without_probe_prompts,
)
from securetune.data.sources import (
    BENCHMARKS,
    BENIGN_MIX_SOURCES,
    HEXPHI_CATEGORIES,
    HEXPHI_FILE,
    HEXPHI_WITHHELD,
    IFT_SOURCES,
    NOT_BUNDLED,
    OOD_BENIGN,
    OOD_HARMFUL,
    Benchmark,
    DataError,
    Loader,
    Record,
    load_advbench,
    load_alpaca,
    load_dolly,
    load_donotanswer,
    load_gsm8k_test,
    load_gsm8k_train,
    load_harmbench,
    load_harmbench_contextual,
    load_harmbench_val,
    load_hexphi,
    load_mt_bench,
    load_self_instruct,
    load_strongreject,
    load_xstest_safe,
    load_xstest_unsafe,
)
from securetune.data.substitutions import SUBSTITUTIONS, substitute_harmful_words

__all__ = [
    "ALIGN_BENIGN_SOURCES",
    "ALIGN_HARMFUL_SOURCES",
    "ALIGN_LOOKALIKE_SOURCES",
    "BENCHMARKS",
    "BENIGN_MIX_SOURCES",
    "HEXPHI_CATEGORIES",
    "HEXPHI_FILE",
    "HEXPHI_WITHHELD",
    "IFT_SOURCES",
    "NOT_BUNDLED",
    "OOD_BENIGN",
    "OOD_HARMFUL",
    "REFUSALS",
    "SUBSTITUTIONS",
    "AlignmentSetSettings",
    "Benchmark",
    "DataError",
    "EvalSetSettings",
    "IftSetSettings",
    "Loader",
    "ProbeSetSettings",
    "ProbeSpec",
    "Record",
    "alignment_slice",
    "build_alignment_set",
    "build_eval_set",
    "build_ift_set",
    "build_probe_set",
    "head_slice_size",
    "load_advbench",
    "load_alpaca",
    "load_dolly",
    "load_donotanswer",
    "load_gsm8k_test",
    "load_gsm8k_train",
    "load_harmbench",
    "load_harmbench_contextual",
    "load_harmbench_val",
    "load_hexphi",
    "load_mt_bench",
    "load_self_instruct",
    "load_strongreject",
    "load_xstest_safe",
    "load_xstest_unsafe",
    "prepare_alignment_set",
    "prepare_eval_set",
    "prepare_ift_set",
    "prepare_probe_set",
    "probe_prompts",
    "probe_slice_size",
    "read_probe_set",
    "shuffled",
    "substitute_harmful_words",
    "take",
    "with_refusals",
    "without_probe_prompts",
]
