"""The offline multimodal smoke set: images rendered by code, questions whose answers follow from the
rendering, written in the MMMU-Pro (standard and vision) and MATH-Vision row schemas.

Three kinds of figure: shapes to count, a bar chart with each value printed on its bar, and a right
triangle / rectangle with labelled sides. The answer is computed from the same numbers that drew the
figure, so the set is correct by construction. Deterministic for a seed (PIL's PNG writer is too), so
the shipped files can be regenerated and compared.

    python src/eval/mm_smoke_data.py --out configs/data/mm_smoke
    bash pipelines/eval.sh --benchmarks mmmu_pro,math_vision \\
        --data-file mmmu_pro=configs/data/mm_smoke/mmmu_pro_{part}.jsonl --data-file math_vision=configs/data/mm_smoke/math_vision.jsonl ...
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import atomic_io

LETTERS = "ABCDEFGHIJ"
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (30, 160, 60)}
TRIPLES = ((3, 4, 5), (5, 12, 13), (6, 8, 10), (8, 15, 17), (9, 12, 15), (7, 24, 25))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def count_figure(rng: random.Random, n: int, color: str, size: int = 192):
    """n non-overlapping circles of `color` plus distractor squares of another colour."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    cells = [(x, y) for x in range(4) for y in range(4)]
    rng.shuffle(cells)
    other = next(c for c in COLORS if c != color)
    step, r = size // 4, size // 12
    for i, (x, y) in enumerate(cells[: n + 3]):
        cx, cy = x * step + step // 2, y * step + step // 2
        if i < n:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color], outline="black")
        else:
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[other], outline="black")
    return im


def bar_figure(values: list, size: int = 192):
    """Bars A.. with the value printed above each bar."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    font, top = _font(14), max(values)
    width = size // (len(values) + 1)
    for i, v in enumerate(values):
        x0 = width // 2 + i * width
        h = int((size - 50) * v / top)
        d.rectangle([x0 + 4, size - 20 - h, x0 + width - 4, size - 20], fill=(70, 130, 180), outline="black")
        d.text((x0 + width // 2, size - 24 - h), str(v), fill="black", font=font, anchor="mb")
        d.text((x0 + width // 2, size - 4), LETTERS[i], fill="black", font=font, anchor="mb")
    return im


def triangle_figure(a: int, b: int, size: int = 192):
    """A right triangle with legs labelled a and b (the hypotenuse unlabelled)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    font, scale = _font(16), (size - 50) / max(a, b)
    x0, y0 = 30, size - 25
    pts = [(x0, y0), (x0 + b * scale, y0), (x0, y0 - a * scale)]
    d.polygon(pts, outline="black", width=2)
    d.rectangle([x0, y0 - 10, x0 + 10, y0], outline="black")
    d.text((x0 - 6, y0 - a * scale / 2), str(a), fill="black", font=font, anchor="rm")
    d.text((x0 + b * scale / 2, y0 + 4), str(b), fill="black", font=font, anchor="mt")
    return im


