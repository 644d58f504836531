"""Writes the offline smoke set next to this script, in the benchmarks' own schemas:

* mmlu_pro_easy.jsonl  (MMLU-Pro columns: question_id, question, options[10], answer, answer_index, ...)
* math500_easy.jsonl   (MATH-500 columns: problem, solution, answer, subject, level, unique_id)

Why EASY: the offline smoke runs SmolLM2-135M-Instruct, a very small model. On real MMLU-Pro / MATH-500
it sits at chance, so a quantization loss could not show. These questions (one-step facts, obvious
four-way multiple choice, single-step arithmetic) keep the teacher well above chance, so a teacher-vs-
quant difference is measurable. They were written for this project; they are not from any dataset.

The multiple-choice answer position is spread over A-D by a fixed seeded shuffle (so "always A" scores
~25 %), and the six unused MMLU-Pro option slots hold "N/A" exactly as MMLU-Pro pads short rows (the
loader drops them, so the model sees four options).

Re-run after editing a question:  python configs/data/smoke/make_smoke_set.py
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601  # fixes the answer positions; changing it changes every gold letter
N_OPTIONS = 10  # MMLU-Pro rows always have ten option slots

# (category, question, correct answer, three wrong answers)
MULTIPLE_CHOICE = [
    ("other", "What is the capital of France?", "Paris", ["London", "Berlin", "Madrid"]),
    ("biology", "How many legs does a spider have?", "8", ["4", "6", "10"]),
    ("other", "What colour is the sky on a clear sunny day?", "Blue", ["Green", "Red", "Black"]),
    ("physics", "Which planet do people live on?", "Earth", ["Mars", "Jupiter", "Neptune"]),
    ("math", "What is 2 + 2?", "4", ["3", "5", "22"]),
    ("biology", "Which animal says \"moo\"?", "Cow", ["Cat", "Dog", "Duck"]),
    ("chemistry", "What is frozen water called?", "Ice", ["Steam", "Sand", "Oil"]),
    ("other", "How many days are in a week?", "7", ["5", "10", "12"]),
    ("biology", "What do bees make?", "Honey", ["Milk", "Wool", "Glass"]),
    ("chemistry", "Which gas do humans need to breathe to stay alive?", "Oxygen", ["Helium", "Neon", "Argon"]),
    ("other", "How many hours are in one day?", "24", ["12", "60", "100"]),
    ("other", "What is the opposite of \"hot\"?", "Cold", ["Warm", "Red", "Loud"]),
    ("health", "Which of these is a fruit?", "Apple", ["Carrot", "Potato", "Onion"]),
    ("physics", "At sea level, water boils at how many degrees Celsius?", "100", ["0", "37", "500"]),
    ("history", "Who wrote the play \"Romeo and Juliet\"?", "William Shakespeare",
     ["Isaac Newton", "Albert Einstein", "Charles Darwin"]),
    ("math", "What is 10 minus 3?", "7", ["13", "3", "30"]),
    ("health", "Which organ pumps blood around the body?", "Heart", ["Lung", "Stomach", "Skin"]),
    ("other", "What is the capital of Japan?", "Tokyo", ["Beijing", "Seoul", "Bangkok"]),
    ("math", "How many sides does a triangle have?", "3", ["4", "5", "6"]),
    ("chemistry", "What is the chemical formula of water?", "H2O", ["CO2", "NaCl", "O3"]),
    ("other", "Which season is usually the coldest?", "Winter", ["Summer", "Spring", "Autumn"]),
    ("biology", "What do green plants need from the Sun to make their food?", "Light", ["Sound", "Salt", "Plastic"]),
    ("biology", "Which animal is called the king of the jungle?", "Lion", ["Mouse", "Rabbit", "Frog"]),
    ("physics", "What is the largest planet in our solar system?", "Jupiter", ["Mercury", "Mars", "Pluto"]),
    ("other", "Which language is mainly spoken in Spain?", "Spanish", ["Russian", "Japanese", "Hindi"]),
    ("math", "What is 5 times 2?", "10", ["7", "3", "52"]),
    ("other", "Which musical instrument has black and white keys?", "Piano", ["Drum", "Trumpet", "Flute"]),
    ("computer science", "Which part of a computer shows pictures to the user?", "Monitor",
     ["Keyboard", "Mouse", "Power cable"]),
    ("physics", "What does a thermometer measure?", "Temperature", ["Weight", "Length", "Time"]),
    ("economics", "What currency is used in the United States?", "Dollar", ["Euro", "Yen", "Rupee"]),
    ("computer science", "Which of these is a programming language?", "Python", ["Banana", "Granite", "Violet"]),
    ("history", "Who was the first President of the United States?", "George Washington",
     ["Napoleon Bonaparte", "Julius Caesar", "Genghis Khan"]),
    ("biology", "What is a baby dog called?", "Puppy", ["Kitten", "Calf", "Chick"]),
    ("math", "Which shape is perfectly round?", "Circle", ["Square", "Triangle", "Rectangle"]),
    ("health", "What is the main ingredient of bread?", "Flour", ["Rocks", "Glass", "Paper"]),
    ("physics", "At what temperature in degrees Celsius does water freeze?", "0", ["100", "50", "1000"]),
    ("other", "How many months are in a year?", "12", ["10", "7", "24"]),
    ("health", "Which body part do people use to see?", "Eyes", ["Ears", "Nose", "Feet"]),
    ("psychology", "What do people usually do when they are happy?", "Smile", ["Cry", "Sneeze", "Cough"]),
    ("other", "What is the capital of Italy?", "Rome", ["Paris", "Vienna", "Oslo"]),
    ("physics", "What falls from the clouds when it rains?", "Water", ["Sand", "Fire", "Smoke"]),
    ("physics", "Which material is attracted to a magnet?", "Iron", ["Wood", "Glass", "Paper"]),
    ("business", "What does a bank keep safe for its customers?", "Money", ["Weather", "Sleep", "Music"]),
    ("business", "A shop that earns more money than it spends makes a", "Profit", ["Loss", "Debt", "Deficit"]),
    ("engineering", "Which tool is used to cut paper?", "Scissors", ["Spoon", "Pillow", "Cup"]),
    ("biology", "Which animal is the tallest?", "Giraffe", ["Mouse", "Cat", "Pig"]),
    ("other", "Which is the largest continent?", "Asia", ["Australia", "Europe", "Antarctica"]),
    ("law", "Judges in a court decide cases according to the", "Law", ["Weather", "Menu", "Recipe"]),
    ("history", "In which country are the ancient pyramids of Giza?", "Egypt", ["Canada", "Brazil", "Norway"]),
    ("math", "What is 3 + 4?", "7", ["6", "8", "34"]),
    ("biology", "What colour are most tree leaves in summer?", "Green", ["Blue", "Purple", "White"]),
    ("engineering", "Which vehicle flies in the sky?", "Airplane", ["Bicycle", "Car", "Boat"]),
    ("math", "Which number is the largest?", "100", ["10", "1", "50"]),
    ("philosophy", "A person who loves wisdom and asks deep questions about life is called a", "Philosopher",
     ["Plumber", "Baker", "Pilot"]),
]

# (subject, problem in LaTeX, answer)
MATH = [
    ("Prealgebra", "What is $3 + 4$?", "7"),
    ("Prealgebra", "What is $10 - 6$?", "4"),
    ("Prealgebra", "What is $2 \\times 5$?", "10"),
    ("Prealgebra", "What is $9 + 1$?", "10"),
    ("Prealgebra", "What is $8 - 3$?", "5"),
    ("Prealgebra", "What is $6 + 6$?", "12"),
    ("Prealgebra", "What is $4 \\times 3$?", "12"),
    ("Prealgebra", "What is $20 \\div 4$?", "5"),
    ("Prealgebra", "What is $15 + 5$?", "20"),
    ("Prealgebra", "What is $100 - 1$?", "99"),
    ("Prealgebra", "What is $7 \\times 2$?", "14"),
    ("Prealgebra", "What is $1 + 1$?", "2"),
    ("Prealgebra", "What is $12 - 2$?", "10"),
    ("Prealgebra", "What is $3 \\times 3$?", "9"),
    ("Prealgebra", "What is $50 + 50$?", "100"),
    ("Prealgebra", "What is $9 - 9$?", "0"),
    ("Prealgebra", "What is $18 \\div 2$?", "9"),
    ("Prealgebra", "What is $5 + 7$?", "12"),
    ("Prealgebra", "What is $11 + 11$?", "22"),
    ("Prealgebra", "What is $6 \\times 1$?", "6"),
    ("Prealgebra", "Tom has 3 apples and buys 2 more. How many apples does he have now?", "5"),
    ("Prealgebra", "A box holds 4 pens. How many pens are in 2 boxes?", "8"),
    ("Prealgebra", "There are 10 birds on a tree and 4 fly away. How many birds are left?", "6"),
    ("Prealgebra", "Sara is 8 years old. How old will she be in 2 years?", "10"),
    ("Prealgebra", "What is half of 10?", "5"),
    ("Prealgebra", "What is double 6?", "12"),
    ("Algebra", "If $x + 2 = 5$, what is $x$?", "3"),
    ("Algebra", "If $2x = 8$, what is $x$?", "4"),
    ("Algebra", "What is $10^2$?", "100"),
    ("Algebra", "What is the next number in the sequence 2, 4, 6, 8, ...?", "10"),
    ("Prealgebra", "How many minutes are in one hour?", "60"),
    ("Prealgebra", "What is $25 + 25$?", "50"),
    ("Geometry", "A rectangle has length 3 and width 2. What is its area?", "6"),
    ("Prealgebra", "What is $0 + 7$?", "7"),
    ("Prealgebra", "What is $30 - 10$?", "20"),
    ("Prealgebra", "What is the sum of 2, 3 and 4?", "9"),
    ("Prealgebra", "What is $4 + 4 + 4$?", "12"),
    ("Algebra", "If $y - 1 = 4$, what is $y$?", "5"),
    ("Prealgebra", "What is $\\frac{1}{2} + \\frac{1}{2}$?", "1"),
    ("Geometry", "How many sides does a square have?", "4"),
]


def mmlu_pro_rows(seed: int = SEED) -> list:
    rng = random.Random(seed)
    rows = []
    for i, (category, question, correct, wrong) in enumerate(MULTIPLE_CHOICE):
        if len(wrong) != 3:
            raise ValueError(f"question {i} ({question!r}) needs exactly three wrong answers, got {len(wrong)}")
        position = rng.randrange(4)
        options = list(wrong)
        options.insert(position, correct)
        options += ["N/A"] * (N_OPTIONS - len(options))
        rows.append({"question_id": 90000 + i, "question": question, "options": options,
                     "answer": "ABCD"[position], "answer_index": position, "cot_content": "",
                     "category": category, "src": "moe-lowbit-smoke"})
    return rows


def math500_rows() -> list:
    rows = []
    for i, (subject, problem, answer) in enumerate(MATH):
        rows.append({"problem": problem, "solution": f"The answer is $\\boxed{{{answer}}}$.", "answer": answer,
                     "subject": subject, "level": 1, "unique_id": f"smoke/{subject.lower()}/{i:03d}.json"})
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    write_jsonl(HERE / "mmlu_pro_easy.jsonl", mmlu_pro_rows())
    write_jsonl(HERE / "math500_easy.jsonl", math500_rows())
    print(f"wrote {len(MULTIPLE_CHOICE)} multiple-choice and {len(MATH)} math rows to {HERE}")


if __name__ == "__main__":
    main()
