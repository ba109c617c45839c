"""Build the prompt set for the SmolLM2 drafter's self-distillation from offline sources.

    python scripts/distill_prompts.py --doc-dir DIR --fortunes-dir DIR --out runs/distill-prompts.jsonl

Sources, mixed and shuffled with a fixed seed so any prefix is a fair sample:
- hand-written templates x topics (explanations, tips, recipes, code questions, poems);
- the Python library reference titles (Debian python3.11-doc, `_sources/library/*.rst.txt`);
- functions of the Python standard library with a docstring ("write a function that ...");
- short sayings from Debian's fortunes ("what does this saying mean");
- optionally (--api) the functions and methods the library reference documents, one
  question each: the larger set for a GPU run (data/distill-prompts-large.jsonl);
- optionally (--wordnet-dir) everyday things from WordNet (Debian wordnet-base): animals,
  plants, foods, objects, artifacts, phenomena, processes and events that the tagged corpus
  uses, each with a question shaped like a chat request ("How does a kettle work?",
  "What causes frost?"), for topics far beyond the hand-written list; --wordnet-files picks
  other kinds (acts, qualities, feelings, places, people's roles...: the second slice,
  data/distill-prompts-wordnet2.jsonl).
The prompts of benchmarks/ and the evaluation task set are held out: any prompt that names
one of their topics is dropped, so measured acceptance is on prompts never trained on.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sysconfig
from pathlib import Path

TEMPLATES = [
    "Explain {} in two sentences.", "What is {}? Answer briefly.", "Give me three facts about {}.",
    "Write a short paragraph about {}.", "Why is {} important?", "Describe {} to a child.",
    "Write a haiku about {}.", "List the pros and cons of {}.",
]
TOPICS = """photosynthesis|the moon|volcanoes|the water cycle|gravity|electricity|the internet|rainbows|
earthquakes|the human heart|democracy|the Roman Empire|the printing press|honey bees|climate change|
black holes|recycling|the French Revolution|vaccines|coffee|chess|the Great Wall of China|penguins|
solar panels|the stock market|inflation|DNA|the immune system|music theory|jazz|the Olympic Games|
deserts|coral reefs|the Renaissance|Shakespeare|the piano|friendship|sleep|exercise|meditation|
trees|oceans|clouds|thunderstorms|the alphabet|mathematics|prime numbers|fractions|algebra|
machine learning|computers|smartphones|bicycles|trains|airplanes|rockets|Mars|the sun|stars|
dinosaurs|elephants|cats|dogs|whales|rivers|mountains|glaciers|bread|cheese|tea|chocolate|
gardening|painting|photography|libraries|museums|newspapers|email|passwords|robots|batteries|
magnets|light|sound|rain|snow|wind|fire|maps|clocks|calendars|money|taxes|banks|cities|farming""".replace("\n", "").split("|")
ACTIVITIES = """learning a new language|saving money|cooking at home|running a marathon|writing an essay|
public speaking|working from home|keeping a journal|learning to code|reading more books|making friends|
preparing for a job interview|planning a trip|growing tomatoes|taking better photos|sleeping well|
staying healthy in winter|learning the guitar|organizing a closet|managing time""".replace("\n", "").split("|")
ACTIVITY_TEMPLATES = ["What are three tips for {}?", "How do I get started with {}?", "Give me advice on {}."]
FOODS = "soup|pasta|an omelette|banana bread|guacamole|fried rice|a salad|cookies|lemonade|a smoothie".split("|")
CODE_TASKS = """computes the factorial of a number|checks whether a string is a palindrome|counts the vowels in a string|
merges two sorted lists|finds the largest number in a list|removes duplicates from a list|converts Celsius to Fahrenheit|
computes the nth Fibonacci number|reads a file and counts its lines|sorts a dictionary by value|flattens a nested list|
returns the average of a list of numbers|capitalizes every word in a sentence|checks whether a year is a leap year|
computes the greatest common divisor of two numbers|splits a list into chunks of size n|finds the second largest number|
reverses the words in a sentence|counts word frequencies in a text|validates an email address""".replace("\n", "").split("|")
PYTHON_HOWTO = """sort a list of tuples|read a CSV file|open a file safely|use a dictionary|write a class|
handle exceptions|use list comprehensions|parse JSON|format a string|use f-strings|iterate over two lists at once|
measure how long code takes|make an HTTP request|use a virtual environment|write a unit test|use a set|
create a generator|use lambda functions|convert a string to an integer|join a list of strings""".replace("\n", "").split("|")
# topics of benchmarks/ prompt sets and the evaluation tasks: never trained on
HELD_OUT = re.compile(r"sky is blue|prime|focused while studying|romeo|reverse a list|pancake|seasons|refrigerator|"
                      r"autumn|stack and a queue|binary search|tides|clear email|suspension bridge|lighthouse|"
                      r"occurrences of each", re.IGNORECASE)


def templated() -> list[str]:
    prompts = [t.format(x) for t in TEMPLATES for x in TOPICS]
    prompts += [t.format(a) for t in ACTIVITY_TEMPLATES for a in ACTIVITIES]
    prompts += [f"Give me a short recipe for {f}." for f in FOODS]
    prompts += [f"Write a Python function that {t}." for t in CODE_TASKS]
    prompts += [f"How do I {h} in Python?" for h in PYTHON_HOWTO]
    return prompts


def library_titles(doc_dir: Path) -> list[str]:
    """':mod:`argparse` --- Parser for command-line options' -> questions about argparse."""
    prompts = []
    for path in sorted((doc_dir / "library").glob("*.rst.txt")):
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        match = re.match(r":mod:`([\w.]+)` -+ (.+)", first[0]) if first else None
        if match:
            module, what = match.groups()
            prompts.append(f"What is the Python {module} module for? ({what.strip()})")
            prompts.append(f"Show a short example of using Python's {module} module.")
    return prompts


API_QUESTIONS = ["What does {} do in Python? Show a short example.", "How do I use {} in Python?"]
DIRECTIVE = re.compile(r"^(\s*)\.\. (module|currentmodule|class|function|method)::\s*([\w.]+)")


def api_entries(doc_dir: Path) -> list[str]:
    """`.. function:: dumps(obj)` under `.. module:: json` -> a question about json.dumps."""
    prompts = []
    for path in sorted((doc_dir / "library").glob("*.rst.txt")):
        module = cls = None
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = DIRECTIVE.match(line)
            if not match:
                continue
            indent, kind, name = match.groups()
            if kind in ("module", "currentmodule"):
                module, cls = name, None
            elif kind == "class":
                cls = name
            elif kind == "function" or (kind == "method" and indent and cls):
                owner = cls if kind == "method" else module
                qualified = name if "." in name or not owner else f"{owner}.{name}"
                prompts.append(API_QUESTIONS[len(prompts) % 2].format(f"`{qualified}`"))
    return prompts


def stdlib_functions(limit: int) -> list[str]:
    """Public top-level functions with a one-line docstring summary."""
    root = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else None
            if doc and not node.name.startswith("_"):
                summary = doc.strip().splitlines()[0].rstrip(".")
                if 15 < len(summary) < 100:
                    prompts.append(f"Write a Python function named {node.name} that does this: {summary}.")
    return prompts[:limit] if len(prompts) <= limit else random.Random(1).sample(prompts, limit)


def sayings(fortunes_dir: Path, limit: int) -> list[str]:
    quotes = []
    for name in ("wisdom", "education", "work", "people", "science"):
        path = fortunes_dir / name
        if path.exists():
            for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
                text = " ".join(entry.split())
                if 20 < len(text) < 140 and "--" not in text:
                    quotes.append(f'What does this saying mean? "{text}"')
    return random.Random(2).sample(quotes, min(limit, len(quotes)))


# WordNet's lexicographer files (lex_filenum in data.noun) whose nouns make chat topics, with
# the requests that fit them
WORDNET_TEMPLATES = {
    5: ["Give me three facts about the {}.", "Where does the {} live and what does it eat?", "Describe a {} to a child."],
    6: ["How does a {} work?", "What is a {} used for?", "Write a short poem about a {}.", "Give me three tips for using a {}."],
    13: ["Give me a short recipe that uses {}.", "Is {} healthy? Answer briefly.", "Where does {} come from?"],
    17: ["Explain what {} is in two sentences.", "Write a haiku about {}."],
    19: ["What causes {}?", "Explain {} in two sentences.", "Write a short paragraph about {}."],
    20: ["How do I grow {}?", "Give me three facts about {}."],
    22: ["Explain how {} works.", "Why does {} happen?"],
    11: ["Describe {} in a short paragraph.", "Write a short story about {}."],
    27: ["What is {} made of?", "What is {} used for?"],
    # a second slice (--wordnet-files 4,7,8,9,10,12,15,18,26): acts, qualities, the body, ideas,
    # kinds of writing and speech, feelings, places, people's roles, states
    4: ["What are three tips for {}?", "How do I get started with {}?", "Explain what {} involves in two sentences."],
    7: ["What does {} mean? Give an example.", "Why does {} matter?"],
    8: ["What does the {} do in the human body?", "How can I keep my {} healthy?"],
    9: ["Explain {} to a beginner.", "Give me three facts about {}.", "Why is {} important?"],
    10: ["What is {}? Answer briefly.", "Write a short paragraph about {}."],
    12: ["How can I deal with {}?", "Write a short poem about {}.", "What causes {}?"],
    15: ["Describe {} in a short paragraph.", "What is {} known for?"],
    18: ["What does a {} do?", "Write a short story about a {}.", "What skills does a {} need?"],
    26: ["What causes {}?", "Explain {} in two sentences."],
}
WORDNET_THINGS = (5, 6, 11, 13, 17, 19, 20, 22, 27)  # the first slice: data/distill-prompts-wordnet.jsonl


def wordnet_topics(wordnet_dir: Path, limit: int, files: tuple[int, ...] = WORDNET_THINGS) -> list[str]:
    """Nouns whose most frequent sense falls in one of `files` (WORDNET_TEMPLATES' keys) and
    that the tagged corpus (SemCor) uses at least once, each asked one of its file's requests."""
    lex_file = {}
    for line in (wordnet_dir / "data.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith(" "):
            offset, lex, *_ = line.split()
            lex_file[offset] = int(lex)
    prompts = []
    for line in (wordnet_dir / "index.noun").read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()  # lemma pos synset_cnt p_cnt [ptr x p_cnt] sense_cnt tagsense_cnt offsets...
        lemma, pointers = fields[0], int(fields[3])
        tagged, first_sense = int(fields[5 + pointers]), fields[6 + pointers]
        lex = lex_file.get(first_sense, -1)
        templates = WORDNET_TEMPLATES[lex] if lex in files else None
        if templates and tagged >= 1 and re.fullmatch(r"[a-z]+(_[a-z]+)?", lemma):
            topic = lemma.replace("_", " ")
            prompts.append(templates[len(prompts) % len(templates)].format(topic))
    return prompts if len(prompts) <= limit else random.Random(3).sample(prompts, limit)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc-dir", type=Path, help="python3.11-doc's html/_sources directory")
    p.add_argument("--fortunes-dir", type=Path, help="fortunes' share/games/fortunes directory")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stdlib-limit", type=int, default=400, help="at most this many stdlib-function prompts")
    p.add_argument("--sayings-limit", type=int, default=300, help="at most this many fortunes")
    p.add_argument("--api", action="store_true", help="add a question per documented function and method")
    p.add_argument("--wordnet-dir", type=Path, help="wordnet-base's share/wordnet directory")
    p.add_argument("--wordnet-limit", type=int, default=100000, help="at most this many WordNet prompts")
    p.add_argument("--wordnet-files", type=lambda t: tuple(int(x) for x in t.split(",")), default=WORDNET_THINGS,
                   help="WordNet lexicographer files to take nouns from (comma-separated; WORDNET_TEMPLATES)")
    p.add_argument("--exclude", type=Path, nargs="*", default=[], help="prompt sets (jsonl) whose prompts to leave out")
    args = p.parse_args()
    prompts = templated() + stdlib_functions(args.stdlib_limit)
    if args.wordnet_dir:
        prompts += wordnet_topics(args.wordnet_dir, args.wordnet_limit, args.wordnet_files)
    if args.doc_dir:
        prompts += library_titles(args.doc_dir) + (api_entries(args.doc_dir) if args.api else [])
    if args.fortunes_dir:
        prompts += sayings(args.fortunes_dir, args.sayings_limit)
    seen = {json.loads(line)["prompt"] for path in args.exclude for line in path.open(encoding="utf-8")}
    prompts = sorted(set(p for p in prompts if not HELD_OUT.search(p) and p not in seen))
    random.Random(args.seed).shuffle(prompts)
    with open(args.out, "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    print(f"{args.out}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
