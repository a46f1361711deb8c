"""Sets the rule by which bearwatch gives an analyst's correction to near-duplicates of the corrected
headline (issue 16, "corrections act at once"), and measures it.

A headline matches a corrected one (as `feedback::Memory::lookup` decides) when
- its text is the same once case, punctuation and spacing are ignored (`feedback::match_key`); or
- the two differ in one stretch of at most `max_span` words, the words around it are at least
  `min_shared` of the longer text, the model gives both the same topic, and its sentiment
  probabilities for the two differ by at most `max_distance` (total variation): the model reads them
  the same way, so the difference is a name or a number, not what the headline says.

What should match: the same story re-sent with small changes (case, punctuation, a source suffix),
and the same wording about another company (a SEntFiN headline with its entity swapped). What must
not: any other headline (the nearest of a memory of corrected ones), and a positive or negative
headline with its direction flipped (rise <-> fall, profit <-> loss, ...). And on real pairs of
labelled texts of one split, a label carried from one to the other must be right.

The pooled `embedding` output was tried first: at cosine >= 0.94 (the threshold that kept other
headlines under 1 %) it matched 69-73 % of re-sent and 3-5 % of swapped headlines but 7 % of flips,
and as an extra guard on the rule above it removed swaps without removing flips.

The rule is chosen on the dev split, then every rate is reported on the final split with a 95 %
Wilson interval. Writes models/near_duplicates.json and the rule into models/labels.json as
`near_duplicates`.
    ../../.venv-train/bin/python near_duplicates.py [--model ../model.onnx]
"""
import argparse
import csv
import json
import random
import re

import numpy as np

import data
from evaluate import predict, wilson

MEMORY = 500          # corrected SEntFiN headlines the memory holds in the simulation...
MAX_FLIPS = 1000      # ...plus up to this many polar headlines that have a direction word
FALSE_MATCH_BUDGET = 0.01   # other headlines
# Flips are generated, and about 1 in 10 does not reverse the headline ("Hindalco plunges as Q1 net
# profit shrinks" -> "... net loss shrinks" still reads negative; the model's sentiment moves by less
# than 0.05 on 9 % of them), so they get a looser budget.
FLIP_BUDGET = 0.10
# On real labelled pairs, a carried sentiment label must be right this often.
CARRY_RIGHT = 0.9
FLIPS = [("rise", "fall"), ("rises", "falls"), ("gain", "loss"), ("gains", "losses"), ("up", "down"),
         ("profit", "loss"), ("beats", "misses"), ("higher", "lower"), ("surges", "plunges"),
         ("jumps", "slumps"), ("upgrade", "downgrade"), ("upgrades", "downgrades"), ("rose", "fell"),
         ("increase", "decrease"), ("strong", "weak"), ("buy", "sell")]


def score(path, texts):
    """Sentiment probabilities and topic index of each text, from the model bearwatch runs."""
    sent, topic = predict(path, texts, 1, data.MODELS / "tokenizer.json")
    return sent, topic.argmax(1)


