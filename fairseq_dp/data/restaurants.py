# Copyright (c) fairseq_dp contributors. MIT license.
"""A small table-to-text task the project generates itself, for ``make demo-generation``.

The private data imitates E2E NLG: a *meaning representation* (MR), an
attribute list such as ``name[The Copper Kettle], eatType[pub], food[Italian],
area[riverside]``, and a sentence that says every attribute in it. Sentences
come from several templates with optional attributes, synonyms and clause
orders, so one MR has many correct sentences. Names and landmarks are made up
(none is E2E's).

- :func:`make_private_splits` draws the train, valid and test MRs. Each train
  or valid MR has one sentence (one example = one record, so the privacy unit is
  the record); each test MR has ``refs_per_test`` sentences, the references for
  multi-reference BLEU. The test MRs are *unseen combinations*: no train or
  valid MR has the same attributes and values apart from the name
  (:func:`combination_key`), so a model cannot pass by recalling one.
- :func:`public_lines` writes the "public" text for pre-training: short
  descriptions of other places (hotels, museums, shops, parks, markets and some
  eateries) with their own names and templates, a few lines a place, and no MR
  anywhere. It shares everyday words with the private task (Italian, cheap,
  riverside, family friendly, ...), as public web text would, but not its
  format, its names or its sentences.

Everything is a function of the seed: the same seed gives the same files.
"""

import csv
import os
import random
from typing import Dict, List, Sequence, Tuple

# E2E's attribute order in an MR
ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
OPTIONAL = ATTRIBUTES[1:]

NAMES = ["The Copper Kettle", "Blue Lantern", "The Old Mill", "Saffron House", "Green Olive", "The Red Lion",
         "Harbour View", "The Silver Spoon", "Moonrise", "The Bell Tower", "Little Tokyo", "The Black Swan",
         "Golden Dragon", "The Oak Room", "Cafe Marigold", "The Lantern Inn"]
