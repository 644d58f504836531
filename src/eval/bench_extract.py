"""Answer extraction from model output: pure string functions, no I/O, never raising on any str.

Shared rules (docs/BENCHMARKS.md):
  * Thinking models: only the text after the last `</think>` is searched; a `<think>` that was never
    closed (generation cut off mid-thought) has no answer at all, even if the thought names one.
  * Where several candidates appear the LAST one wins (models restate, correct themselves, then conclude).
  * Nothing found is `None`; callers score it wrong and count it as no-answer. There is no guessing.
  * Every function is linear in its input: a looping or replayed output of megabytes must not stall a
    run. Hence possessive quantifiers (`*+`, Python >= 3.11) wherever whitespace runs meet, anchored
    `.match(text, pos)` instead of slicing, and one brace-matching pass instead of a scan per `\boxed{`.
"""
from __future__ import annotations

import re
import unicodedata

LETTERS = "ABCDEFGHIJ"

# "Answer:" as the MMMLU locales write it (the prompt asks for the locale's own marker; all are accepted
# everywhere, plus English, because models switch language mid-answer).
LOCALE_ANSWER_MARKERS = {
    "AR_XY": ("الإجابة", "الاجابة", "الجواب"),
    "BN_BD": ("উত্তর",),
    "DE_DE": ("Antwort",),
    "ES_LA": ("Respuesta",),
    "FR_FR": ("Réponse", "Reponse"),
    "HI_IN": ("उत्तर",),
    "ID_ID": ("Jawaban",),
    "IT_IT": ("Risposta",),
    "JA_JP": ("答え", "解答", "回答"),
    "KO_KR": ("정답", "답변", "답"),
    "PT_BR": ("Resposta",),
    "SW_KE": ("Jibu",),
    "YO_NG": ("Ìdáhùn", "Idahun"),
    "ZH_CN": ("答案", "回答"),
}
ALL_ANSWER_MARKERS = ("Answer", "Final Answer", *sorted({m for ms in LOCALE_ANSWER_MARKERS.values() for m in ms},
                                                        key=len, reverse=True))

# Option letters as non-Latin scripts write them (MMMLU locales answer with their own alphabet sometimes).
SCRIPT_LETTERS = {"أ": "A", "ا": "A", "ب": "B", "ج": "C", "د": "D",
                  "অ": "A", "ব": "B", "ড": "C", "ঢ": "D"}

_SCRIPT_LETTER = re.compile("(?<![\\w])(?:" + "|".join(map(re.escape, SCRIPT_LETTERS)) + ")(?![\\w])")
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)


def final_segment(text: str | None) -> str | None:
    """The part of an output that may hold the answer (see module doc); None when there is none."""
    if not isinstance(text, str):
        return None
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end():]
    if _THINK_OPEN.search(text):
        return None
    return text


def _normalize_letters(text: str) -> str:
    """Fullwidth Ａ-Ｊ and parenthesised forms to ASCII, so one regex covers CJK outputs."""
    return unicodedata.normalize("NFKC", text)