def headlines(split):
    """(text, entities) of the split's SEntFiN headlines; plain Reuters and tweet headlines; and the
    texts whose gold sentiment is negative or positive (whose direction, flipped, flips the label)."""
    sentfin, other = [], []
    with open(data.DATA / "sentfin" / "sentfin_train.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if data.split_of(row["title"]) == split:
                sentfin.append((row["title"], list(json.loads(row["entities"]))))
    sets = data.load()[split]
    for name in ("reuters", "tweets_sentiment"):
        other += [item.text for item in sets.get(name, [])]
    neutral = data.SENTIMENT.index("neutral")
    polar = {item.text for name in ("sentfin", "tweets_sentiment") for item in sets.get(name, [])
             if item.sentiment is not None and item.sentiment != neutral}
    return sentfin, other, polar


def resent(text, rng):
    """The same story sent again with a small change."""
    change = rng.choice(["upper", "lower", "punct", "suffix", "space"])
    if change == "upper":
        return text.upper()
    if change == "lower":
        return text.lower()
    if change == "punct":
        return text.rstrip(".!") + "." if not text.endswith(".") else text[:-1]
    if change == "suffix":
        return text + " - Reuters"
    return "  ".join(text.split(" ", 1)) if " " in text else text + " "


def swapped(text, entities, names, rng):
    """The same wording about another company, or None when the headline names no entity."""
    present = [e for e in entities if e in text]
    if not present:
        return None
    entity = rng.choice(present)
    other = rng.choice([n for n in names if n != entity and n not in text])
    return text.replace(entity, other)


def flipped(text):
    """The headline with one direction word replaced by its opposite, or None."""
    for a, b in FLIPS:
        for x, y in ((a, b), (b, a)):
            pattern = re.compile(rf"\b{x}\b", re.IGNORECASE)
            if pattern.search(text):
                return pattern.sub(y, text, count=1)
    return None


def words(text):
    """What `feedback::match_key` hashes: lower case, runs of letters and digits."""
    return "".join(c if c.isalnum() else " " for c in text.lower()).split()


def aligned(a, b):
    """(shared share, longest differing span): how much of the longer text the common prefix and
    suffix cover, and how many words differ in between on the longer side."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    longest = max(len(a), len(b), 1)
    return (p + s) / longest, max(len(a), len(b)) - p - s


class Memory:
    """The corrected texts, as the Rust side keeps them, with the model's outputs on each."""

    def __init__(self, model, texts):
        self.words = [words(t) for t in texts]
        self.keys = {" ".join(w) for w in self.words}
        self.sent, self.topic = score(model, texts)
        self.by_end = {}
        for i, w in enumerate(self.words):
            for end in {w[0], w[-1]} if w else ():
                self.by_end.setdefault(end, []).append(i)


def features(memory, model, texts):
    """Per query: same normalized text; and over the memory texts that share its first or last word,
    the candidates as (shared share, differing span, sentiment distance, same topic)."""
    sent, topic = score(model, texts)
    out = []
    for q, text in enumerate(texts):
        w = words(text)
        same = " ".join(w) in memory.keys
        candidates = {i for end in ({w[0], w[-1]} if w else ()) for i in memory.by_end.get(end, [])}
        rows = []
        for i in candidates:
            share, span = aligned(w, memory.words[i])
            tv = 0.5 * float(np.abs(sent[q] - memory.sent[i]).sum())
            rows.append((share, span, tv, topic[q] == memory.topic[i]))
        out.append((same, rows))
    return out


def simulate(model, split, seed):
    """Features of each kind of query: should match (re-sent, swapped), must not (other, flipped)."""
    rng = random.Random(seed)
    sentfin, other, polar = headlines(split)
    names = sorted({e for _, entities in sentfin for e in entities})
    rng.shuffle(sentfin)
    chosen = sentfin[:MEMORY]
    pool = [t for t, _ in sentfin[MEMORY:]] + other
    rng.shuffle(pool)
    flips = [(t, f) for t in pool if t in polar and (f := flipped(t))][:MAX_FLIPS]
    texts = [t for t, _ in chosen] + [t for t, _ in flips]
    in_memory = set(texts)
    queries = {
        "resent": [resent(t, rng) for t, _ in chosen],
        "swapped": [s for t, e in chosen if (s := swapped(t, e, names, rng))],
        "flipped": [f for _, f in flips],
        "other": [t for t in pool if t not in in_memory][:3000],
    }
    memory = Memory(model, texts)
    return {kind: features(memory, model, q) for kind, q in queries.items()}


def carried(model, split):
    """Real pairs: each labelled text of the split against every other text of its head's sets
    (leave one out). Returns per head (gold labels, model labels, features against the others, the
    others' gold labels): carrying the nearest match's label is right when the two gold labels agree."""
    sets = data.load()[split]
    out = {}
    for head, names in (("sentiment", ("phrasebank", "sentfin", "tweets_sentiment")), ("topic", ("tweets_topic", "reuters"))):
        items = [item for name in names for item in sets.get(name, [])]
        texts = [item.text for item in items]
        gold = np.array([getattr(item, head) for item in items])
        sent, topic = score(model, texts)
        predicted = sent.argmax(1) if head == "sentiment" else topic
        tokens = [words(t) for t in texts]
        by_end = {}
        for i, w in enumerate(tokens):
            for end in {w[0], w[-1]} if w else ():
                by_end.setdefault(end, []).append(i)
        feats = []
        for q, w in enumerate(tokens):
            candidates = {i for end in ({w[0], w[-1]} if w else ()) for i in by_end.get(end, []) if i != q}
            rows = []
            for i in candidates:
                share, span = aligned(w, tokens[i])
                tv = 0.5 * float(np.abs(sent[q] - sent[i]).sum())
                rows.append((share, span, tv, topic[q] == topic[i], i))
            feats.append((" ".join(w), rows))
        keys = [" ".join(w) for w in tokens]
        out[head] = (gold, predicted, feats, keys)
    return out


def carry_rates(real, rule):
    """Per head: how many texts would get another text's label, and how often that label is right,
    against how often the model is right on those same texts."""
    out = {}
    for head, (gold, predicted, feats, keys) in real.items():
        got = right = model_right = 0
        for q, (key, rows) in enumerate(feats):
            same = [r for r in rows if keys[r[4]] == key]
            near = [r for r in rows if r[0] >= rule["min_shared"] and r[1] <= rule["max_span"]
                    and r[2] <= rule["max_distance"] and r[3]]
            best = same or sorted(near, key=lambda r: (-r[0], r[2]))
            if best:
                got += 1
                right += int(gold[best[0][4]] == gold[q])
                model_right += int(predicted[q] == gold[q])
        n = len(feats)
        out[head] = {"n": n, "carried": round(got / max(n, 1), 4), "carried_right": round(right / max(got, 1), 4),
                     "carried_right_95": wilson(right, got), "model_right_on_them": round(model_right / max(got, 1), 4)}
    return out


def matches(rule, feats):
    """Whether a query matches some memory text under `rule` (as `Memory::lookup` decides)."""
    same, rows = feats
    share, span, distance = rule["min_shared"], rule["max_span"], rule["max_distance"]
    return same or any(r[0] >= share and r[1] <= span and r[2] <= distance and r[3] for r in rows)


def rates(results, rule):
    out = {}
    for kind, feats in results.items():
        hits, n = sum(matches(rule, f) for f in feats), len(feats)
        out[kind] = {"n": n, "matched": round(hits / max(n, 1), 4), "matched_95": wilson(hits, n),
                     "same_text": round(sum(f[0] for f in feats) / max(n, 1), 4)}
    return out


RULES = [{"min_shared": a, "max_span": b, "max_distance": c}
         for a in (0.8, 0.7, 0.6, 0.5, 0.4) for b in (1, 2, 3, 4, 5) for c in (0.02, 0.05, 0.1, 0.2, 0.3, 1.0)]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(data.MODELS / "model.onnx"))
    p.add_argument("--seed", type=int, default=13)
    args = p.parse_args()
    dev, dev_real = simulate(args.model, "dev", args.seed), carried(args.model, "dev")
    # The rule that matches the most wanted queries (re-sent and swapped) on dev while the wrong
    # matches stay within budget and labels carried between real dev texts are right at least
    # CARRY_RIGHT of the time (the first such in RULES on ties).
    best = None
    for rule in RULES:
        r, c = rates(dev, rule), carry_rates(dev_real, rule)["sentiment"]
        if r["other"]["matched"] > FALSE_MATCH_BUDGET or r["flipped"]["matched"] > FLIP_BUDGET or c["carried_right"] < CARRY_RIGHT:
            continue
        wanted = r["resent"]["matched"] + r["swapped"]["matched"]
        if best is None or wanted > best[0] + 1e-9:
            best = (wanted, rule)
    if best is None:
        raise SystemExit("no rule meets the budgets on dev")
    rule = best[1]
    final, final_real = simulate(args.model, "final", args.seed), carried(args.model, "final")
    report = {
        "rule": rule,
        "chosen_on": "dev", "memory": MEMORY, "flips": MAX_FLIPS, "false_match_budget": FALSE_MATCH_BUDGET,
        "flip_budget": FLIP_BUDGET, "carry_right": CARRY_RIGHT, "seed": args.seed,
        "dev": rates(dev, rule), "final": rates(final, rule),
        "dev_real": carry_rates(dev_real, rule), "final_real": carry_rates(final_real, rule),
    }
    (data.MODELS / "near_duplicates.json").write_text(json.dumps(report, indent=2) + "\n")
    labels_path = data.MODELS / "labels.json"
    text = labels_path.read_text()
    labels = json.loads(text)
    labels["near_duplicates"] = rule
    # One key per line as the file is written by hand, lists kept on one line.
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in labels.items()]
    labels_path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