VALUES: Dict[str, List[str]] = {
    "eatType": ["restaurant", "pub", "coffee shop"],
    "food": ["Italian", "French", "Chinese", "Indian", "Japanese", "English", "Fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
    "near": ["Burger Palace", "the Grand Hotel", "the Corn Exchange", "Riverside Books", "the Train Station",
             "Clock Tower Park", "the Art Museum", "Rainbow Noodle Bar", "the Market Hall", "St Mary's Church"],
}
# how often an optional attribute is in an MR (E2E's MRs have 3 to 8 attributes)
P_ATTRIBUTE = 0.55
MIN_OPTIONAL = 2

Record = Dict[str, str]


def draw_record(rng: random.Random) -> Record:
    """A name and at least ``MIN_OPTIONAL`` other attributes, in E2E's order."""
    while True:
        chosen = [a for a in OPTIONAL if rng.random() < P_ATTRIBUTE]
        if len(chosen) >= MIN_OPTIONAL:
            break
    record = {"name": rng.choice(NAMES)}
    for attribute in chosen:
        record[attribute] = rng.choice(VALUES[attribute])
    return record


def mr_string(record: Record) -> str:
    """``name[...], eatType[...], ...`` as E2E writes MRs."""
    return ", ".join(f"{a}[{record[a]}]" for a in ATTRIBUTES if a in record)


def parse_mr(mr: str) -> Record:
    """The inverse of :func:`mr_string` (for tests and for reading prompts back)."""
    record = {}
    for part in mr.split("], "):
        attribute, value = part.rstrip("]").split("[", 1)
        record[attribute] = value
    return record


def combination_key(record: Record) -> Tuple[Tuple[str, str], ...]:
    """What a test MR must not share with any train or valid MR: every
    attribute and value except the name."""
    return tuple((a, record[a]) for a in OPTIONAL if a in record)


# ---------------------------------------------------------------- sentences
# Each attribute has a few phrasings; a template places them. Every phrase is
# chosen with the record's rng, so a record gets a different sentence each
# time it is realized (the test references) and the same one for the same seed.

PRICE_ADJ = {"cheap": ["cheap", "low-priced", "inexpensive"], "moderate": ["moderately priced", "mid-priced"],
             "high": ["expensive", "high-priced", "pricey"]}
PRICE_CLAUSE = {
    "cheap": ["has cheap prices", "is cheap", "offers low prices"],
    "moderate": ["has moderate prices", "is moderately priced", "charges moderate prices"],
    "high": ["has high prices", "is expensive", "is in the high price range"],
    "less than £20": ["has prices less than £20", "costs less than £20", "is in the less than £20 price range"],
    "£20-25": ["has prices of £20-25", "costs £20-25", "is in the £20-25 price range"],
    "more than £30": ["has prices more than £30", "costs more than £30", "is in the more than £30 price range"],
}
RATING_CLAUSE = {
    "low": ["has a low customer rating", "is rated low by customers", "has a low rating"],
    "average": ["has an average customer rating", "is rated average by customers", "has an average rating"],
    "high": ["has a high customer rating", "is rated highly by customers", "has a high rating"],
    "1 out of 5": ["has a customer rating of 1 out of 5", "is rated 1 out of 5", "has a rating of 1 out of 5"],
    "3 out of 5": ["has a customer rating of 3 out of 5", "is rated 3 out of 5", "has a rating of 3 out of 5"],
    "5 out of 5": ["has a customer rating of 5 out of 5", "is rated 5 out of 5", "has a rating of 5 out of 5"],
}
AREA = {"city centre": ["in the city centre", "in the centre of the city", "in the city centre area"],
        "riverside": ["by the riverside", "on the riverside", "in the riverside area"]}
FAMILY_ADJ = {"yes": ["family friendly", "kid friendly", "family-friendly"],
              "no": ["adult-only", "non family-friendly", "non kid friendly"]}
FAMILY_CLAUSE = {"yes": ["is family friendly", "is kid friendly", "welcomes children"],
                 "no": ["is not family friendly", "is not kid friendly", "does not welcome children"]}
NEAR = ["near", "close to", "not far from"]


def _food(record: Record) -> str:
    return "fast food" if record["food"] == "Fast food" else record["food"]


def _noun(record: Record, rng: random.Random, adjectives: bool) -> str:
    """``a cheap family friendly Italian pub``: the attributes that fit before
    the venue's noun, which ones depending on ``adjectives``. Returns the noun
    phrase with its article, and marks what it said in ``record['_said']``."""
    said = record["_said"]
    words = []
    if adjectives and record.get("priceRange") in PRICE_ADJ:
        words.append(rng.choice(PRICE_ADJ[record["priceRange"]]))
        said.add("priceRange")
    if adjectives and "familyFriendly" in record and rng.random() < 0.7:
        words.append(rng.choice(FAMILY_ADJ[record["familyFriendly"]]))
        said.add("familyFriendly")
    if "food" in record and rng.random() < 0.7:
        words.append(_food(record))
        said.add("food")
    if "eatType" in record:
        words.append(record["eatType"])
        said.add("eatType")
    else:
        words.append(rng.choice(["venue", "place to eat"]))
    phrase = " ".join(words)
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _place(record: Record, rng: random.Random) -> List[str]:
    """Where it is: area and landmark phrases, in either order."""
    parts = []
    if "area" in record:
        parts.append(rng.choice(AREA[record["area"]]))
    if "near" in record:
        parts.append(f"{rng.choice(NEAR)} {record['near']}")
    rng.shuffle(parts)
    record["_said"].update(a for a in ("area", "near") if a in record)
    return parts


def _rest(record: Record, rng: random.Random) -> List[str]:
    """Verb phrases for every attribute not said yet."""
    said = record["_said"]
    clauses = []
    if "food" in record and "food" not in said:
        clauses.append(rng.choice([f"serves {_food(record)} food", f"offers {_food(record)} food",
                                   f"provides {_food(record)} food"]))
    if "priceRange" in record and "priceRange" not in said:
        clauses.append(rng.choice(PRICE_CLAUSE[record["priceRange"]]))
    if "customer rating" in record:
        clauses.append(rng.choice(RATING_CLAUSE[record["customer rating"]]))
    if "familyFriendly" in record and "familyFriendly" not in said:
        clauses.append(rng.choice(FAMILY_CLAUSE[record["familyFriendly"]]))
    rng.shuffle(clauses)
    return clauses


def _join(clauses: Sequence[str]) -> str:
    if len(clauses) <= 1:
        return "".join(clauses)
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def realize(record: Record, rng: random.Random) -> str:
    """One sentence (or two) that says every attribute of ``record``."""
    r = dict(record, _said=set())
    name = r["name"]
    template = rng.randrange(4)
    if template == 0:  # "X is a cheap Italian pub by the riverside near Y. It has ..."
        first = f"{name} is {_noun(r, rng, adjectives=True)}"
        place = _place(r, rng)
        if place:
            first += " " + " ".join(place)
    elif template == 1:  # "Located by the riverside, X is an Italian pub. ..."
        place = _place(r, rng)
        noun = _noun(r, rng, adjectives=rng.random() < 0.5)
        first = (f"Located {' '.join(place)}, {name} is {noun}" if place else f"{name} is {noun}")
    elif template == 2:  # "There is a cheap pub called X by the riverside. ..."
        noun = _noun(r, rng, adjectives=True)
        first = f"There is {noun} called {name}"
        place = _place(r, rng)
        if place:
            first += " " + " ".join(place)
    else:  # "X, a pub near Y, serves Italian food and ..."
        noun = _noun(r, rng, adjectives=False)
        place = _place(r, rng)
        first = f"{name}, {noun}{' ' + ' '.join(place) if place else ''},"
    clauses = _rest(r, rng)
    if template == 3:
        if not clauses:  # nothing left for the verb: say the name's noun plainly
            return f"{name} is {noun}{' ' + ' '.join(place) if place else ''}."
        return f"{first} {_join(clauses)}."
    if not clauses:
        return first + "."
    if len(clauses) == 1 and template != 2 and rng.random() < 0.5:
        return f"{first} and {clauses[0]}."
    subject = rng.choice(["It", "It", "The " + r.get("eatType", "place"), "This " + r.get("eatType", "place")])
    return f"{first}. {subject} {_join(clauses)}."


def make_private_splits(
    n_train: int, n_valid: int, n_test: int, refs_per_test: int = 5, seed: int = 0
) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]], List[Tuple[str, List[str]]]]:
    """(train pairs, valid pairs, test MRs with their references).

    Train and valid: ``(mr, sentence)``, one per record. Test: ``(mr, [refs])``
    for ``n_test`` distinct MRs whose :func:`combination_key` no train or valid
    record has."""
    rng = random.Random(seed)
    # test first, then train/valid avoid its combinations: the test set keeps
    # its size however large train is
    test, test_keys = [], set()
    while len(test) < n_test:
        record = draw_record(rng)
        key = combination_key(record)
        if key in test_keys:
            continue
        test_keys.add(key)
        test.append((mr_string(record), [realize(record, rng) for _ in range(refs_per_test)]))
    splits = []
    for n in (n_train, n_valid):
        pairs = []
        while len(pairs) < n:
            record = draw_record(rng)
            if combination_key(record) in test_keys:
                continue
            pairs.append((mr_string(record), realize(record, rng)))
        splits.append(pairs)
    return splits[0], splits[1], test


