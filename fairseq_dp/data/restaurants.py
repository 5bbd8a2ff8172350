# Copyright (c) fairseq_dp contributors. MIT license.
"""A small table-to-text task the project generates itself, for ``make demo-generation``.

The private data imitates E2E NLG: a *meaning representation* (MR), an
attribute list such as ``name[The Copper Kettle], eatType[pub], food[Italian],
area[riverside]``, and a sentence that says every attribute in it. Sentences
come from several templates with optional attributes, synonyms and clause
orders, so one MR has many correct sentences; each starts with the name, as
most E2E references do. Names and landmarks are made up
(none is E2E's).

- :func:`make_private_splits` draws the train, valid and test MRs. Each train
  or valid MR has one sentence (one example = one record, so the privacy unit is
  the record); each test MR has ``refs_per_test`` sentences, the references for
  multi-reference BLEU. The test MRs are *unseen combinations*: no train or
  valid MR has the same attributes and values apart from the name
  (:func:`combination_key`), so a model cannot pass by recalling one.
- :func:`public_lines` writes the "public" text for pre-training: a town guide
  about other venues (names recombined from the private names' words, never
  one of them) in the same town (its landmarks, dishes and price words), a few
  lines a venue, in sentence shapes of its own, with no MR anywhere. It plays
  the part of the public web text a real model is pre-trained on: it knows the
  words, not the private records nor the MR -> sentence format.

Everything is a function of the seed: the same seed gives the same files.
"""

import csv
import os
import random
from typing import Dict, List, Sequence, Tuple

from ..errors import DPConfigError

# E2E's attribute order in an MR
ATTRIBUTES = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")
OPTIONAL = ATTRIBUTES[1:]

NAMES = ["The Copper Kettle", "Blue Lantern", "The Old Mill", "Saffron House", "Green Olive", "The Red Lion",
         "Harbour View", "The Silver Spoon", "Moon Garden", "The Bell Tower", "Little Bridge", "The Black Swan",
         "Golden Dragon", "The Oak Room", "Marigold Inn", "The Lantern Inn"]
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
P_ATTRIBUTE = 0.45
MIN_OPTIONAL = 2
MAX_REDRAWS = 10_000

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
    """The food as an adjective: ``Italian``, ``fast food``."""
    return "fast food" if record["food"] == "Fast food" else record["food"]


def _food_noun(value: str) -> str:
    """The food as a noun: ``Italian food``, ``fast food``."""
    return "fast food" if value == "Fast food" else f"{value} food"


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
        food = _food_noun(record["food"])
        clauses.append(rng.choice([f"serves {food}", f"offers {food}", f"provides {food}"]))
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
    elif template == 1:  # "X is located by the riverside and is an Italian pub. ..."
        place = _place(r, rng)
        noun = _noun(r, rng, adjectives=rng.random() < 0.5)
        first = (f"{name} is located {' and '.join(place)} and is {noun}" if place else f"{name} is {noun}")
    elif template == 2:  # "X is the name of a cheap pub by the riverside. ..."
        noun = _noun(r, rng, adjectives=True)
        first = f"{name} is the name of {noun}"
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

    def draw(refuse) -> Record:
        # the attribute combinations number about 10^5, but the likely ones far
        # fewer: a test set that takes most of them would leave nothing to draw
        for _ in range(MAX_REDRAWS):
            record = draw_record(rng)
            if combination_key(record) not in refuse:
                return record
        raise DPConfigError(f"{MAX_REDRAWS} draws in a row hit one of the {len(test_keys)} test combinations: "
                            "ask for fewer test MRs")

    # test first, then train/valid avoid its combinations: the test set keeps
    # its size however large train is
    test, test_keys = [], set()
    while len(test) < n_test:
        record = draw(test_keys)
        test_keys.add(combination_key(record))
        test.append((mr_string(record), [realize(record, rng) for _ in range(refs_per_test)]))
    train, valid = ([(mr_string(r), realize(r, rng)) for r in (draw(test_keys) for _ in range(n))]
                    for n in (n_train, n_valid))
    return train, valid, test


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
# A town guide: the same town (landmarks, dishes, prices, the words people use
# for them) as the private records, as public web text would describe it, but
# other venues (names recombined from the private names' words, never one of
# them), other sentence shapes, a few facts a line, and no MR. A venue's lines
# follow each other and repeat its name and facts: pre-trained on blocks of
# consecutive lines, the model learns to carry words from earlier lines into
# later ones, which is what reading "MR </s> sentence" needs.

NAME_WORDS = (["Copper", "Blue", "Old", "Saffron", "Green", "Red", "Harbour", "Silver", "Golden", "Oak", "Black",
               "Bell", "Little", "Marigold", "Moon"],
              ["Kettle", "Lantern", "Mill", "House", "Olive", "Lion", "View", "Spoon", "Dragon", "Room", "Swan",
               "Tower", "Garden", "Inn", "Bridge"])
