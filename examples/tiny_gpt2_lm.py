"""Which training sequences taught a tiny GPT-2 to answer a prompt, and which of their tokens mattered?

    python examples/tiny_gpt2_lm.py                     # default size: about a minute on 2 idle CPU cores
    python examples/tiny_gpt2_lm.py --per-family 16 --queries-per-family 4    # the CI size: a few seconds

A small GPT-2 (``transformers.GPT2LMHeadModel`` from a ``GPT2Config``: 2 layers, 64 dimensions, random init) is
trained from scratch, with an ordinary PyTorch loop, on a generated corpus of instruction-style sequences in eight
*families* modelled on the DataInf paper's sentence-transformation task (Kwon et al. 2023, §4.3 and Table 5): each
family has its own instruction prefix and transforms the words after it, e.g.

    <bos> reverse these words : hot slow full -> full slow hot <eos>
    <bos> give the opposites : hot slow full -> cold fast empty <eos>
    <bos> increment each digit : 3 0 7 -> 4 1 8 <eos>

The tokenizer is a word-level vocabulary written over the corpus (no downloads). The loss is the summed negative
log-likelihood of the response (the tokens after ``->`` and ``<eos>``); prompt and padding positions are masked out.

For held-out query sequences of every family it then shows:

1. how well influence finds the query's family, per method (``ekfac``, ``kfac``, ``datainf``, ``identity``), with
   the paper's §4.3 metrics averaged over the queries: the fraction of the top-``k`` training sequences by
   ``|influence|`` (helpful or harmful) that come from the query's family, for ``k = 10`` and for ``k`` = sequences
   per family (the paper's *recall*), chance 1/8 for both; and the *class-detection AUC* of ``|influence|`` for
   same-family training sequences (chance 0.5). Then the most harmful and most helpful training sequences of one
   query.
2. per-token scores of the most helpful training sequence (``hookinf.influence(..., per_token=True)``): the part of
   its score carried by each position's activations in the tracked layers, as coloured text and a table. They are
   checked to sum to the sequence's score from a call without ``per_token``; padding carries exactly zero.

GPT-2's ``lm_head`` is tied to the token embedding ``wte`` (an ``nn.Embedding``, which hookinf cannot track), so
hookinf's default selection would leave it out with a warning; here ``modules=["transformer.h.*"]`` selects the
``Conv1D`` layers of the transformer blocks (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``)
explicitly, and no warning is raised.

``main`` returns the numbers the CI smoke test (``tests/test_example_tiny_gpt2.py``) asserts on; run as a script,
it exits non-zero if a method does no better than chance.
"""

import argparse
import copy
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# transformers reads these at import time: everything below runs offline (the model is built from a config).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

import hookinf
from hookinf.metrics import auc

# ------------------------------------------------------------------------------------------------------ corpus
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "happy": "sad",
    "light": "dark",
    "early": "late",
    "open": "closed",
    "rich": "poor",
    "loud": "quiet",
    "high": "low",
    "wet": "dry",
    "hard": "soft",
    "full": "empty",
    "good": "bad",
    "near": "far",
}
ANTONYMS |= {b: a for a, b in list(ANTONYMS.items())}
WORDS = sorted(ANTONYMS)  # 32 words, every one with an opposite
DIGITS = [str(d) for d in range(10)]


@dataclass(frozen=True)
class Family:
    """A sentence transformation: its instruction prefix, its input words and the rule.

    Attributes:
        name: short name shown in the tables.
        prompt: the instruction prefix (words).
        pool: the words inputs are drawn from.
        rule: input words → output words.
    """

    name: str
    prompt: str
    pool: list[str]
    rule: Callable[[list[str]], list[str]]


