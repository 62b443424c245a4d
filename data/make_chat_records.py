"""Generate data/chat_records.jsonl: a sentence -> JSON record chat task set in the fictional world.

Each conversation asks the model to turn one harbour report (an event sentence or a registry entry)
into a JSON object with the fields person, vessel, place, day, month, cargo, count, in that order.
The assistant's answer is exactly that object on one line, written compactly
(``json.dumps(fields, separators=(",", ":"))``, under 50 SmolLM2 tokens), so a program can grade it by
exact match.

Everything here is invented for this project (names, the calendar, the goods) and drawn with a fixed
seed, so the file is reproducible byte for byte::

    python data/make_chat_records.py [OUTPUT_PATH]   # default: data/chat_records.jsonl

Splits: 360 train, 80 val, 240 test. Train and val use only "seen" names and seen
(sentence frame, date style) pairs. The test split is three equal parts: familiar (seen names and
pairs, new sentences), new names (a person, and sometimes a vessel or a place, never used in train or
val) and new pairs (a frame written with a date style it never has in train or val). Every field
type, month, cargo, frame and date style occurs in train. No sentence occurs twice in the file.

Standard library only.
"""
import json
import random
import sys
from pathlib import Path

SEED = 8
SPLIT_SIZES = {"train": 360, "val": 80, "test": 240}
FIELDS = ("person", "vessel", "place", "day", "month", "cargo", "count")

# -- invented name lists -------------------------------------------------------------------------
# The last few of each list are held out: they appear only in the test split.
PEOPLE = [
    "Orla Venn", "Tamsin Crowle", "Bertrand Hask", "Milo Fenwright", "Greta Solvane",
    "Ambrose Tulk", "Neve Harrowby", "Jory Castellan", "Wren Mallory", "Edric Stoat",
    "Isolde Pike", "Corin Wastwater", "Hilde Brantock", "Piet Lannamore", "Sabine Oakhurst",
    "Dunstan Reave", "Lira Coldbrook", "Fennick Orme", "Maude Killigrew", "Tobiah Sandell",
    "Ysolde Marren", "Gideon Quaile", "Rosalind Threlk", "Hamish Dorrow",
    # held out for test
    "Petra Lowmoss", "Caspar Ennet", "Ottilie Varrow", "Brom Halsey", "Senna Whitlock",
    "Aurel Dunning",
]
N_PEOPLE_HELD = 6

VESSELS = [
    "Saltfinch", "Grey Heron", "Lantern Gull", "Marrowdancer", "Brass Otter", "Tidewren",
    "Copper Lark", "Stormhollow", "Quiet Pike", "Ninefold", "Amber Drake", "Seawhistle",
    "Kelpie Rose", "Ironreed", "Swift Corrie", "Mistcaller", "Old Faithless", "Dunlin",
    "Harbour Moth", "Bellbuoy",
    # held out for test
    "Frostwhelk", "Morning Tern", "Gannet Queen", "Wavecutter",
]
N_VESSELS_HELD = 4

# Harbour towns of the fictional world (most appear in data/fictional_world.jsonl), plus a few new.
PLACES = [
    "Tolvenmouth", "Vessipor", "Quellhaven", "Haddrimere", "Yarrowick", "Ostrevik", "Saphrenne",
    "Corrisande", "Orlbeck", "Pellowick", "Gaskarrow", "Nethergrove", "Ombrevault", "Mirecombe",
    "Raskelby", "Ulmbridge",
    # held out for test
    "Zelthorn", "Sarnwyth", "Tessmarch", "Drammoch",
]
N_PLACES_HELD = 4

# The invented calendar: twelve months of thirty days.
MONTHS = [
    "Frostmonth", "Thawmonth", "Seedmonth", "Rainmoot", "Bloomtide", "Highsun",
    "Emberfall", "Harvestide", "Mistmonth", "Leafturn", "Darkening", "Longnight",
]
DAYS_IN_MONTH = 30

