"""Deterministic builder of the offline text-classification tasks of the real benchmark.

Every task is written as generic data, so that adding a task needs no code in the harness::

    <out>/<task>/labels.json        {"task": ..., "labels": [label names], "source": ..., "counts": ...}
    <out>/<task>/{train,validation,test}.jsonl   one {"text": str, "label": int} per line

Sources (real labelled text that ships with Debian packages or PyPI, no network needed once
installed): ``apt-get install fortunes wordnet-base dict-jargon dict-foldoc dict-devil`` and
``pip install vaderSentiment``; Debian package descriptions come from ``apt-cache dumpavail``.

Rebuild the committed snapshot with::

    python benchmarks/real/build_data.py --out benchmarks/real/data

Fixed seed, length filters, balanced classes (every class gets the same number of examples in
every split), examples de-duplicated across splits.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Callable

log = logging.getLogger("build_data")

FORTUNES = Path("/usr/share/games/fortunes")
WORDNET = Path("/usr/share/wordnet")
DICTD = Path("/usr/share/dictd")

MIN_CHARS, MAX_CHARS = 12, 320
VAL_PER_CLASS, TEST_PER_CLASS, TRAIN_PER_CLASS = 40, 100, 300


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------- sources
def fortunes_topic(files: dict[str, str]) -> dict[str, list[str]]:
    """Fortune cookies; label = the fortune file (topic)."""
    out: dict[str, list[str]] = {}
    for fname, label in files.items():
        raw = (FORTUNES / fname).read_text(encoding="latin-1")
        out[label] = [_clean(t) for t in raw.split("\n%\n")]
    return out


_NOUN_CATS = {5: "animal", 6: "man-made artifact", 13: "food and drink", 18: "person", 20: "plant",
              15: "place or location"}
_VERB_CATS = {29: "body care and bodily functions", 32: "communication", 33: "competition and fighting",
              36: "creation and making", 38: "motion and movement", 41: "social interaction",
              39: "perception", 37: "emotion and feeling"}
_ABSTRACT_CATS = {8: "body part", 9: "knowledge and thought", 10: "communication", 27: "chemical substance",
                  28: "time period", 26: "state or condition"}


def wordnet_gloss(pos_file: str, cats: dict[int, str]) -> dict[str, list[str]]:
    """WordNet glosses; label = lexicographer category; the synset's own words are hidden."""
    out: dict[str, list[str]] = defaultdict(list)
    for line in (WORDNET / pos_file).read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        lex = int(fields[1])
        if lex not in cats:
            continue
        n_words = int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ") for i in range(n_words)]
        gloss = gloss.split(';')[0]  # definition only, drop the quoted usage examples
        gloss = _clean(gloss.replace('"', ""))
        for w in sorted(words, key=len, reverse=True):
            gloss = re.sub(re.escape(w), "___", gloss, flags=re.IGNORECASE)
        out[cats[lex]].append(gloss)
    return dict(out)


def vader_polarity() -> dict[str, list[str]]:
    """VADER lexicon words (alphabetic only); label = sign of the mean valence, |valence| >= 1."""
    import vaderSentiment

    path = Path(vaderSentiment.__file__).parent / "vader_lexicon.txt"
    out: dict[str, list[str]] = {"negative": [], "positive": []}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not re.fullmatch(r"[a-z][a-z\-' ]+", parts[0]):
            continue
        v = float(parts[1])
        if abs(v) >= 1.0:
            out["positive" if v > 0 else "negative"].append(parts[0])
    return out