FAMILIES = [
    Family("reverse", "reverse these words :", WORDS, lambda w: w[::-1]),
    Family("repeat", "repeat each word :", WORDS, lambda w: [x for x in w for _ in (0, 1)]),
    Family("opposite", "give the opposites :", WORDS, lambda w: [ANTONYMS[x] for x in w]),
    Family("capitalize", "capitalize each word :", WORDS, lambda w: [x.capitalize() for x in w]),
    Family("count", "count these words :", WORDS, lambda w: [str(len(w))]),
    Family("last", "say last word :", WORDS, lambda w: w[-1:]),
    Family("drop-first", "drop first word :", WORDS, lambda w: w[1:]),
    Family("add-one", "increment each digit :", DIGITS[:-1], lambda w: [str(int(x) + 1) for x in w]),
]
ARROW, BOS, EOS, PAD = "->", "<bos>", "<eos>", "<pad>"
IGNORE = -100  # label of positions outside the response (hookinf.CrossEntropy's ignore_index)


@dataclass(frozen=True)
class Example:
    """One sequence of the corpus: its family (index into ``FAMILIES``) and its words."""

    family: int
    prompt: list[str]
    response: list[str]

    @property
    def words(self) -> list[str]:
        """``<bos> prompt -> response <eos>``."""
        return [BOS, *self.prompt, ARROW, *self.response, EOS]

    def text(self) -> str:
        """The sequence without the special tokens."""
        return " ".join([*self.prompt, ARROW, *self.response])


def make_corpus(per_family: int, rng: random.Random) -> list[Example]:
    """``per_family`` distinct sequences of every family (3–5 input words each), families interleaved."""
    by_family: list[list[Example]] = []
    for index, family in enumerate(FAMILIES):
        seen: set[tuple[str, ...]] = set()
        examples = []
        while len(examples) < per_family:
            words = [rng.choice(family.pool) for _ in range(rng.randint(3, 5))]
            if tuple(words) in seen:
                continue
            seen.add(tuple(words))
            examples.append(Example(index, [*family.prompt.split(), *words], family.rule(words)))
        by_family.append(examples)
    return [ex for group in zip(*by_family, strict=True) for ex in group]


