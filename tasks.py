"""tasks.py — built-in verifiable tasks and the reward functions that check completions.

The demos train on a task whose every answer can be checked exactly, so a tiny model shows in
minutes whether an algorithm learns: Arithmetic ("123*4=" → "0492"), with its held-out split fixed
by a hash, its GRPO rewards and a plausible wrong answer for DPO's pairs; Sequence ("46, 50, 54, 58," →
" 62") is the task a pretrained model can partly do already (--task sequence). accuracy_reward and
format_reward check free-form completions against a dataset's answers (GSM8K's "#### 72" form). calculator is
grpo.py --tools calculator's tool (arithmetic parsed, never evaluated), calculator_conversations its warm-up data.
"""
from __future__ import annotations

import ast
import decimal
import operator
import re
import zlib

import numpy as np

import chat
import tools


def task_accuracy(task):
    """A built-in task's GRPO accuracy reward: 1.0 where task.is_correct(prompt, completion), else 0.0; its .answer
    reads a completion's answer (task.parse) for majority votes."""
    def accuracy_reward(prompts, completions, **columns):
        return [float(task.is_correct(p, c)) for p, c in zip(prompts, completions)]
    accuracy_reward.answer = task.parse
    return accuracy_reward


class Arithmetic:
    """A procedurally generated, exactly checkable task: fixed-width arithmetic.

    "123*4=" → "0492". Operands and answers are zero-padded to a fixed width, which is
    what lets a tiny model learn it in minutes (measured: free-width 3-digit addition stays under 0.12
    held-out accuracy after 3 minutes where fixed-width reaches 1.0); the digit counts and the operator set
    the difficulty. A problem
    belongs to the held-out split by a hash of its operands, so the splits never mix
    whatever the seed. Wrong-but-plausible answers (one digit changed) make preference pairs.
    """

    def __init__(self, op: str = "*", a_digits: int = 3, b_digits: int = 1):
        if op not in "+-*" or len(op) != 1 or not (1 <= a_digits <= 9 and 1 <= b_digits <= 9):
            raise ValueError(f"task needs op in + - * and 1..9 digits, got {op!r} {a_digits} {b_digits}")
        self.op, self.a_digits, self.b_digits = op, a_digits, b_digits
        biggest = self.solve(10 ** a_digits - 1, 10 ** b_digits - 1 if op != "-" else 0)
        self.width = len(str(biggest)) + (op == "-")  # "-" answers carry a sign column

    def solve(self, a: int, b: int) -> int:
        return a + b if self.op == "+" else a - b if self.op == "-" else a * b

    def format_answer(self, c: int) -> str:
        return (("-" if c < 0 else "+") if self.op == "-" else "") + str(abs(c)).zfill(self.width - (self.op == "-"))

    def held_out(self, a: int, b: int) -> bool:
        # 10% of all problems, fixed for every seed. A hash, not arithmetic on a and b: a rule like
        # (7a + b) % 10 would hold out whole last-digit combinations the model then never sees.
        return zlib.crc32(f"{a}{self.op}{b}".encode()) % 10 == 0

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n problems of the split ("train" or "eval") as {"prompt", "completion"} rows."""
        rng = np.random.default_rng([seed, split == "eval"])
        rows = []
        while len(rows) < n:
            a, b = int(rng.integers(10 ** self.a_digits)), int(rng.integers(10 ** self.b_digits))
            if self.held_out(a, b) == (split == "eval"):
                prompt = f"{a:0{self.a_digits}d}{self.op}{b:0{self.b_digits}d}="
                rows.append({"prompt": prompt, "completion": self.format_answer(self.solve(a, b))})
        return rows

    def answer(self, prompt: str) -> str:
        a, b = prompt.rstrip("=").split(self.op, 1)
        return self.format_answer(self.solve(int(a), int(b)))

    def is_correct(self, prompt: str, completion: str) -> bool:
        """Exact match of the completion (whitespace-stripped) with the answer."""
        return completion.strip() == self.answer(prompt)

    def parse(self, completion: str) -> str | None:
        """The answer a completion gives (for majority votes): all of it, whitespace-stripped."""
        return completion.strip() or None

    def rewards(self) -> list:
        """GRPO's reward functions for the task: the exact answer, and the answer's fixed-width format."""
        width = rf"[+-][0-9]{{{self.width - 1}}}" if self.op == "-" else rf"[0-9]{{{self.width}}}"

        def format_reward(prompts, completions, **columns):
            return [float(re.fullmatch(width, c) is not None) for c in completions]
        return [task_accuracy(self), format_reward]

    def wrong_answer(self, prompt: str, rng: np.random.Generator) -> str:
        """The right answer with one digit changed: a plausible mistake."""
        right = list(self.answer(prompt))
        digits = [i for i, ch in enumerate(right) if ch.isdigit()]
        i = int(rng.choice(digits))
        right[i] = str((int(right[i]) + int(rng.integers(1, 10))) % 10)
        return "".join(right)


class Sequence:
    """The real-model task: continue an arithmetic progression, "46, 50, 54, 58," → " 62".

    Plain text that a pretrained model already reads as a sequence to continue, and gets right some of the
    time: the real Gemma 3 270M answers 20% of the held-out problems greedily, and its wrong answers are all
    too small; GRPO removes that bias in minutes (README, "Real models"). First terms 0–99, steps 2–19, four
    terms shown: 1,800 problems, a quarter held out by a hash. A completion is right when its first number is
    the next term (the model may go on with the sequence).
    """

    terms = 4

    def held_out(self, prompt: str) -> bool:
        return zlib.crc32(prompt.encode()) % 4 == 0

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """n problems of the split ("train" or "eval") as {"prompt", "completion"} rows: the split's problems
        shuffled, repeated only when n is larger than the split."""
        rows = [{"prompt": p, "completion": " " + self.answer(p)} for p in
                (", ".join(str(a + i * d) for i in range(self.terms)) + "," for a in range(100) for d in range(2, 20))
                if self.held_out(p) == (split == "eval")]
        order = np.concatenate([np.random.default_rng([seed, split == "eval", k]).permutation(len(rows))
                                for k in range(-(-n // len(rows)))])
        return [rows[i] for i in order[:n]]

    def answer(self, prompt: str) -> str:
        *_, before, last = (int(x) for x in prompt.rstrip(",").split(","))
        return str(2 * last - before)

    def is_correct(self, prompt: str, completion: str) -> bool:
        """The completion's first number is the next term."""
        return self.parse(completion) == self.answer(prompt)

    def parse(self, completion: str) -> str | None:
        """The answer a completion gives: its first number (digits only: " 62, 66" is 62)."""
        first = re.search(r"[0-9]+", completion)
        return first.group() if first else None

    def rewards(self) -> list:
        """GRPO's reward function for the task: the next term first."""
        return [task_accuracy(self)]

    def wrong_answer(self, prompt: str, rng: np.random.Generator) -> str:
        """A plausible mistake: one step too many or too few."""
        *_, before, last = (int(x) for x in prompt.rstrip(",").split(","))
        return " " + str(last + (last - before) * int(rng.choice([0, 2])))


