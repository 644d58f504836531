"""MMLU-Pro's official scoring, written from its published definition (TIGER-AI-Lab/MMLU-Pro
evaluate_from_local.py: extract_answer -> extract_again -> extract_final, then save_res' guess). Test and
bench reference only: it shares no code with the harness it checks."""
import random
import re


def reference_scores(rows):
    """[(pred or None, correct)] per row, the way the official script scores one model's results:
    the random stream is seeded once per run (per model here), one draw per unanswered question."""
    rngs = {}
    out = []
    for row in rows:
        rng = rngs.setdefault(row["model"], random.Random(12345))
        text = row["generated_text"]
        first = re.search(r"answer is \(?([A-J])\)?", text)
        if first:
            pred = first.group(1)
        else:
            second = re.search(r".*[aA]nswer:\s*([A-J])", text)
            if second:
                pred = second.group(1)
            else:
                last = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", text, re.DOTALL)
                pred = last.group(0) if last else None
        if pred:
            out.append((pred, pred == row["answer"]))
        else:
            n_shown = sum(1 for o in row["options"] if o != "N/A")
            out.append((None, rng.randint(0, n_shown - 1) == row["answer_index"]))
    return out