class WordTokenizer:
    """A word-level vocabulary over the corpus: ``<pad>``, ``<bos>``, ``<eos>`` are 0, 1, 2, then the words sorted."""

    def __init__(self, examples: list[Example]) -> None:
        words = sorted({w for ex in examples for w in ex.words} - {PAD, BOS, EOS})
        self.vocab = [PAD, BOS, EOS, *words]
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, examples: list[Example], length: int) -> tuple[Tensor, Tensor]:
        """Token ids and response labels ``[N, length]``, right-padded; labels are ``IGNORE`` outside the response.

        The label of position ``t`` is the token the model must predict there after the shift (hookinf's
        ``CrossEntropy(shift=True)`` predicts token ``t + 1`` from position ``t``): the response words and ``<eos>``.
        """
        ids = torch.zeros(len(examples), length, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
        for row, ex in enumerate(examples):
            tokens = [self.ids[w] for w in ex.words]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            start = len(ex.prompt) + 2  # after <bos>, the prompt and "->"
            labels[row, start : len(tokens)] = ids[row, start : len(tokens)]
        return ids, labels

    def decode(self, ids: Tensor) -> list[str]:
        """Token ids → words."""
        return [self.vocab[int(i)] for i in ids]


# ------------------------------------------------------------------------------------------------------ model
def build_model(vocab_size: int, length: int, seed: int) -> GPT2LMHeadModel:
    """A 2-layer, 64-dimensional GPT-2 with random weights (dropout off: attributions of a deterministic model)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=length,
        n_embd=64,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def logits_of(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Next-token logits ``[B, T, V]``; padding (id 0, on the right) is masked out of attention.

    With causal attention and right padding a real token never attends to a padding token anyway, and padding
    positions carry no label, so they add nothing to the loss or its gradients: their per-token scores are 0.
    """
    ids = batch[0]
    return model(input_ids=ids, attention_mask=(ids != 0).long()).logits


# Summed NLL of each sequence's response tokens [B]: the training loss, and the loss influence is computed for.
# per_example="sum" (the default) makes an example's score the sum of its per-token scores.
LOSS = hookinf.CrossEntropy(logits=logits_of, target=lambda batch: batch[1], shift=True, ignore_index=IGNORE)


def train(model: nn.Module, ids: Tensor, labels: Tensor, epochs: int, seed: int, batch_size: int = 32) -> None:
    """An ordinary training loop (AdamW on the mean response loss per sequence)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
    steps = epochs * -(-len(ids) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=generator).split(batch_size):
            optimizer.zero_grad()
            LOSS(model, (ids[idx], labels[idx])).mean().backward()
            optimizer.step()
            schedule.step()
    model.eval()


@torch.no_grad()
def complete(model: nn.Module, tok: WordTokenizer, ex: Example, length: int) -> list[str]:
    """Greedy completion of ``<bos> prompt ->`` until ``<eos>`` or ``length`` tokens (the model's positions)."""
    ids = torch.tensor([[tok.ids[w] for w in [BOS, *ex.prompt, ARROW]]])
    out: list[str] = []
    for _ in range(length - ids.shape[1]):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if tok.vocab[nxt] == EOS:
            break
        out.append(tok.vocab[nxt])
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def batches(ids: Tensor, labels: Tensor, size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """In-order batches (hookinf iterates the training data several times, in the same order)."""
    return [(ids[i : i + size], labels[i : i + size]) for i in range(0, len(ids), size)]


# ------------------------------------------------------------------------------------------------------ metrics
def same_family_fraction(scores: Tensor, train_family: Tensor, query_family: Tensor, k: int) -> float:
    """Fraction of the top-``k`` training sequences by ``|influence|`` from the query's family, mean over queries.

    Helpful and harmful both count (the absolute value). With ``k`` = sequences per family it is the DataInf paper's
    *recall* (§4.3).

    Args:
        scores: ``[n_query, n_train]`` influence.
        train_family: ``[n_train]`` family of each training sequence.
        query_family: ``[n_query]`` family of each query.
        k: how many top training sequences to look at.
    """
    same = train_family[None, :] == query_family[:, None]  # [n_query, n_train]
    top = scores.abs().topk(k, dim=1).indices
    return float(same.gather(1, top).double().mean())


def family_auc(scores: Tensor, train_family: Tensor, query_family: Tensor) -> float:
    """Mean over the queries of the AUC of ``|influence|`` for detecting the query's family (DataInf §4.3)."""
    aucs = [auc(scores[q].abs(), train_family == query_family[q]) for q in range(len(scores))]
    return sum(aucs) / len(aucs)


# ------------------------------------------------------------------------------------------------------ rendering
def top_table(scores: Tensor, examples: list[Example], query: Example, k: int) -> Table:
    """The ``k`` most harmful (+) and most helpful (−) training sequences of one query, with their families."""
    table = Table(title=f"Query ({FAMILIES[query.family].name}): {query.text()}", title_justify="left")
    table.add_column("")
    table.add_column("train", justify="right")
    table.add_column("score", justify="right")
    table.add_column("family")
    table.add_column("sequence")
    for label, descending in (("harmful", True), ("helpful", False)):
        for j in scores.argsort(descending=descending)[:k].tolist():
            family = FAMILIES[examples[j].family].name
            style = "bold" if examples[j].family == query.family else "dim"
            table.add_row(label, str(j), f"{float(scores[j]):+.3g}", f"[{style}]{family}[/]", examples[j].text())
    return table


def token_text(words: list[str], values: Tensor) -> Text:
    """The tokens coloured by their per-token score: red harmful (+), green helpful (−), brighter = larger."""
    scale = float(values.abs().max()) or 1.0
    text = Text()
    for word, value in zip(words, values.tolist(), strict=True):
        level = min(1.0, abs(value) / scale)
        shade = int(255 * (1 - level))
        color = f"rgb(255,{shade},{shade})" if value > 0 else f"rgb({shade},255,{shade})"
        text.append(word, style=f"black on {color}" if level > 0.05 else "")
        text.append(" ")
    return text


def token_table(words: list[str], values: Tensor, total: float) -> Table:
    """Per-token scores with their share of the sequence's score."""
    table = Table(title_justify="left", show_edge=False)
    table.add_column("t", justify="right")
    table.add_column("token")
    table.add_column("score", justify="right")
    table.add_column("of total", justify="right")
    table.add_column("")
    scale = float(values.abs().max()) or 1.0
    for t, (word, value) in enumerate(zip(words, values.tolist(), strict=True)):
        bar = ("[red]" if value > 0 else "[green]") + "█" * round(12 * abs(value) / scale) + "[/]"
        table.add_row(str(t), word, f"{value:+.3g}", f"{value / total:+.0%}", bar)
    return table


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the example.

    Returns:
        ``{"families", "accuracy", "top_k", "recall", "auc", "token_sum_error", "padding_score"}``: the number of
        families (the chance fraction is its inverse), the exact-match accuracy of greedy completions of the
        queries, method → mean same-family fraction among the top ``--top-k`` and the top ``--per-family``
        (recall) and mean class-detection AUC, the largest ``|Σ_t per-token − plain score|`` relative to the
        largest plain score, and the largest ``|per-token score|`` at a padding position (exactly 0 expected).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-family", type=int, default=300, help="training sequences per family")
    parser.add_argument("--queries-per-family", type=int, default=8, help="held-out query sequences per family")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ekfac", "kfac", "datainf", "identity"],
        help="influence methods to compare (not exact: c_attn and c_fc are above hookinf.Exact's max_dim)",
    )
    parser.add_argument("--top-k", type=int, default=10, help="top training sequences checked for the family")
    parser.add_argument("--top", type=int, default=5, help="rows of the harmful / helpful tables")
    args = parser.parse_args(argv)
    console = Console()
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    # Data: one corpus, split per family into training and held-out query sequences (all distinct).
    corpus = make_corpus(args.per_family + args.queries_per_family, random.Random(args.seed))
    n_train = args.per_family * len(FAMILIES)
    examples, queries = corpus[:n_train], corpus[n_train:]
    tok = WordTokenizer(corpus)
    length = max(len(ex.words) for ex in corpus)
    train_ids, train_labels = tok.encode(examples, length)
    query_ids, query_labels = tok.encode(queries, length)
    train_family = torch.tensor([ex.family for ex in examples])
    query_family = torch.tensor([ex.family for ex in queries])

    model = build_model(len(tok.vocab), length, args.seed)
    train(model, train_ids, train_labels, args.epochs, args.seed)
    correct = [complete(model, tok, ex, length) == ex.response for ex in queries]
    accuracy = sum(correct) / len(correct)
    console.print(
        f"Trained a {sum(p.numel() for p in model.parameters()):,}-parameter GPT-2 on {len(examples)} sequences "
        f"({len(FAMILIES)} families × {args.per_family}, vocabulary {len(tok.vocab)}) for {args.epochs} epochs: "
        f"greedy completions of the {len(queries)} held-out queries are {accuracy:.0%} exactly right."
    )

    # Influence in float64 (a copy: the trained model is left as it is), so the checks below are tight.
    scored = copy.deepcopy(model).double()
    train_data = batches(train_ids, train_labels)
    query_data = batches(query_ids, query_labels)
    # lm_head shares its weight with the embedding wte, which hookinf cannot track: select the blocks' Conv1D
    # layers explicitly rather than let the default selection drop lm_head with a warning.
    blocks = ["transformer.h.*"]
    kw: dict[str, Any] = {"modules": blocks, "progress": False}

    # (1) Which training sequences influence each query, and do they come from the query's family?
    recall: dict[str, float] = {}
    top_k: dict[str, float] = {}
    class_auc: dict[str, float] = {}
    per_method: dict[str, Tensor] = {}
    curvatures: dict[str, hookinf.Curvature] = {}
    for method in args.methods:
        tick = time.perf_counter()
        if method in ("ekfac", "kfac"):  # fit once (streaming), then score; the curvature is reused in (2)
            curvatures[method] = hookinf.fit(scored, train_data, LOSS, method=method, **kw)
            scores = hookinf.influence(scored, train_data, query_data, LOSS, method=curvatures[method], **kw)
        else:
            scores = hookinf.influence(scored, train_data, query_data, LOSS, method=method, **kw)
        per_method[method] = scores.total
        recall[method] = same_family_fraction(scores.total, train_family, query_family, args.per_family)
        top_k[method] = same_family_fraction(scores.total, train_family, query_family, args.top_k)
        class_auc[method] = family_auc(scores.total, train_family, query_family)
        console.print(f"  {method:9s} {time.perf_counter() - tick:5.1f} s")
    chance = 1 / len(FAMILIES)
    table = Table(
        title=f"Query's family among the most influential, {len(queries)} queries",
        title_justify="left",
    )
    table.add_column("method")
    table.add_column(f"same family in top {args.top_k}", justify="right")
    table.add_column(f"recall@{args.per_family}", justify="right")
    table.add_column("class-detection AUC", justify="right")
    table.add_row("(chance)", f"{chance:.3f}", f"{chance:.3f}", "0.5")
    for method in args.methods:
        table.add_row(method, f"{top_k[method]:.3f}", f"{recall[method]:.3f}", f"{class_auc[method]:.3f}")
    console.print(table)

    shown = args.methods[0]
    query_index = next(i for i, ex in enumerate(queries) if FAMILIES[ex.family].name == "opposite")
    console.print(top_table(per_method[shown][query_index], examples, queries[query_index], args.top))
    console.print(f"({shown}; positive = harmful: up-weighting the sequence raises the query's loss.)")

    # (2) Per-token scores of the most helpful training sequence for that query.
    query_one = [(query_ids[query_index : query_index + 1], query_labels[query_index : query_index + 1])]
    solver = curvatures.get(shown) or shown  # reuse a fitted curvature
    tokens = hookinf.influence(scored, train_data, query_one, LOSS, method=solver, per_token=True, **kw)
    per_token = tokens.token_scores()[0]  # [n_train, T]: summed over layers
    plain = per_method[shown][query_index]  # [n_train]: the same query's scores from the call without per_token
    # Independent paths: the per-token call contracts each position separately ("qbs"), the plain call the whole
    # example ("qb"), and their queries went through the model in batches of different sizes; in float64 the sums
    # agree up to rounding (~1e-16 relative).
    token_sum_error = float((per_token.sum(dim=1) - plain).abs().max() / plain.abs().max())
    padding = train_ids == 0  # [n_train, T]
    padding_score = float(per_token[padding].abs().max()) if padding.any() else 0.0
    j = int(plain.argmin())
    real = int((~padding[j]).sum())
    words = tok.decode(train_ids[j, :real])
    values = per_token[j, :real]
    console.print(
        f"\nPer-token scores of training sequence {j} ({FAMILIES[examples[j].family].name}), the most helpful for "
        f"the query ({shown}); score {float(plain[j]):+.4g} = Σ tokens {float(values.sum()):+.4g}:"
    )
    console.print(token_text(words, values))
    console.print(token_table(words, values, float(plain[j])))
    n_prompt = len(examples[j].prompt) + 1  # <bos> and the instruction prefix and input words
    prompt_share = float(values[:n_prompt].abs().sum() / values.abs().sum())
    console.print(
        f"The prompt (<bos>, instruction, input words) carries {prompt_share:.0%} of |per-token influence|; the "
        f"positions after it the rest. Per-token sums match the plain scores to {token_sum_error:.1e} (relative); "
        f"padding positions carry {padding_score:.1g}.\nTotal time {time.perf_counter() - started:.0f} s."
    )
    return {
        "families": len(FAMILIES),
        "accuracy": accuracy,
        "top_k": top_k,
        "recall": recall,
        "auc": class_auc,
        "token_sum_error": token_sum_error,
        "padding_score": padding_score,
    }


if __name__ == "__main__":
    results = main()
    # Exit non-zero (a CI check) if a method finds the query's family no better than chance.
    chance = 1 / results["families"]
    better = all(results["recall"][m] > chance and results["auc"][m] > 0.5 for m in results["recall"])
    sys.exit(0 if better and results["token_sum_error"] < 1e-10 else 1)