def _dict_definitions(name: str) -> list[str]:
    data = gzip.open(DICTD / f"{name}.dict.dz").read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s: str) -> int:
        v = 0
        for ch in s:
            v = v * 64 + b64.index(ch)
        return v

    defs = []
    for line in (DICTD / f"{name}.index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        word = parts[0]
        body = data[dec(parts[1]): dec(parts[1]) + dec(parts[2])].decode("utf-8", errors="replace")
        lines = body.splitlines()
        text = _clean(" ".join(lines[1:]))  # drop the headword line
        if len(word) > 1:
            text = re.sub(re.escape(word), "___", text, flags=re.IGNORECASE)
        defs.append(text[:MAX_CHARS].rsplit(" ", 1)[0] if len(text) > MAX_CHARS else text)
    return defs


def dictionary_source() -> dict[str, list[str]]:
    """Definitions; label = which dictionary (Jargon File, FOLDOC, Devil's Dictionary)."""
    return {"hacker slang": _dict_definitions("jargon"),
            "computing terminology": _dict_definitions("foldoc"),
            "cynical satire": _dict_definitions("devil")}


def debian_sections(sections: dict[str, str]) -> dict[str, list[str]]:
    """Debian package short descriptions; label = archive section."""
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    out: dict[str, list[str]] = defaultdict(list)
    for block in dump.split("\n\n"):
        sec = re.search(r"^Section: (?:\S+/)?(\S+)$", block, re.M)
        desc = re.search(r"^Description: (.*)$", block, re.M)
        if sec and desc and sec.group(1) in sections:
            out[sections[sec.group(1)]].append(_clean(desc.group(1)))
    return dict(out)


TASKS: dict[str, tuple[Callable[[], dict[str, list[str]]], str]] = {
    "fortunes": (lambda: fortunes_topic({"computers": "computers", "politics": "politics", "science": "science",
                                         "songs-poems": "songs and poems", "work": "work and jobs",
                                         "men-women": "men and women"}), "Debian fortunes: topic"),
    "wordnet": (lambda: wordnet_gloss("data.noun", _NOUN_CATS), "WordNet noun gloss: category"),
    "sentiment": (vader_polarity, "VADER lexicon word: polarity"),
    "dictionary": (dictionary_source, "dictd definition: source dictionary"),
    "debian": (lambda: debian_sections({"games": "games", "science": "science", "sound": "sound and audio",
                                        "graphics": "graphics", "net": "networking", "text": "text processing",
                                        "admin": "system administration", "utils": "utilities"}),
               "Debian package description: section"),
    # three more tasks for the long (8-task) configuration
    "wordnet_verbs": (lambda: wordnet_gloss("data.verb", _VERB_CATS), "WordNet verb gloss: category"),
    "debian_lang": (lambda: debian_sections({"python": "Python", "perl": "Perl", "haskell": "Haskell",
                                             "rust": "Rust", "golang": "Go", "javascript": "JavaScript",
                                             "java": "Java", "ruby": "Ruby"}),
                    "Debian package description: language ecosystem"),
    "wordnet_abstract": (lambda: wordnet_gloss("data.noun", _ABSTRACT_CATS), "WordNet noun gloss: category (set 2)"),
}


def build_task(name: str, out_dir: Path, seed: int = 0) -> dict:
    fn, source = TASKS[name]
    raw = fn()
    rng = random.Random(f"{seed}-{name}")
    seen: set[str] = set()
    classes: dict[str, list[str]] = {}
    for label in raw:  # keep the declared label order
        texts = []
        for t in raw[label]:
            key = t.lower()
            if MIN_CHARS <= len(t) <= MAX_CHARS or (name == "sentiment" and len(t) >= 2):
                if key not in seen:
                    seen.add(key)
                    texts.append(t)
        texts.sort()
        rng.shuffle(texts)
        classes[label] = texts
    n_min = min(len(v) for v in classes.values())
    n_train = min(TRAIN_PER_CLASS, n_min - VAL_PER_CLASS - TEST_PER_CLASS)
    if n_train < 50:
        raise ValueError(f"task {name}: only {n_min} examples in the smallest class")
    labels = list(classes)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for li, label in enumerate(labels):
        t = classes[label]
        splits["test"] += [{"text": x, "label": li} for x in t[:TEST_PER_CLASS]]
        splits["validation"] += [{"text": x, "label": li} for x in t[TEST_PER_CLASS:TEST_PER_CLASS + VAL_PER_CLASS]]
        splits["train"] += [{"text": x, "label": li}
                            for x in t[TEST_PER_CLASS + VAL_PER_CLASS:TEST_PER_CLASS + VAL_PER_CLASS + n_train]]
    task_dir = out_dir / name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        rng.shuffle(rows)
        with open(task_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta = {"task": name, "labels": labels, "source": source, "seed": seed,
            "available_per_class": {k: len(v) for k, v in classes.items()},
            "per_class": {"train": n_train, "validation": VAL_PER_CLASS, "test": TEST_PER_CLASS}}
    (task_dir / "labels.json").write_text(json.dumps(meta, indent=1) + "\n")
    log.info("%s: %d classes, %d/%d/%d per class", name, len(labels), n_train, VAL_PER_CLASS, TEST_PER_CLASS)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--tasks", nargs="*", default=list(TASKS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.tasks:
        build_task(name, Path(args.out), args.seed)


if __name__ == "__main__":
    main()