# ----------------------------------------------------------------------------- rewards: checks of completions
#
# A reward function is plain Python, (prompts, completions, **columns) -> list[float], where columns are
# the rows' other fields as lists (e.g. answer=[...]); grpo.py sums them with weights. Model output is
# parsed, never evaluated.

NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAG_FORMAT = re.compile(r"\s*(?:<think>.*?</think>\s*)?<answer>[^<]*</answer>\s*", re.DOTALL)


def parse_number(text: str) -> decimal.Decimal | None:
    """The last number in text ("1,234.5" → 1234.5) as an exact Decimal; None when there is none
    or it has more than 64 characters (never an answer, and never converted)."""
    found = NUMBER.findall(text)
    number = found[-1].replace(",", "") if found else ""
    return decimal.Decimal(number) if 0 < len(number) <= 64 else None


def answer_text(completion: str) -> str:
    """Where a completion's answer is: its last <answer>…</answer>'s content, or without tags all of it."""
    tags = ANSWER_TAG.findall(completion) if "</answer>" in completion else []
    return tags[-1] if tags else completion


def accuracy_reward(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the number in the completion's last <answer>…</answer> (without tags: its last
    number) equals the row's answer (after "####" if present, GSM8K's form) numerically."""
    rewards = []
    for completion, want in zip(completions, answer):
        got, want = parse_number(answer_text(completion)), parse_number(str(want).split("####")[-1])
        rewards.append(float(got is not None and got == want))
    return rewards


def math_verify_reward(prompts, completions, answer, **columns) -> list[float]:
    """accuracy_reward with Hugging Face's math-verify for the comparison (TRL's accuracy_reward uses it): the
    answer text and the row's answer parsed as LaTeX or expressions, equal symbolically ("1/2" = "0.5" =
    "\\frac{1}{2}"), each parse and comparison within math-verify's own 5-second timeout. An optional extra
    (pip install math-verify): without it, one line."""
    try:
        import math_verify
    except ImportError:
        raise ValueError("--checker math_verify needs the math-verify package: pip install math-verify") from None
    return [float(math_verify.verify(math_verify.parse(str(want).split("####")[-1]),
                                     math_verify.parse(answer_text(completion))))
            for completion, want in zip(completions, answer)]


def parsed_answer(completion: str) -> str | None:
    """The answer a completion gives, as accuracy_reward reads it (the number, normalised: "1,234.50" → "1234.5"),
    for majority votes; None when it gives none."""
    number = parse_number(answer_text(completion))
    return None if number is None else format(number.normalize(), "f")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021's unbiased estimate of the chance that at least one of k completions drawn from n, c of them
    correct, is: 1 − C(n − c, k) / C(n, k), as the product 1 − Π_{i=n−c+1..n} (1 − k/i) (no huge binomials)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


accuracy_reward.answer = math_verify_reward.answer = parsed_answer  # what majority votes count (sampled_metrics)


def sampled_eval(sample, model, rows, ids, n: int, seed: int, temperature: float, prefix: str = "eval/") -> dict:
    """n completions of each prompt drawn by sample (tools.Sampler) → sampled_metrics with k = 1, 2, 4, ... <= n:
    correct where the first reward function gives 1, votes on the answers it reads (its .answer)."""
    outs, per_func = sample(model, [r for r in rows for _ in range(n)], [i for i in ids for _ in range(n)], seed,
                            temperature)
    texts = [tools.final_answer(o) if sample.fns else sample.tok.decode(o.completion) for o in outs]
    answers = [sample.funcs[0].answer(t) for t in texts]
    return sampled_metrics((per_func[:, 0] >= 1).reshape(-1, n), [answers[i:i + n] for i in range(0, len(texts), n)],
                           [1 << i for i in range(n.bit_length())], prefix)


def sampled_metrics(correct: np.ndarray, answers: list[list], ks, prefix: str = "") -> dict:
    """correct [P, n] (each prompt's n completions) and their parsed answers [P][n] → pass@k for each k <= n (the
    mean over prompts), maj@n (the prompt's most frequent answer, None aside, ties to the first given, is a correct
    completion's) and mean@n (the fraction correct)."""
    P, n = correct.shape
    votes = []
    for row, given in zip(correct, answers):
        counts = {a: given.count(a) for a in given if a is not None}
        top = max(counts, key=counts.get) if counts else None  # dicts keep order: ties go to the first given
        votes.append(top is not None and bool(row[given.index(top)]))
    return {**{f"{prefix}pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct.sum(1)]))
               for k in ks if k <= n},
            f"{prefix}maj@{n}": float(np.mean(votes)), f"{prefix}mean@{n}": float(correct.mean())}


# The system prompt a pretrained model gets before each question (grpo.py with --data or GSM8K): the format
# that format_reward checks and accuracy_reward reads.
REASONING_PROMPT = ("First think about the problem step by step inside <think> </think>. Then give the final "
                    "answer, only the number, inside <answer> </answer>.")


def format_reward(prompts, completions, **columns) -> list[float]:
    """1.0 for "<think>…</think> <answer>…</answer>" (the think block optional), nothing else."""
    return [float(TAG_FORMAT.fullmatch(c) is not None) for c in completions]


def score(funcs, rows, completions, completion_ids=None) -> np.ndarray:
    """Rewards [N, F] of every reward function f(prompts, completions, completion_ids, **columns): functions see
    the rows' other columns as keyword lists."""
    columns = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion")}
    prompts, ids = [row["prompt"] for row in rows], completion_ids or [[]] * len(rows)
    return np.array([f(prompts, completions, completion_ids=ids, **columns) for f in funcs],
                    np.float64).T.reshape(len(rows), -1)


def soft_overlong_punishment(max_completion_len: int, cache: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13; TRL's get_soft_overlong_punishment), counted
    in tokens: 0 up to L_max − L_cache tokens, then falling linearly to −1 at L_max (and −1 past it)."""
    def soft_overlong_punishment(prompts, completions, completion_ids, **columns):
        start = max_completion_len - cache
        return [0.0 if len(ids) <= start else -1.0 if len(ids) > max_completion_len else (start - len(ids)) / cache
                for ids in completion_ids]
    return soft_overlong_punishment


def builtin_task(spec: str) -> Arithmetic | Sequence:
    """--task "op,a,b" (e.g. "*,3,1": Arithmetic) or "sequence" → the built-in task; ValueError naming the flag
    otherwise."""
    if spec == "sequence":
        return Sequence()
    try:
        op, a, b = spec.split(",")
        return Arithmetic(op, int(a), int(b))
    except ValueError as e:
        raise ValueError(f"bad --task {spec!r} (want e.g. *,3,1 or sequence): {e}") from None


def calculator_conversations(rows, prompt_ids, tok, family: str, max_completion_len: int, enable_thinking: bool = True,
                             n: int = 512) -> list[tuple[list[int], list[int]]]:
    """grpo's tool demo's warm-up data: n conversations that call the calculator on the problem ("123*456=" →
    expression "123*456"), then answer what it returned, as tools.scripted writes them (the tokens and masks of a
    sampled conversation: the tool result turn carries no loss). → (ids, loss mask) each."""
    end, examples = chat.end_of_turn_id(tok, family), []
    for row, ids in zip(rows[:n], prompt_ids[:n]):
        expression = row["prompt"].rstrip("=")
        call = tools.call_text(family, "calculator", {"expression": expression})
        r = tools.scripted(ids, [call, calculator(expression)], tok, family, [calculator], end,
                           max_completion_len, enable_thinking)
        examples.append((ids + r.completion, [0] * len(ids) + r.loss_mask))
    return examples


# ----------------------------------------------------------------------------- the tool demo's tool

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
             ast.USub: operator.neg, ast.UAdd: operator.pos}


LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")


def _arithmetic(node):
    """The value of a parsed expression made only of numbers, + - * / // % ** and parentheses."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in OPERATORS:
        return OPERATORS[type(node.op)](_arithmetic(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = _arithmetic(node.left), _arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError(f"exponent {right} is over 64")
        value = OPERATORS[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > 1024:
            raise ValueError("a number over 1024 bits")
        return value
    raise ValueError(f"{ast.unparse(node)!r} is not arithmetic")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses.

    Args:
        expression: the expression, e.g. "123*456"
    """
    if len(expression) > 200:
        raise ValueError("the expression is over 200 characters")
    expression = LEADING_ZEROS.sub("", expression.strip())  # "040" is 40 here (Python reads no such literal)
    value = _arithmetic(ast.parse(expression, mode="eval").body)  # parsed, never evaluated as Python
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 1e15 else str(value)