def _letter_class(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def extract_choice(text: str | None, letters: str = LETTERS, markers: tuple = ALL_ANSWER_MARKERS) -> str | None:
    """Multiple-choice letter, cascade (each stage takes its last match; first stage that matches wins):
    1. "answer is (X)" / "answer is: **X**"   2. "<marker>: X" ("Answer:", "Respuesta:", "答案：", ...)
    3. \\boxed{X}   4. the last standalone option letter.  Letters outside `letters` never count."""
    seg = final_segment(text)
    if not seg:
        return None
    seg = _normalize_letters(seg)
    seg = _SCRIPT_LETTER.sub(lambda m: SCRIPT_LETTERS[m.group()], seg)
    L = _letter_class(letters)
    # Possessive runs: a letter never follows whitespace given back, so nothing is lost, and a megabyte of
    # spaces after "answer is" costs one pass instead of a cubic backtrack. The closing run stays greedy: it
    # gives its spaces back at most once per candidate letter.
    wrap_open, wrap_close = r"[\s*_`\"'“]*+[\(\[]?+\s*+", r"\s*[\)\]]?"
    stages = [
        rf"answer\s++is\s*+[:：]?+{wrap_open}({L}){wrap_close}(?![\w])",
        r"(?:" + "|".join(re.escape(m) for m in markers) + r")[\s*_]*+[:：]" + wrap_open + rf"({L}){wrap_close}(?![\w])",
        rf"\\boxed\s*+\{{\s*+(?:\\text\{{)?+\s*+\(?+({L})\)?+\s*+\}}?\s*+\}}",
        rf"(?<![\w\\])\(?({L})\)?(?![\w'’])",
    ]
    for i, pattern in enumerate(stages[:3]):
        flags = re.IGNORECASE if i < 2 else 0
        # Upper-case letters only, even when the marker match is case-insensitive ("answer is a" is prose).
        hits = [m.group(1) for m in re.finditer(pattern, seg, flags)
                if m.group(1) in letters and not _reads_as_word(seg, m)]
        if hits:
            return hits[-1]
    return _last_standalone_letter(re.compile(stages[3]), seg, letters)


def _last_standalone_letter(pattern: re.Pattern, seg: str, letters: str) -> str | None:
    """Stage 4 from the end: scan a tail window, doubling it until a letter is found (a match is at most
    three characters and its lookarounds see the whole text, so the window edge changes nothing). A text
    full of letters costs one short window instead of a Python step per letter."""
    size = 4096
    while True:
        start = max(0, len(seg) - size)
        last = None
        for m in pattern.finditer(seg, start):
            if m.group(1) in letters and not _reads_as_word(seg, m):
                last = m.group(1)
        if last is not None or start == 0:
            return last
        size *= 2


_WORD_AFTER = re.compile(r"\s++[a-z]")


def _reads_as_word(seg: str, match: re.Match) -> bool:
    """'A' and 'I' followed by a lower-case word are English ("I think", "A cat"), not option letters."""
    return match.group(1) in "AI" and _WORD_AFTER.match(seg, match.end()) is not None


def last_boxed(text: str | None) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces balanced; None if absent or unclosed."""
    seg = final_segment(text)
    if not seg:
        return None
    closing = matching_braces(seg)
    starts = list(_BOXED_OPEN.finditer(seg))
    for m in reversed(starts):
        close = closing.get(m.end() - 1)
        if close is not None:
            return seg[m.end(): close].strip()
    bare = list(_BOXED_BARE.finditer(seg))  # "\boxed 5" is valid TeX too
    return bare[-1].group(1) if bare else None


_BOXED_OPEN = re.compile(r"\\(?:boxed|fbox)\s*+\{")
_BOXED_BARE = re.compile(r"\\boxed\s++([^\s$\\]+)")
_BRACE = re.compile(r"[{}]")


def matching_braces(text: str) -> dict:
    """{index of '{': index of its '}'} for every brace that closes, in one pass over the braces. A '{'
    closes where the text after it first holds more '}' than '{', which is what a stack pairs it with."""
    stack, pairs = [], {}
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


def extract_math_answer(text: str | None) -> str | None:
    """Last \\boxed{} answer; otherwise the text of a final "answer is ..." / "Answer: ..." line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    seg = final_segment(text)
    if not seg:
        return None
    hits = re.findall(r"(?:final answer|answer)\s*+(?:is|[:：])\s*+[:：]?+\s*+([^\n]+)", seg, re.IGNORECASE)
    if not hits:
        return None
    answer = hits[-1].strip().strip("*").strip().rstrip(".").strip()
    answer = answer.strip("$").strip()
    return answer.rstrip(".").strip() or None


def extract_integer(text: str | None) -> str | None:
    """AIME-style integer answer as a canonical string ("033" -> "33"); None if the answer is not an integer."""
    raw = extract_math_answer(text)
    if raw is None:
        return None
    cleaned = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", raw)
    cleaned = re.sub(r"\^\s*+\{?\\circ\}?|\\[,;!]|\\ |[\s$]", "", cleaned).replace("{", "").replace("}", "")
    cleaned = cleaned.replace(",", "") if re.fullmatch(r"\d{1,3}+(,\d{3})++", cleaned) else cleaned
    m = re.fullmatch(r"[+]?(\d++)(?:\.0*+)?", cleaned)
    return (m.group(1).lstrip("0") or "0") if m else None


_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*$", re.MULTILINE)
PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def extract_code(text: str | None, tags: set = PYTHON_TAGS) -> str | None:
    """Last fenced code block whose language tag is in `tags` (else the last block of any language).

    A final fence that was opened but never closed (output cut off) is salvaged up to the end of text.
    With no fence at all there is no code: prose is never executed as a program."""
    seg = final_segment(text)
    if not seg:
        return None
    blocks = []  # (tag, body)
    pos = 0
    while True:
        m = _FENCE.search(seg, pos)
        if not m:
            break
        fence, tag = m.group(1), m.group(2).lower()
        body_start = m.end() + 1
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.MULTILINE).search(seg, body_start)
        if close is None:
            blocks.append((tag, seg[body_start:]))
            break
        blocks.append((tag, seg[body_start: close.start()]))
        pos = close.end()
    if not blocks:
        return None
    preferred = [b for t, b in blocks if t in tags] or [b for _, b in blocks]
    code = preferred[-1].rstrip()
    return code if code.strip() else None


def extract_final_line(text: str | None, markers: tuple = ("Exact Answer", "Final Answer", "Answer")) -> str | None:
    """HLE-style "Answer: <free text>" (last one); the rest of that line, stripped of markdown emphasis."""
    seg = final_segment(text)
    if not seg:
        return None
    pattern = r"(?:" + "|".join(re.escape(m) for m in markers) + r")[\s*_]*+[:：]\s*+(.+)"
    hits = re.findall(pattern, seg, re.IGNORECASE)
    if not hits:
        return None
    answer = hits[-1].strip().strip("*_").strip()
    return answer or None


def normalize_free_text(text: str | None) -> str:
    """For exact-match without a judge: case, width, spacing, surrounding $/quotes and a final period
    do not matter; everything else does."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKC", text).casefold().strip()
    t = t.strip("$").strip()
    t = re.sub(r"\\text\{([^{}]*)\}", r"\1", t)
    t = t.strip(" \t\"'`“”‘’").rstrip(".").strip()
    return re.sub(r"\s+", " ", t)