# the guide's own phrasings (verb phrases after the venue's name or "it")
GUIDE_PRICE = {
    "cheap": ["keeps its prices cheap", "is a cheap place to eat"],
    "moderate": ["keeps its prices moderate", "is moderately priced for the town"],
    "high": ["charges high prices", "is an expensive place to eat"],
    "less than £20": ["charges less than £20 a head", "asks less than £20 for a meal"],
    "£20-25": ["charges £20-25 a head", "asks £20-25 for a meal"],
    "more than £30": ["charges more than £30 a head", "asks more than £30 for a meal"],
}
GUIDE_RATING = {
    "low": ["gets a low customer rating", "gets a low rating from visitors"],
    "average": ["gets an average customer rating", "gets an average rating from visitors"],
    "high": ["gets a high customer rating", "gets a high rating from visitors"],
    "1 out of 5": ["gets a customer rating of 1 out of 5", "gets 1 out of 5 from visitors"],
    "3 out of 5": ["gets a customer rating of 3 out of 5", "gets 3 out of 5 from visitors"],
    "5 out of 5": ["gets a customer rating of 5 out of 5", "gets 5 out of 5 from visitors"],
}
GUIDE_FAMILY = {"yes": ["is a good choice for families", "is kid friendly", "is family friendly"],
                "no": ["is no place for children", "is not kid friendly", "is not family friendly"]}
GUIDE_EXTRAS = ["has a large garden", "has free parking", "has live music on Fridays", "opens late",
                "closes early on Sundays", "was renovated last year", "is popular with students",
                "is busy at weekends", "has a small terrace", "has friendly staff"]


def public_names() -> List[str]:
    """Venue names of the public text: pairs of the private names' words, none a private name."""
    private = {name[4:] if name.startswith("The ") else name for name in NAMES}
    first, second = NAME_WORDS
    return [f"{a} {b}" for a in first for b in second if a != b and f"{a} {b}" not in private]


def _guide_facts(rng: random.Random, record: Record) -> List[str]:
    """A venue's facts in the guide's own phrasings (verb phrases)."""
    facts = [f"is a {record.get('eatType', 'place to eat')}"]
    if "food" in record:
        facts.append(rng.choice([f"serves {_food_noun(record['food'])}", f"has a menu of {_food_noun(record['food'])}",
                                 f"is known for its {_food(record)} cooking"]))
    if "priceRange" in record:
        facts.append(rng.choice(GUIDE_PRICE[record["priceRange"]]))
    if "customer rating" in record:
        facts.append(rng.choice(GUIDE_RATING[record["customer rating"]]))
    if "area" in record:
        facts.append(f"is {rng.choice(AREA[record['area']])}")
    if "near" in record:
        facts.append(f"is {rng.choice(NEAR)} {record['near']}")
    if "familyFriendly" in record:
        facts.append(rng.choice(GUIDE_FAMILY[record["familyFriendly"]]))
    facts.append(rng.choice(GUIDE_EXTRAS))
    return facts


def _guide_lines(rng: random.Random, name: str) -> List[str]:
    """Two to four lines about one venue: a line or two in the guide's words
    with some of its facts, and a description that says all of them (the way
    restaurants are described anywhere, the private sentences included), in
    either order. The venue's record is drawn as a private one is, but it is
    never written as an MR."""
    record = dict(draw_record(rng), name=name)
    facts = _guide_facts(rng, record)
    guide = []
    for i in range(rng.randint(1, 2)):
        told = rng.sample(facts, min(len(facts), rng.randint(1, 3)))
        subject = name if i == 0 else rng.choice([name, "it", f"the {record.get('eatType', 'place')}"])
        line = rng.choice(["{} {}.", "We found that {} {}.", "Visitors say {} {}.",
                           "In the guide, {} {}."]).format(subject, _join(told))
        guide.append(line[0].upper() + line[1:])
    # a listing: its tag line, then its description, then or before them the guide's lines
    listing = [_tag_line(rng, record), realize(record, rng)]
    return guide + listing if rng.random() < 0.5 else listing + guide


def _tag_line(rng: random.Random, record: Record) -> str:
    """``Tags: #Green Lion #pub #cheap #riverside``, as web listings have
    them: each value written right after a ``#`` is tokenized as it is right
    after an MR's ``[`` (GPT-2's BPE gives a word without a space before it
    other tokens than the same word after a space), so the public model has
    seen those tokens too; a pre-trained GPT-2 has seen every token in both forms."""
    tags = ["#" + record["name"]]
    for attribute in OPTIONAL:
        if attribute in record:
            value = record[attribute]
            if attribute == "familyFriendly":
                value = "kid friendly" if value == "yes" else "adults only"
            tags.append("#" + value)
    rng.shuffle(tags)
    return "Tags: " + " ".join(tags)


def public_lines(n_places: int, seed: int = 0) -> List[str]:
    """The guide: two to four lines about each of ``n_places`` venues, one
    sentence a line."""
    rng = random.Random(seed)
    names = public_names()
    lines = []
    for _ in range(n_places):
        name = rng.choice(names)
        lines += _guide_lines(rng, ("The " if rng.random() < 0.4 else "") + name)
    return lines


def write_public_text(path: str, n_places: int, seed: int = 0) -> str:
    """``public_lines`` as a text file, one line an example (``--format text``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in public_lines(n_places, seed))
    return path