# cargo -> the containers it travels in
CARGO = {
    "amber": ["crates", "chests"],
    "lamp oil": ["barrels", "casks"],
    "barley": ["sacks"],
    "fenwool": ["bales", "sacks"],
    "moonsalt": ["sacks", "barrels"],
    "emberglass": ["crates"],
    "pitch": ["barrels"],
    "dried eel": ["casks", "crates"],
    "bluewine": ["casks"],
    "slate": ["crates"],
    "tea": ["chests"],
    "copper wire": ["coils"],
}
COUNT_RANGE = (2, 60)
TITLES = ["Captain", "Skipper", "Master"]

# -- numbers in words ----------------------------------------------------------------------------
_ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_ORD_ONES = ["", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
             "ninth", "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
             "sixteenth", "seventeenth", "eighteenth", "nineteenth"]
_ORD_TENS = ["", "", "twentieth", "thirtieth", "fortieth", "fiftieth", "sixtieth"]


def cardinal(n):
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("-" + _ONES[ones] if ones else "")


def ordinal(n):
    if n < 20:
        return _ORD_ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + "-" + _ORD_ONES[ones] if ones else _ORD_TENS[tens]


def ordinal_digits(n):
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# -- surface forms -------------------------------------------------------------------------------
# A date style writes (day, month) without a preposition; "on" is added where the frame needs it.
DATE_STYLES = {
    "ordinal_words": lambda d, m: f"the {ordinal(d)} of {m}",
    "ordinal_digits": lambda d, m: f"the {ordinal_digits(d)} of {m}",
    "day_month": lambda d, m: f"{d} {m}",
    "month_day": lambda d, m: f"{m} {d}",
    "day_word": lambda d, m: f"day {cardinal(d)} of {m}",
}
DATE_STYLE_NAMES = list(DATE_STYLES)

# Placeholders: {tp} person with an optional title, {p} person alone, {v} vessel, {l} place,
# {on_date} "on <date>", {On_date} the same capitalised, {date} the bare date, {n} "<count> <unit>
# of <cargo>", {N} the same capitalised, {q} count, {u} unit, {c} cargo.
FRAMES = [
    "{tp} docked the {v} at {l} harbour {on_date} with {n}.",
    "{On_date}, the {v} reached {l} under {tp}, carrying {n}.",
    "{N} were unloaded at {l} from the {v} {on_date}, under the command of {tp}.",
    "Registry of {l}: the {v}, master {p}, entered port {on_date} with {n}.",
    "At {l}, {tp} brought the {v} in {on_date}, and the hold held {n}.",
    "{tp} of the {v} signed for {n} at {l} {on_date}.",
    "Arrived {date}: the {v} at {l}, skipper {p}, cargo {c} ({q} {u}).",
    "The harbourmaster of {l} logged the {v} {on_date}: {n}, captain {p}.",
    "{N} came ashore at {l} {on_date}, landed by {tp} from the {v}.",
    "It was {date} when {tp} sailed the {v} into {l} with {n}.",
    "Entry for {date}, {l} quay. Vessel: {v}; master: {p}; load: {q} {u} of {c}.",
    "The {v}, commanded by {tp}, put in at {l} {on_date} and declared {n}.",
    "{l} customs recorded {n} landed {on_date} by the {v} under {tp}.",
    "{On_date}, {tp} moored the {v} at {l}, and {n} were carried up the quay.",
    "Under {tp}, the {v} delivered {n} to {l} {on_date}.",
    "Ledger of {l}, {date}: {p}, the {v}, {n}.",
]
# Each frame has one date style that is never used with it in train or val (test only).
HELD_PAIRS = {(f, DATE_STYLE_NAMES[f % len(DATE_STYLE_NAMES)]) for f in range(len(FRAMES))}

FIELD_LIST = "person, vessel, place, day, month, cargo, count"
INSTRUCTIONS = [
    "Turn this sentence into a JSON record with the fields " + FIELD_LIST + ".\nSentence: {s}",
    "Extract " + FIELD_LIST.replace(", count", " and count")
    + " from the report below as one JSON object.\n{s}",
    "Harbour report: {s}\nGive its JSON record (" + FIELD_LIST + ").",
    "Fill in the record fields " + FIELD_LIST + " for this entry: {s}",
]


