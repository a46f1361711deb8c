"""Training data for the bearwatch classifier: every set in ../shared/data, split deterministically.

Each set is split three ways by the salted SHA-1 of the item's text (or Reuters id), so the splits are
the same on every machine and every run, whatever the seed:
- `final` (10 %): untouched until the last run; nothing is chosen on it;
- `dev` (12 %): where settings, epochs and the temperatures are chosen;
- `train` (the rest).
"""
import csv
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
MODELS = ROOT / "models"
# Training runs write under work/NAME/ (git-ignored).
WORK = MODELS / "train" / "work"

SENTIMENT = ["negative", "neutral", "positive"]
# DESIGN §9, in this order: the topic head's outputs.
TOPICS = ["earnings", "mergers_acquisitions", "monetary_policy", "macro", "currencies", "debt_markets",
          "energy", "metals", "agriculture", "equity_markets", "analyst_ratings", "company_news",
          "financials", "legal_regulatory", "politics", "other"]
# When a Reuters story carries several categories, the first topic in this order wins (DESIGN §9).
TOPIC_PRIORITY = ["earnings", "mergers_acquisitions", "energy", "metals", "agriculture",
                  "monetary_policy", "currencies", "macro"]
MAX_LENGTH = 64

# Twitter financial news sentiment: 0 = bearish, 1 = bullish, 2 = neutral.
TWITTER_LABELS = {"0": "negative", "1": "positive", "2": "neutral"}

# Body characters appended to the headline in the "headline + body" input; the Rust side's
# `body_chars` setting builds the same text.
BODY_CHARS = 200

FINAL_SHARE = 0.10
DEV_SHARE = 0.12


def with_body(headline: str, body: str, chars: int) -> str:
    return f"{headline} {body[:chars]}"


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a string: the split decision.

    Salted: the PhraseBank and SEntFiN files are themselves what remained after taking 20 % by plain
    SHA-1 order, so an unsalted hash would put every one of their items on one side.
    """
    return int(hashlib.sha1(b"bearwatch-val:" + key.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def split_of(key: str) -> str:
    b = bucket(key)
    return "final" if b < FINAL_SHARE else "dev" if b < FINAL_SHARE + DEV_SHARE else "train"


def topic_map():
    """{(source, label): topic} from models/topics.csv."""
    with open(MODELS / "topics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    mapping = {(row["source"], row["label"]): row["topic"] for row in rows}
    unknown = {t for t in mapping.values() if t not in TOPICS}
    assert not unknown, f"topics.csv names topics outside DESIGN §9: {unknown}"
    return mapping


def reuters_topic(categories, mapping):
    topics = {mapping.get(("reuters", c), "other") for c in categories}
    for topic in TOPIC_PRIORITY:
        if topic in topics:
            return topic
    return "other"  # no category, or only ones outside the priority list


def phrasebank_agreement():
    """{sentence: strictest annotator agreement it reached (50, 66, 75 or 100)}."""
    with open(DATA / "financial-phrasebank" / "fpb_train.csv", newline="", encoding="utf-8") as f:
        return {row["text"]: int(row["agree"]) for row in csv.DictReader(f)}


def sentfin_headline_label(entities):
    """The headline's label when all its entities agree, else None ("A beats, B misses")."""
    labels = set(json.loads(entities).values())
    return labels.pop() if len(labels) == 1 else None


class Item:
    """One training or evaluation text with the labels it has (None for a head it does not train)."""
    __slots__ = ("text", "sentiment", "topic", "source", "lead", "agree")

    def __init__(self, text, source, sentiment=None, topic=None, lead=None, agree=None):
        self.text, self.source, self.lead, self.agree = text, source, lead, agree
        self.sentiment = None if sentiment is None else SENTIMENT.index(sentiment)
        self.topic = None if topic is None else TOPICS.index(topic)


def load():
    """{"train": {set: [Item]}, "dev": {...}, "final": {...}} for the sets
    phrasebank, tweets_sentiment, sentfin, tweets_topic and reuters."""
    splits = {name: {} for name in ("train", "dev", "final")}

    def add(set_name, key, item):
        splits[split_of(key)].setdefault(set_name, []).append(item)

    with open(DATA / "financial-phrasebank" / "fpb_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            add("phrasebank", row["text"], Item(row["text"], "phrasebank", sentiment=row["label"], agree=int(row["agree"])))

    with open(DATA / "twitter-financial-news-sentiment" / "sent_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            add("tweets_sentiment", row["text"], Item(row["text"], "tweets_sentiment", sentiment=TWITTER_LABELS[row["label"]]))

    with open(DATA / "sentfin" / "sentfin_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = sentfin_headline_label(row["entities"])
            if label is not None:
                add("sentfin", row["title"], Item(row["title"], "sentfin", sentiment=label))

    mapping = topic_map()
    with open(DATA / "twitter-financial-news-topic" / "topic_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            topic = mapping[("twitter-financial-news-topic", row["label"])]
            add("tweets_topic", row["text"], Item(row["text"], "tweets_topic", topic=topic))

    with open(DATA / "reuters21578" / "modapte_train.jsonl", encoding="utf-8") as f:
        for line in f:
            story = json.loads(line)
            headline = story["headline"].strip()
            if not headline:
                continue
            body = " ".join((story["body"] or "").split())
            lead = with_body(headline, body, BODY_CHARS) if body else None
            add("reuters", story["id"], Item(headline, "reuters", topic=reuters_topic(story["topics"], mapping), lead=lead))
    return splits


if __name__ == "__main__":
    for split, sets in load().items():
        print(split, {name: len(items) for name, items in sets.items()})