def screenshot(figure, question: str, options: list, width: int = 384):
    """MMMU-Pro vision setting: the question and its options rendered into one image with the figure."""
    from PIL import Image, ImageDraw

    font = _font(14)
    lines = [question, *[f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]]
    height = figure.height + 20 + 18 * len(lines) + 10
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    y = 8
    for line in lines:
        d.text((8, y), line, fill="black", font=font)
        y += 18
    im.paste(figure, ((width - figure.width) // 2, y + 10))
    return im


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _ten_options(rng: random.Random, answer: int) -> tuple[list, str]:
    """Ten distinct integers containing the answer, in ascending order (the gold letter follows)."""
    pool = sorted({answer, *rng.sample([v for v in range(max(0, answer - 9), answer + 12) if v != answer], 9)})
    return [str(v) for v in pool], LETTERS[pool.index(answer)]


def items(seed: int = 0, per_kind: int = 4) -> list:
    """[{kind, key, figure, question, answer(int), mc: bool}] — the questions and their true answers."""
    rng = random.Random(seed)
    out = []
    for i in range(per_kind):
        n, color = rng.randint(2, 9), rng.choice(sorted(COLORS))
        out.append({"kind": "count", "key": f"count_{i}", "figure": count_figure(rng, n, color),
                    "question": f"How many {color} circles are in the image?", "answer": n})
    for i in range(per_kind):
        values = rng.sample(range(2, 30), 4)
        if i % 2:
            q, ans = "What is the sum of the values of bars B and C?", values[1] + values[2]
        else:
            q, ans = "What is the value of the tallest bar?", max(values)
        out.append({"kind": "bar", "key": f"bar_{i}", "figure": bar_figure(values), "question": q, "answer": ans})
    for i in range(per_kind):
        a, b, c = TRIPLES[(i + seed) % len(TRIPLES)]
        out.append({"kind": "geometry", "key": f"geometry_{i}", "figure": triangle_figure(a, b),
                    "question": "The figure shows a right triangle with the two legs labelled. "
                                "How long is the hypotenuse?", "answer": c})
    return out


def rows(seed: int = 0, per_kind: int = 4) -> tuple[dict, dict]:
    """({file name: rows}, {image path: png bytes}) of the whole smoke set."""
    rng = random.Random(seed + 1)
    standard, vision, mathv, images = [], [], [], {}
    for n, it in enumerate(items(seed, per_kind)):
        fig_path = f"images/{it['key']}.png"
        images[fig_path] = _png(it["figure"])
        opts, gold = _ten_options(rng, it["answer"])
        subject = {"count": "Counting", "bar": "Charts", "geometry": "Geometry"}[it["kind"]]
        standard.append({"id": f"smoke_{it['key']}", "question": f"<image 1> {it['question']}",
                         "options": repr(opts), "answer": gold, "image_1": fig_path,
                         **{f"image_{k}": None for k in range(2, 8)}, "subject": subject,
                         "img_type": "['Diagrams']", "topic_difficulty": "Easy",
                         "explanation": f"Rendered with answer {it['answer']}."})
        shot_path = f"images/vision_{it['key']}.png"
        images[shot_path] = _png(screenshot(it["figure"], it["question"], opts))
        vision.append({"id": f"smoke_{it['key']}", "image": shot_path, "options": repr(opts), "answer": gold,
                       "subject": subject})
        if it["kind"] == "bar":  # MATH-Vision multiple choice: five options
            five = sorted({it["answer"], *rng.sample([v for v in range(it["answer"] - 6, it["answer"] + 7)
                                                      if v != it["answer"]], 4)})
            mv_opts, mv_answer = [str(v) for v in five], LETTERS[five.index(it["answer"])]
        else:
            mv_opts, mv_answer = [], str(it["answer"])
        mathv.append({"id": str(n + 1), "question": f"<image1>\n{it['question']}", "options": mv_opts,
                      "image": fig_path, "decoded_image": fig_path, "answer": mv_answer,
                      "solution": f"Rendered with answer {it['answer']}.", "level": 1,
                      "subject": it["kind"]})
    files = {"mmmu_pro_standard.jsonl": standard, "mmmu_pro_vision.jsonl": vision, "math_vision.jsonl": mathv}
    return files, images


def write(out: Path, seed: int = 0, per_kind: int = 4) -> list:
    files, images = rows(seed, per_kind)
    written = []
    for rel, data in images.items():
        atomic_io.write_bytes(out / rel, data)
        written.append(out / rel)
    for name, rs in files.items():
        atomic_io.write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs))
        written.append(out / name)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mm_smoke_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="configs/data/mm_smoke", help="output folder (default configs/data/mm_smoke)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-kind", type=int, default=4, help="questions per figure kind (default 4)")
    args = ap.parse_args(argv)
    written = write(Path(args.out), args.seed, args.per_kind)
    print(f"wrote {len(written)} files under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