def write_e2e_csv(path: str, rows: Sequence[Tuple[str, str]]) -> str:
    """E2E NLG's CSV layout (header ``mr,ref``, quoted as needed)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    return path


def write_private_csvs(out_dir: str, n_train: int, n_valid: int, n_test: int, refs_per_test: int = 5,
                       seed: int = 0) -> Dict[str, str]:
    """``trainset.csv``, ``devset.csv`` and ``testset_w_refs.csv`` (one row per
    reference, an MR's rows together) under ``out_dir``; returns their paths."""
    train, valid, test = make_private_splits(n_train, n_valid, n_test, refs_per_test, seed)
    os.makedirs(out_dir, exist_ok=True)
    return {
        "train": write_e2e_csv(os.path.join(out_dir, "trainset.csv"), train),
        "valid": write_e2e_csv(os.path.join(out_dir, "devset.csv"), valid),
        "test": write_e2e_csv(os.path.join(out_dir, "testset_w_refs.csv"),
                              [(mr, ref) for mr, refs in test for ref in refs]),
    }


# ---------------------------------------------------------------- public text

PUBLIC_NAMES = ["Northgate", "The Willow", "Castle Hill", "Orchard Lane", "The Foundry", "Kingsway",
                "Elm Court", "The Crescent", "Meadowbrook", "Stonebridge", "The Quay", "Hilltop",
                "Ashford", "The Gallery Rooms", "Parkside", "Westfield", "The Granary", "Fox Hollow",
                "Brook Street", "The Observatory"]
PUBLIC_KINDS = ["hotel", "museum", "bookshop", "bakery", "market", "gallery", "park", "library", "cinema",
                "theatre", "bar", "cafe", "restaurant", "pub", "coffee shop", "gym"]
PUBLIC_PLACES = ["in the city centre", "by the river", "on the riverside", "near the station", "in the old town",
                 "next to the park", "close to the university", "on the high street", "near the harbour"]
PUBLIC_FEATURES = ["a large garden", "free parking", "a small terrace", "live music on Fridays", "a quiet reading room",
                   "a rooftop view", "friendly staff", "long opening hours", "a play area for children",
                   "Italian coffee", "French pastries", "Indian spices", "Japanese tea", "Chinese lanterns",
                   "English breakfast", "fast food stalls", "cheap tickets", "a high ceiling", "low prices"]
PUBLIC_OPINIONS = ["is popular with students", "is busy at weekends", "is quiet in the morning",
                   "is family friendly", "is not suitable for children", "is cheap", "is rather expensive",
                   "has an average reputation", "is rated highly by visitors", "gets a low score from critics",
                   "is open every day", "closes early on Sundays", "was renovated last year",
                   "is moderately priced", "has prices of about £20", "costs more than £30 for two"]


def public_lines(n_places: int, seed: int = 0) -> List[str]:
    """Two to four lines about each of ``n_places`` places, one sentence a
    line; a place's later lines refer back to its name."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_places):
        name, kind = rng.choice(PUBLIC_NAMES), rng.choice(PUBLIC_KINDS)
        article = "an" if kind[0] in "aeiou" else "a"
        first = rng.choice([
            f"{name} is {article} {kind} {rng.choice(PUBLIC_PLACES)}.",
            f"You will find {name}, {article} {kind}, {rng.choice(PUBLIC_PLACES)}.",
            f"The {kind} at {name} opened {rng.choice(['last spring', 'in 1998', 'a few years ago', 'recently'])}.",
            f"{name} is a well known {kind} {rng.choice(PUBLIC_PLACES)}.",
        ])
        more = []
        for _ in range(rng.randint(1, 3)):
            more.append(rng.choice([
                f"{name} {rng.choice(PUBLIC_OPINIONS)}.",
                f"Visitors to {name} enjoy {rng.choice(PUBLIC_FEATURES)}.",
                f"The {kind} has {rng.choice(PUBLIC_FEATURES)} and {rng.choice(PUBLIC_FEATURES)}.",
                f"It {rng.choice(PUBLIC_OPINIONS)} and has {rng.choice(PUBLIC_FEATURES)}.",
                f"People say that {name} {rng.choice(PUBLIC_OPINIONS)}.",
            ]))
        lines += [first] + more
    return lines


def write_public_text(path: str, n_places: int, seed: int = 0) -> str:
    """``public_lines`` as a text file, one line an example (``--format text``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in public_lines(n_places, seed))
    return path
