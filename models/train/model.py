"""A small BERT (MiniLM-L6: 6 layers; bge-small: 12) with a sentiment head and a topic head, in plain PyTorch.

Written out rather than imported from `transformers` so that training needs only torch and the
weights file, and so that the ONNX export is exactly this graph.
"""
import math

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, hidden, heads, intermediate, dropout):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.inter = nn.Linear(hidden, intermediate)
        self.out = nn.Linear(intermediate, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, bias):
        b, t, h = x.shape
        d = h // self.heads

        def split(y):
            return y.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
        ctx = (self.drop(scores.softmax(-1)) @ v).transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.drop(self.attn_out(ctx)))
        return self.out_norm(x + self.drop(self.out(nn.functional.gelu(self.inter(x)))))


class Classifier(nn.Module):
    def __init__(self, n_sentiment, n_topics, aux_sentiment=False, vocab=30522, hidden=384, layers=6, heads=12,
                 intermediate=1536, max_pos=512, dropout=0.1):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.token_type = nn.Embedding(2, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(Layer(hidden, heads, intermediate, dropout) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.sentiment = nn.Linear(hidden, n_sentiment)
        self.topic = nn.Linear(hidden, n_topics)
        # Training-only head for a second sentiment set whose labels mean something else
        # (bullish/bearish tweets); not exported.
        self.aux_sentiment = nn.Linear(hidden, n_sentiment) if aux_sentiment else None

    def encode(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
        x = self.word(input_ids) + self.pos(pos) + self.token_type.weight[0]
        x = self.drop(self.emb_norm(x))
        mask = attention_mask.unsqueeze(1).unsqueeze(2).to(x.dtype)
        bias = (1.0 - mask) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        # Mean pooling over real tokens: how all-MiniLM-L6-v2 was trained.
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def forward(self, input_ids, attention_mask):
        pooled = self.drop(self.encode(input_ids, attention_mask))
        return self.sentiment(pooled), self.topic(pooled)

    def heads(self, input_ids, attention_mask):
        """All training heads: sentiment, topic and (if any) auxiliary sentiment logits."""
        pooled = self.drop(self.encode(input_ids, attention_mask))
        aux = self.aux_sentiment(pooled) if self.aux_sentiment is not None else None
        return self.sentiment(pooled), self.topic(pooled), aux

    def load_bert(self, state):
        """Loads BertModel weights, by their Hugging Face names, into this module."""
        names = {
            "word.weight": "embeddings.word_embeddings.weight",
            "pos.weight": "embeddings.position_embeddings.weight",
            "token_type.weight": "embeddings.token_type_embeddings.weight",
            "emb_norm.weight": "embeddings.LayerNorm.weight",
            "emb_norm.bias": "embeddings.LayerNorm.bias",
        }
        per_layer = {
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
            "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm",
        }
        for i in range(len(self.layers)):
            for ours, theirs in per_layer.items():
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        own = self.state_dict()
        for ours, theirs in names.items():
            own[ours] = state[theirs]
        missing = set(own) - set(names)
        assert all(m.split(".")[0] in ("sentiment", "topic", "aux_sentiment") for m in missing), missing
        self.load_state_dict(own)


class Exported(nn.Module):
    """The graph that ships: token ids and mask in, calibrated class probabilities out (each head's
    logits divided by its temperature, fitted on the dev split, before the softmax), and the pooled
    embedding both heads read, so that heads can be refitted and near-duplicates found without torch."""

    def __init__(self, model, sentiment_temperature=1.0, topic_temperature=1.0):
        super().__init__()
        self.model = model
        self.sentiment_temperature = sentiment_temperature
        self.topic_temperature = topic_temperature

    def forward(self, input_ids, attention_mask):
        pooled = self.model.encode(input_ids, attention_mask)
        s, t = self.model.sentiment(pooled), self.model.topic(pooled)
        return (s / self.sentiment_temperature).softmax(-1), (t / self.topic_temperature).softmax(-1), pooled
