"""MATH (Hendrycks et al., 2021), 4-shot, as Minerva scores it (Lewkowycz et al., 2022): the
model ends its solution with "Final Answer: The final answer is X. I hope it is correct.", and X
must equal the reference's \\boxed{} answer after both are normalized (units, $, \\text, spaces
and LaTeX spellings of the same expression removed: Minerva's appendix D).

lm-eval's minerva_math task does this too, but its module refuses to import without
math_verify and antlr4 4.11 (hydra pins antlr4 4.9), so the exact-match part lives here.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

_FINAL = re.compile(r"Final Answer: The final answer is (.*?)\. I hope it is correct\.", re.S)

_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
                  ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}")]
_REMOVED = ["square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
            "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
            "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
            "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}",
            "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots"]


def last_boxed(text: str) -> Optional[str]:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    if text.startswith("\\boxed ", start):
        return text[start + len("\\boxed "):].split("$")[0].strip()
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1:i]
    return None


def normalize(answer: str) -> str:
    """Minerva's normalization of a final answer (appendix D of Lewkowycz et al.)."""
    answer = answer.split("=")[-1]
    for expr in _REMOVED:  # units as whole words, before the spaces go ("ft" is not "\\left")
        if expr.isalpha():
            answer = re.sub(rf"(?<!\\)\b{expr}\b", "", answer)
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        if not expr.isalpha():
            answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def process_docs(dataset):
    """Each problem with its normalized reference answer (`answer`), the boxed part of its
    solution."""
    return dataset.map(lambda doc: {"problem": doc["problem"], "solution": doc["solution"],
                                    "answer": normalize(last_boxed(doc["solution"]) or "")})


def extract(generation: str) -> str:
    """The model's final answer: Minerva's closing sentence, else its last \\boxed{}."""
    match = _FINAL.search(generation)
    if match:
        return normalize(match.group(1))
    boxed = last_boxed(generation)
    return normalize(boxed) if boxed is not None else ""


def process_results(doc: Dict, results: List[str]) -> Dict[str, int]:
    return {"exact_match": int(bool(doc["answer"]) and extract(results[0]) == doc["answer"])}