def _cap(text):
    return text[0].upper() + text[1:]


def render(rng, frame_index, date_style, fields):
    """Write one sentence for ``fields`` with the given frame and date style."""
    count = fields["count"]
    q = str(count) if rng.random() < 0.5 else cardinal(count)
    unit = rng.choice(CARGO[fields["cargo"]])
    n = f"{q} {unit} of {fields['cargo']}"
    date = DATE_STYLES[date_style](fields["day"], fields["month"])
    title = rng.choice(TITLES + [None])
    tp = f"{title} {fields['person']}" if title else fields["person"]
    return FRAMES[frame_index].format(
        tp=tp, p=fields["person"], v=fields["vessel"], l=fields["place"],
        on_date="on " + date, On_date="On " + date, date=date,
        n=n, N=_cap(n), q=q, u=unit, c=fields["cargo"],
    )


def draw_fields(rng, people, vessels, places):
    fields = {
        "person": rng.choice(people),
        "vessel": rng.choice(vessels),
        "place": rng.choice(places),
        "day": rng.randint(1, DAYS_IN_MONTH),
        "month": rng.choice(MONTHS),
        "cargo": rng.choice(sorted(CARGO)),
        "count": rng.randint(*COUNT_RANGE),
    }
    return {k: fields[k] for k in FIELDS}


def conversation(rng, split, sentence, fields):
    user = rng.choice(INSTRUCTIONS).format(s=sentence)
    answer = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return {
        "split": split,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "fields": fields,
    }


def generate(seed=SEED):
    rng = random.Random(seed)
    seen_people, held_people = PEOPLE[:-N_PEOPLE_HELD], PEOPLE[-N_PEOPLE_HELD:]
    seen_vessels, held_vessels = VESSELS[:-N_VESSELS_HELD], VESSELS[-N_VESSELS_HELD:]
    seen_places, held_places = PLACES[:-N_PLACES_HELD], PLACES[-N_PLACES_HELD:]
    all_pairs = [(f, s) for f in range(len(FRAMES)) for s in DATE_STYLE_NAMES]
    seen_pairs = [p for p in all_pairs if p not in HELD_PAIRS]
    held_pairs = [p for p in all_pairs if p in HELD_PAIRS]

    used = set()
    rows = []

    def add(split, pairs, people, vessels, places):
        while True:
            fields = draw_fields(rng, people, vessels, places)
            frame_index, style = rng.choice(pairs)
            sentence = render(rng, frame_index, style, fields)
            if sentence not in used:
                used.add(sentence)
                rows.append(conversation(rng, split, sentence, fields))
                return

    # Every frame x seen date style appears in train at least once, then random seen pairs.
    for frame_index, style in seen_pairs:
        add("train", [(frame_index, style)], seen_people, seen_vessels, seen_places)
    while len(rows) < SPLIT_SIZES["train"]:
        add("train", seen_pairs, seen_people, seen_vessels, seen_places)
    for _ in range(SPLIT_SIZES["val"]):
        add("val", seen_pairs, seen_people, seen_vessels, seen_places)

    third = SPLIT_SIZES["test"] // 3
    for _ in range(third):  # familiar: seen names and pairs, new sentences
        add("test", seen_pairs, seen_people, seen_vessels, seen_places)
    for _ in range(third):  # new names: a held-out person, and a held-out vessel or place half the time
        vessels = held_vessels if rng.random() < 0.5 else seen_vessels
        places = held_places if rng.random() < 0.5 else seen_places
        add("test", seen_pairs, held_people, vessels, places)
    for _ in range(SPLIT_SIZES["test"] - 2 * third):  # new (frame, date style) pairs, seen names
        add("test", held_pairs, seen_people, seen_vessels, seen_places)

    # Shuffle inside each split so the file does not list the parts in order.
    out = []
    for split in SPLIT_SIZES:
        part = [r for r in rows if r["split"] == split]
        rng.shuffle(part)
        out.extend(part)
    return out


def main(argv):
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("chat_records.jsonl")
    rows = generate()
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} conversations to {path}")


if __name__ == "__main__":
    main(sys.argv)
