"""Builds the bundled data files from ../shared/data (run once; the outputs are committed).

- pipelines/data/reuters-1987.jsonl: the first 3,000 Reuters-21578 ModApte training stories (26 Feb to
  12 Mar 1987, their own timestamps) as news messages (schemas/news.schema.json), in event-time order,
  for the demo pipeline and `bearwatch classify`.
- benches/data/headlines_mix.jsonl: 2,048 texts for the classifier benchmark: Reuters headlines and
  finance tweets (MIT) interleaved at random with a fixed seed, so lengths vary the way a real feed's do.
"""
import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main():
    stories = [json.loads(line) for line in open(DATA / "reuters21578" / "modapte_train.jsonl", encoding="utf-8")]
    stories = [s for s in stories if s["headline"].strip()]
    stories.sort(key=lambda s: (s["published_at"], s["id"]))
    with open(ROOT / "pipelines" / "data" / "reuters-1987.jsonl", "w", encoding="utf-8") as out:
        for s in stories[:3000]:
            body = " ".join((s["body"] or "").split())
            news = {"id": s["id"], "published_at": s["published_at"], "headline": s["headline"].strip(),
                    **({"body": body[:280]} if body else {}), "source": "reuters", "reuters_topics": s["topics"]}
            out.write(json.dumps(news) + "\n")

    rng = random.Random(7)
    headlines = [s["headline"].strip() for s in stories]
    with open(DATA / "twitter-financial-news-sentiment" / "sent_train.csv", newline="", encoding="utf-8") as f:
        tweets = [row["text"] for row in csv.DictReader(f)]
    mix = rng.sample(headlines, 1024) + rng.sample(tweets, 1024)
    rng.shuffle(mix)
    with open(ROOT / "benches" / "data" / "headlines_mix.jsonl", "w", encoding="utf-8") as out:
        for text in mix:
            out.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    main()
