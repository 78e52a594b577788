"""Sentiment training, the encoder and hf backends, calibration, explanations, artifacts and
the train/evaluate commands."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from pipeline.artifacts import ArtifactError
from pipeline.ingest import InputError
from pipeline.sentiment import LABELS
from pipeline.sentiment.backends import EncoderClassifier, HFClassifier, hf_label_order
from pipeline.sentiment.calibration import expected_calibration_error, fit_temperature, softmax
from pipeline.sentiment.data import load_labelled, parse_label_map, read_phrasebank
from pipeline.sentiment.metrics import classification_report
from pipeline.sentiment.model import weights_hash

# --- data -------------------------------------------------------------------------------------

def test_phrasebank_lines_are_latin1_crlf_and_split_at_the_last_at_sign(tmp_path):
    path = tmp_path / "fpb.txt"
    path.write_bytes("Net sales rose 5 % @ EUR 3m in Espoo , Finland .@positive\r\n"
                     "Café chain cuts 40 jobs .@negative\r\n"
                     "The board meets on Monday .@neutral\r\n".encode("latin-1"))
    data = read_phrasebank(path)
    assert data.texts[0] == "Net sales rose 5 % @ EUR 3m in Espoo , Finland ."
    assert data.texts[1] == "Café chain cuts 40 jobs ."
    assert [LABELS[i] for i in data.labels] == ["positive", "negative", "neutral"]
    lines = tmp_path / "lines.txt"
    lines.write_text("2\n0\n")
    subset = load_labelled(path, lines=lines)
    assert subset.texts == [data.texts[2], data.texts[0]] and subset.ids == ["fpb.txt:2",
                                                                             "fpb.txt:0"]
    lines.write_text("7\n")
    with pytest.raises(InputError, match="line number 7 is outside the file"):
        load_labelled(path, lines=lines)


def test_twitter_labels_need_the_preset_or_a_label_map(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_text('text,label\n"$AAPL down 3%",0\nFed holds rates,2\n"$TSLA soars",1\n')
    twitter = load_labelled(path, format="twitter")
    assert [LABELS[i] for i in twitter.labels] == ["negative", "neutral", "positive"]
    assert twitter.label_map == {"0": "negative", "1": "positive", "2": "neutral"}
    with pytest.raises(InputError, match=r"row 0: label '0' .*--label-map"):
        load_labelled(path)
    mapped = load_labelled(path, label_map="0=bearish,1=bullish,2=neutral")
    assert mapped.labels.tolist() == twitter.labels.tolist()
    with pytest.raises(ValueError, match="'great' is not one of"):
        parse_label_map("0=great")


def test_named_labels_are_read_as_names_when_a_label_map_is_given(tmp_path):
    """`sentiment evaluate` passes the map a model was trained with (Twitter's 0/1/2) to any
    data it evaluates: a CSV labelled with names must still read, and a numeric label the map
    does not know is still refused."""
    path = tmp_path / "named.csv"
    path.write_text('text,label\n"Profit warning, shares slump",negative\nBoard meets,neutral\n'
                    '"Record quarter",Positive\n"Guidance cut",0\n')
    data = load_labelled(path, label_map={"0": "negative", "1": "positive", "2": "neutral"})
    assert [LABELS[i] for i in data.labels] == ["negative", "neutral", "positive", "negative"]
    with pytest.raises(InputError, match=r"row 0: label '7' is not one of 0, 1, 2"):
        path.write_text("text,label\nx,7\n")
        load_labelled(path, label_map="0=negative,1=positive,2=neutral")


def test_classification_report_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    p = np.where(rng.random(500) < 0.7, y, rng.integers(0, 3, 500))
    report = classification_report(y, p)
    assert report["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert report["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert report["weighted_f1"] == pytest.approx(f1_score(y, p, average="weighted"))
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == \
        confusion_matrix(y, p).tolist()


def test_temperature_scaling_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 3))
    labels = np.array([rng.choice(3, p=row) for row in softmax(logits, 2.0)])
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.08)
    assert expected_calibration_error(softmax(logits, t), labels) < \
        expected_calibration_error(softmax(logits), labels) / 2


# --- the trained encoder backend --------------------------------------------------------------

def test_layer_lr_decay_gives_lower_layers_smaller_learning_rates():
    from pipeline.encoder import packaged_model_path
    from pipeline.sentiment.model import PooledClassifier, load_base
    from pipeline.sentiment.train import TrainConfig, _optimizer

    encoder, _ = load_base(packaged_model_path())
    model = PooledClassifier(encoder, len(LABELS))
    lr_of = {}
    optimizer = _optimizer(model, TrainConfig(learning_rate=1e-4, layer_lr_decay=0.5,
                                              freeze_embeddings=False))
    for group in optimizer.param_groups:
        for param in group["params"]:
            lr_of[id(param)] = group["lr"]
    named = dict(model.encoder.named_parameters())
    assert lr_of[id(named["encoder.layer.5.attention.self.query.weight"])] == pytest.approx(1e-4)
    assert lr_of[id(named["encoder.layer.0.attention.self.query.weight"])] == pytest.approx(
        1e-4 * 0.5 ** 5)
    assert lr_of[id(named["embeddings.word_embeddings.weight"])] == pytest.approx(1e-4 * 0.5 ** 6)
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3)
    flat = _optimizer(model, TrainConfig(layer_lr_decay=1.0))  # one encoder lr
    assert {g["lr"] for g in flat.param_groups} == {TrainConfig().learning_rate, 1e-3}
    _optimizer(model, TrainConfig())
    assert not model.encoder.get_input_embeddings().weight.requires_grad
    with pytest.raises(ValueError, match="layer_lr_decay"):
        TrainConfig(layer_lr_decay=0.0)


@pytest.fixture(scope="module")
def classifier(sentiment_model):
    return EncoderClassifier.load(sentiment_model["name"], sentiment_model["root"], device="cpu")


def test_training_on_a_small_slice_really_learns(sentiment_model, classifier):
    held = sentiment_model["held_out"]  # 50 per class: the majority class scores 1/3
    predictions = classifier.classify(held.texts, explain=False)
    predicted = np.array([LABELS.index(p.label) for p in predictions])
    accuracy = float((predicted == held.labels).mean())
    assert accuracy >= 0.6, accuracy  # typically ~0.75 after 2 short epochs
    trained = sentiment_model["trained"]
    assert trained.history[-1]["train_loss"] < trained.history[0]["train_loss"]
    assert 0.05 < trained.head.temperature < 20


def test_artifact_is_safetensors_with_manifest_hashes_and_model_card(sentiment_model,
                                                                     classifier):
    directory = sentiment_model["directory"]
    names = {p.name for p in directory.iterdir()}
    assert {"model.safetensors", "examples.safetensors", "README.md", "manifest.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pickle"))]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["weights_sha256"] == weights_hash(classifier.model)
    assert manifest["data"]["sha256"] == sentiment_model["train"].sha256
    card = (directory / "README.md").read_text()
    assert manifest["weights_sha256"] in card and manifest["data"]["sha256"] in card
    assert "Validation: accuracy" in card
    assert classifier.model_id == f"fpb-small@{manifest['weights_sha256'][:12]}"


def test_tampered_weights_are_refused(sentiment_model, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sentiment_model["directory"], copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"\x00" * 8)
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        EncoderClassifier.load(copy)


def test_inference_is_deterministic_calibrated_and_batch_independent(classifier,
                                                                      sentiment_model):
    texts = sentiment_model["held_out"].texts[:12]
    first = classifier.classify(texts, explain=False)
    again = classifier.classify(texts, explain=False)
    alone = classifier.classify(texts[3:4], explain=False)[0]
    assert [p.probabilities for p in first] == [p.probabilities for p in again]
    assert [alone.probabilities[k] for k in LABELS] == pytest.approx(
        [first[3].probabilities[k] for k in LABELS], abs=1e-5)
    # Probabilities are the temperature-scaled softmax of the network's logits.
    batch = classifier.tokenizer(texts[:1], return_tensors="pt", truncation=True,
                                 max_length=classifier.head.max_length)
    with torch.no_grad():
        logits, _ = classifier.model(batch["input_ids"], batch["attention_mask"])
    expected = softmax(logits.numpy(), classifier.head.temperature)[0]
    assert [first[0].probabilities[k] for k in LABELS] == pytest.approx(expected, abs=1e-5)


def test_occlusion_weights_are_the_probability_drop_without_the_word(classifier):
    text = "Operating profit fell sharply and the company cut its outlook"
    pred = classifier.classify([text])[0]
    words = pred.explanation["attributions"]["words"]
    assert pred.explanation["attributions"]["method"] == "occlusion"
    assert len(words) == 6 and words == sorted(words, key=lambda w: -abs(w["weight"]))
    top = words[0]
    tokens = text.split()
    without = " ".join(t for i, t in enumerate(tokens) if i != top["position"])
    assert top["word"] == tokens[top["position"]]
    dropped = classifier.classify([without], explain=False)[0]
    assert top["weight"] == pytest.approx(
        pred.probabilities[pred.label] - dropped.probabilities[pred.label], abs=1e-4)


def test_nearest_training_examples_find_the_training_sentence_itself(classifier,
                                                                      sentiment_model):
    train = sentiment_model["trained"].data.subset(sentiment_model["trained"].train_index)
    pred = classifier.classify([train.texts[5]])[0]
    nearest = pred.explanation["nearest_training_examples"]
    assert len(nearest) == 3
    assert nearest[0]["text"] == train.texts[5] and nearest[0]["similarity"] > 0.999
    assert nearest[0]["label"] == LABELS[train.labels[5]]
    assert nearest[0]["similarity"] >= nearest[1]["similarity"] >= nearest[2]["similarity"]


def test_int8_quantised_inference_agrees_with_fp32(sentiment_model, classifier):
    quantised = EncoderClassifier.load(sentiment_model["directory"], quantize=True,
                                       neighbours=0)
    texts = sentiment_model["held_out"].texts[::2]
    fp32 = [p.label for p in classifier.classify(texts, explain=False)]
    int8 = [p.label for p in quantised.classify(texts, explain=False)]
    assert np.mean(np.array(fp32) == np.array(int8)) >= 0.9
    assert quantised.audit_fields()["runtime"] == "int8-dynamic"


# --- the hf backend ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random BERT classifier whose outputs are in an unusual order: bullish, bearish,
    neutral."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.encoder import packaged_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_model_path()))
    torch.manual_seed(1)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=3,
                        id2label={0: "bullish", 1: "bearish", 2: "neutral"},
                        label2id={"bullish": 0, "bearish": 1, "neutral": 2})
    model = BertForSequenceClassification(config).eval()
    directory = tmp_path_factory.mktemp("hf") / "tiny-finbert"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model, tokenizer


def test_hf_backend_reads_the_label_order_from_the_checkpoint(hf_checkpoint):
    directory, model, tokenizer = hf_checkpoint
    hf = HFClassifier(directory)
    text = "Shares slump after the profit warning"
    pred = hf.classify([text])[0]
    with torch.no_grad():
        raw = torch.softmax(model(**tokenizer([text], return_tensors="pt")).logits, -1)[0]
    assert pred.probabilities["positive"] == pytest.approx(float(raw[0]), abs=1e-5)
    assert pred.probabilities["negative"] == pytest.approx(float(raw[1]), abs=1e-5)
    assert pred.probabilities["neutral"] == pytest.approx(float(raw[2]), abs=1e-5)
    assert pred.explanation["attributions"]["method"] == "occlusion"
    audit = hf.audit_fields()
    assert audit["id2label"] == {"0": "bullish", "1": "bearish", "2": "neutral"}
    assert "model.safetensors" in audit["weights_sha256"]


@pytest.mark.parametrize("which", ["only-pickle", "both"])
def test_hf_and_local_llm_checkpoints_with_pickle_weights_are_refused(hf_checkpoint, tmp_path,
                                                                     which):
    """Weights are loaded from safetensors only, for every backend: a checkpoint directory
    holding a pickle (alone, or beside safetensors) is refused naming it, before anything is
    unpickled, as the text encoder does."""
    import pickle
    import shutil
    from pathlib import Path

    from pipeline.encoder import UnsafeModelError
    from pipeline.sentiment.llm import LocalLLMClassifier

    directory = shutil.copytree(hf_checkpoint[0], tmp_path / "ckpt")
    marker = tmp_path / "pickle-ran"
    if which == "only-pickle":  # a real, loadable state dict
        (directory / "model.safetensors").unlink()
        torch.save(hf_checkpoint[1].state_dict(), directory / "pytorch_model.bin")
    else:

        class Payload:  # unpickling this would create the marker file: code execution
            def __reduce__(self):
                return (Path.touch, (marker,))

        (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    for load in (HFClassifier, LocalLLMClassifier.load):
        with pytest.raises(UnsafeModelError, match=r"pickle-format weights \(pytorch_model\.bin\)"):
            load(directory)
    assert not marker.exists()


def test_hf_labels_that_say_nothing_are_refused_unless_mapped():
    generic = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    with pytest.raises(ValueError, match="LABEL_0.*label map"):
        hf_label_order(generic)
    order = hf_label_order(generic, {"LABEL_0": "positive", "LABEL_1": "negative",
                                     "LABEL_2": "neutral"})
    assert order == [LABELS.index("positive"), LABELS.index("negative"),
                     LABELS.index("neutral")]
    with pytest.raises(ValueError, match="exactly once"):
        hf_label_order({0: "positive", 1: "bullish", 2: "neutral"})


# --- commands ---------------------------------------------------------------------------------

def _cli(*args: str):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, list(args))


def test_evaluate_command_writes_metrics_and_confusion_matrix(sentiment_model, tmp_path):
    held = sentiment_model["held_out"]
    data = tmp_path / "held.csv"
    import csv

    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((t, LABELS[y]) for t, y in zip(held.texts, held.labels, strict=True))
    result = _cli("sentiment", "evaluate", "--data", str(data), "--model",
                  sentiment_model["name"], "--root", str(sentiment_model["root"]),
                  "--output", str(tmp_path / "m.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    matrix = np.array(report["confusion_matrix"]["rows_true_columns_predicted"])
    assert matrix.sum() == len(held) == report["n"]
    assert report["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert matrix.sum(axis=1).tolist() == [50, 50, 50]
    assert report["model"]["weights_sha256"] == json.loads(
        (sentiment_model["directory"] / "manifest.json").read_text())["weights_sha256"]


def test_train_command_publishes_a_model_with_held_out_metrics(shared_data, tmp_path):
    fpb = shared_data / "sentiment/financial-phrasebank"
    (tmp_path / "train.txt").write_text("\n".join(str(i) for i in range(0, 2264, 60)))
    (tmp_path / "test.txt").write_text("\n".join(str(i) for i in range(7, 2264, 150)))
    result = _cli("sentiment", "train", "--data", str(fpb / "Sentences_AllAgree.txt"),
                  "--lines", str(tmp_path / "train.txt"), "--eval-data",
                  str(fpb / "Sentences_AllAgree.txt"), "--eval-lines",
                  str(tmp_path / "test.txt"), "--output", str(tmp_path / "models/tiny"),
                  "--epochs", "1", "--max-length", "16")
    assert result.exit_code == 0, result.output
    manifest = json.loads(next((tmp_path / "models/tiny").glob("*/manifest.json")).read_text())
    assert manifest["split"]["train"] + manifest["split"]["validation"] == 38
    assert manifest["test_metrics"]["n"] == 16
    assert "held-out: accuracy" in result.output


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    import subprocess

    bad = tmp_path / "x.csv"
    bad.write_text("text,label\nhello,3\n")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "sentiment", "evaluate",
                          "--data", str(bad), "--model", "nope", "--root", str(tmp_path),
                          "--output", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert run.returncode == 2 and "error:" in run.stderr and "Traceback" not in run.stderr
    assert "no sentiment model 'nope'" in run.stderr


def test_nearest_examples_survive_texts_with_unicode_line_separators(tmp_path):
    from pipeline.sentiment.data import LabelledTexts
    from pipeline.sentiment.examples import NearestExamples, save_examples

    texts = ["Shares\u2028up 5%", "Profit\u2029warning\x85issued", "Flat\x1cday"]
    data = LabelledTexts(texts, np.array([2, 0, 1]), ["a", "b", "c"], "mem")
    vectors = np.eye(3, dtype=np.float32)
    save_examples(tmp_path, vectors, data)
    found = NearestExamples.load(tmp_path).search(np.array([[0.1, 1.0, 0.0]], np.float32), 2)
    assert [(f["id"], f["text"], f["label"]) for f in found[0]] == [
        ("b", texts[1], "negative"), ("a", texts[0], "positive")]


# --- regressions ------------------------------------------------------------------------------

def test_validation_split_never_holds_a_text_that_is_also_in_training():
    """PhraseBank repeats a few sentences (AllAgree: one lands on both sides with seed 0): a
    duplicate in the validation split scores the model on a sentence it trained on, inflating
    the best-epoch choice and fitting the temperature on memorised examples."""
    from pipeline.sentiment.data import stratified_split

    rng = np.random.default_rng(0)
    texts = [f"sentence {i}" for i in range(60)]
    texts += [texts[i] for i in rng.integers(0, 60, 40)]  # 40 repeats of earlier sentences
    labels = np.array([i % 3 for i in range(60)] + [0] * 40)
    for seed in range(5):
        train, val = stratified_split(labels, 0.2, seed, groups=texts)
        assert len(train) + len(val) == len(texts) and len(val) > 0
        assert not {texts[i] for i in train} & {texts[i] for i in val}
    # Without groups: the old per-row behaviour, unchanged.
    train, val = stratified_split(labels, 0.2, 0)
    assert sorted([*train, *val]) == list(range(len(texts)))


def test_training_split_of_real_phrasebank_has_no_leak(shared_data):
    from pipeline.sentiment.train import TrainConfig, train_validation_split

    data = load_labelled(shared_data / "sentiment/financial-phrasebank/Sentences_AllAgree.txt")
    train, val = train_validation_split(data, TrainConfig())
    assert len(train) + len(val) == len(data)
    assert not {data.texts[i] for i in train} & {data.texts[i] for i in val}
    assert abs(len(val) / len(data) - 0.1) < 0.01


def test_training_data_with_a_single_class_is_refused():
    """A file with one class (a filtered export, a wrong --label-map) used to fine-tune and
    publish a 'classifier' that can only ever say that class."""
    from pipeline.sentiment.data import LabelledTexts
    from pipeline.sentiment.train import train_classifier

    data = LabelledTexts([f"Shares rose {i} %" for i in range(20)], np.full(20, 2),
                         [str(i) for i in range(20)], "one-class.csv")
    with pytest.raises(ValueError, match="only one label.*positive"):
        train_classifier(data)


def test_macro_f1_counts_a_class_that_is_predicted_but_absent_from_the_labels():
    """Predictions of a class missing from the data are errors: scikit-learn's macro F1 counts
    that class with F1 0; leaving it out inflated the macro F1 (0.83 instead of 0.56)."""
    from sklearn.metrics import f1_score

    y, p = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    report = classification_report(y, p)
    assert report["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert report["weighted_f1"] == pytest.approx(f1_score(y, p, average="weighted"))
    assert report["per_class"]["positive"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                               "support": 0}
    # A class absent from both labels and predictions stays out, as in scikit-learn.
    y, p = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert classification_report(y, p)["macro_f1"] == pytest.approx(
        f1_score(y, p, average="macro"))


def test_classification_report_refuses_label_indices_outside_the_names():
    """-1 (a 'failed' marker) used to be counted silently in the last column (positive)."""
    with pytest.raises(ValueError, match="outside"):
        classification_report(np.array([0, 1]), np.array([0, -1]))
    with pytest.raises(ValueError, match="outside"):
        classification_report(np.array([0, 3]), np.array([0, 1]))


def test_temperature_is_always_finite_and_within_bounds():
    """Overflowing logits (fp16 infinities) gave a NaN temperature, which turns every
    probability into NaN; perfectly separated logits gave an arbitrary value."""
    inf = np.array([[np.inf, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    t = fit_temperature(inf, np.array([0, 1, 2]))
    assert np.isfinite(t) and 0.05 <= t <= 20.0
    assert fit_temperature(np.full((3, 3), np.nan), np.array([0, 1, 2])) == 1.0
    huge = np.array([[1e30, 0, 0], [0, 1e30, 0], [0, 0, 1e30]] * 3)
    t = fit_temperature(huge, np.array([0, 1, 2] * 3))
    assert np.isfinite(t) and 0.05 <= t <= 20.0


def test_sentences_do_not_split_at_abbreviations_before_a_capital():
    """The abbreviation guards looked behind the position *after* the full stop, so they never
    matched: "Mr. Smith", "U.S. Steel", "Acme Co. Ltd." were cut into fragments, each scored
    as a sentence of its own."""
    from pipeline.sentiment.articles import split_sentences

    body = ("Shares of U.S. Steel fell 4%. Mr. Smith, CEO of Acme Co. Ltd., resigned. "
            "It remains the No. 1 supplier to Widget Inc. Analysts at J.P. Morgan cut the "
            "target to $12. Dr. Jones (St. Louis) agreed!")
    assert split_sentences(body) == [
        "Shares of U.S. Steel fell 4%.", "Mr. Smith, CEO of Acme Co. Ltd., resigned.",
        "It remains the No. 1 supplier to Widget Inc. Analysts at J.P. Morgan cut the target "
        "to $12.", "Dr. Jones (St. Louis) agreed!"]


def test_a_body_of_one_very_long_sentence_is_classified_in_pieces_not_truncated():
    """A body with no sentence ends (a transcript, a press release in one paragraph) was one
    unit, truncated to the model's first max_length tokens: the rest was never read."""
    from pipeline.sentiment.articles import MAX_WORDS, split_sentences

    words = [f"W{i}" for i in range(5 * MAX_WORDS + 3)]
    parts = split_sentences(" ".join(words))
    assert len(parts) == 6 and all(len(p.split()) <= MAX_WORDS for p in parts)
    assert " ".join(parts).split() == words
    sizes = [len(p.split()) for p in split_sentences(" ".join(words[:MAX_WORDS + 2]) + ".")]
    assert sizes == [MAX_WORDS // 2 + 1] * 2  # even pieces, not MAX_WORDS + a 2-word stub
    assert split_sentences("Shares rose. " + " ".join(words[:MAX_WORDS])) == [
        "Shares rose.", " ".join(words[:MAX_WORDS])]


def test_predict_logits_is_deterministic_even_for_a_network_left_in_train_mode():
    """Dropout made predict_logits (validation, the published examples index) random when the
    network was still in train mode; it now runs in eval mode and restores the mode."""
    from transformers import BertConfig, BertModel

    from pipeline.encoder import packaged_model_path
    from pipeline.sentiment.model import PooledClassifier, load_base, predict_logits

    _, tokenizer = load_base(packaged_model_path())
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, hidden_dropout_prob=0.5))
    model = PooledClassifier(encoder, len(LABELS), dropout=0.5).train()
    texts = ["Profit rose", "Shares slumped after the warning"]
    first, _ = predict_logits(model, tokenizer, texts, 16)
    again, _ = predict_logits(model, tokenizer, texts, 16)
    np.testing.assert_array_equal(first, again)
    assert model.training


def test_nearest_examples_do_not_repeat_a_training_sentence_that_occurs_twice(tmp_path):
    """PhraseBank repeats some sentences: the k neighbours were filled with copies of one
    sentence (same text, same label) instead of k different examples."""
    from pipeline.sentiment.data import LabelledTexts
    from pipeline.sentiment.examples import NearestExamples, save_examples

    texts = ["Profit rose", "Profit rose", "Profit rose", "Sales grew", "Outlook cut"]
    data = LabelledTexts(texts, np.array([2, 2, 2, 2, 0]), list("abcde"), "mem")
    vectors = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], np.float32)
    save_examples(tmp_path, vectors, data)
    found = NearestExamples.load(tmp_path).search(np.array([[1.0, 0.1, 0.0]], np.float32), 3)
    assert [(f["text"], f["label"]) for f in found[0]] == [
        ("Profit rose", "positive"), ("Sales grew", "positive"), ("Outlook cut", "negative")]


def test_hf_label_map_values_and_names_are_read_like_data_labels():
    """A map given as a dict (the Python API) with names like 'bearish', or keyed in another
    case than the checkpoint's id2label, failed with a KeyError / was ignored."""
    generic = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    expected = [LABELS.index("negative"), LABELS.index("positive"), LABELS.index("neutral")]
    assert hf_label_order(generic, {"LABEL_0": "bearish", "LABEL_1": "Bullish",
                                    "LABEL_2": "neutral"}) == expected
    assert hf_label_order(generic, {"label_0": "negative", "label_1": "positive",
                                    "label_2": "neutral"}) == expected
    with pytest.raises(ValueError, match="'great'"):
        hf_label_order(generic, {"LABEL_0": "great", "LABEL_1": "positive", "LABEL_2": "neutral"})


def test_held_out_metrics_report_texts_that_were_also_trained_on(sentiment_model):
    """`train --eval-data` scored held-out data without saying that some of it was in the
    training file (FinBERT's inflated PhraseBank numbers): the overlap is now reported."""
    from pipeline.sentiment.train import evaluate_trained

    trained, held = sentiment_model["trained"], sentiment_model["held_out"]
    clean = evaluate_trained(trained, held)
    assert clean["overlap_with_training"] == {"rows": 0, "fraction": 0.0}
    train = trained.data.subset(trained.train_index)
    mixed = held.subset(range(10))
    from pipeline.sentiment.data import LabelledTexts

    mixed = LabelledTexts(mixed.texts + train.texts[:5], np.concatenate(
        [mixed.labels, train.labels[:5]]), mixed.ids + train.ids[:5], "mixed")
    report = evaluate_trained(trained, mixed)
    assert report["overlap_with_training"] == {"rows": 5, "fraction": pytest.approx(5 / 15)}


def test_evaluate_an_hf_checkpoint_with_generic_labels_on_numeric_data(hf_checkpoint, tmp_path):
    """Twitter-style data (0 bearish, 1 bullish, 2 neutral) and a checkpoint whose outputs are
    LABEL_0..2 need two maps: --label-map reads the data, --model-label-map the checkpoint
    (one map for both could not say LABEL_0=positive and 0=negative at once)."""
    import shutil

    from transformers import AutoConfig

    directory = shutil.copytree(hf_checkpoint[0], tmp_path / "generic")
    config = AutoConfig.from_pretrained(directory)
    config.id2label = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.save_pretrained(directory)
    data = tmp_path / "tweets.csv"
    data.write_text("text,label\nShares slump after the profit warning,0\n"
                    "Record quarter lifts the stock,1\nThe board meets on Tuesday,2\n")
    out = tmp_path / "metrics.json"
    run = _cli("sentiment", "evaluate", "--data", str(data), "--model", str(directory),
               "--backend", "hf", "--format", "csv", "--label-map",
               "0=negative,1=positive,2=neutral", "--model-label-map",
               "LABEL_0=positive,LABEL_1=negative,LABEL_2=neutral", "--output", str(out))
    assert run.exit_code == 0, run.output
    report = json.loads(out.read_text())
    assert report["data"]["label_map"] == {"0": "negative", "1": "positive", "2": "neutral"}
    want = HFClassifier(hf_checkpoint[0]).classify(  # the same network, labels named
        ["Shares slump after the profit warning", "Record quarter lifts the stock",
         "The board meets on Tuesday"])
    truth = ["negative", "positive", "neutral"]
    assert report["n"] == 3
    assert report["accuracy"] == pytest.approx(
        sum(p.label == t for p, t in zip(want, truth, strict=True)) / 3)


def _tiny_labelled_csv(tmp_path):
    import csv

    data = tmp_path / "tiny.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((f"company {i} reports {word} results", label) for i in range(4)
                         for word, label in (("weak", "negative"), ("steady", "neutral"),
                                             ("strong", "positive")))
    return data


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_train_checks_where_the_model_goes_before_any_work(tmp_path, monkeypatch):
    """A model folder that cannot be written used to fail after the whole fine-tuning (many
    minutes on the full data), as a bare "Not a directory"."""
    import pipeline.sentiment.train as train_module

    trained = []
    monkeypatch.setattr(train_module, "train_classifier",
                        lambda *args, **kwargs: trained.append(args))
    data = _tiny_labelled_csv(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a folder")
    for output, expected in ((blocker / "tiny", f"{blocker} is a file"),
                             (blocker, f"{blocker} is a file"),
                             (tmp_path / "models" / "..", "'..'")):
        result = _cli("sentiment", "train", "--data", str(data), "--output", str(output))
        text = _flat(result.output)
        assert result.exit_code == 2, text
        assert "--output" in text and expected in text, text
        assert "labelled texts" not in text  # refused before the data was read
    monkeypatch.setenv("FINSENTINEL_KEEP_INDEX_VERSIONS", "ten")
    result = _cli("sentiment", "train", "--data", str(data), "--output",
                  str(tmp_path / "models" / "tiny"))
    text = _flat(result.output)
    assert result.exit_code == 2 and "FINSENTINEL_KEEP_INDEX_VERSIONS" in text, text
    assert "labelled texts" not in text
    assert trained == [] and not (tmp_path / "models").exists()


def test_train_prints_each_epoch_as_it_ends(tmp_path, monkeypatch):
    """Fine-tuning takes minutes per epoch: each epoch's result stays on the screen (and in a
    log), not only in a spinner that is gone when the command ends, or never shown off a
    terminal."""
    from types import SimpleNamespace

    import pipeline.sentiment.train as train_module

    class Trained:
        validation, seconds, head = {"accuracy": 0.5}, 2.0, SimpleNamespace(temperature=1.0)

        def publish(self, output, extra):
            return "v1", output / "v1"

    def fake_train(labelled, config, progress=None):
        for epoch in range(1, config.epochs + 1):
            progress(json.dumps({"epoch": epoch, "train_loss": 1.0 / epoch,
                                 "seconds": 60.0 * epoch, "val_accuracy": 0.5,
                                 "val_nll": 0.9}))
        return Trained()

    monkeypatch.setattr(train_module, "train_classifier", fake_train)
    result = _cli("sentiment", "train", "--data", str(_tiny_labelled_csv(tmp_path)),
                  "--output", str(tmp_path / "models" / "tiny"), "--epochs", "2")
    text = _flat(result.output)
    assert result.exit_code == 0, text
    assert "epoch 1/2: train loss 1.0000, validation accuracy 0.5000 (60 s)" in text, text
    assert "epoch 2/2: train loss 0.5000" in text, text


def test_an_unknown_backend_or_format_is_refused_naming_the_option(tmp_path):
    data = _tiny_labelled_csv(tmp_path)
    for args, option, value in (
            (["classify", "--input", str(data), "--model", "m", "--output",
              str(tmp_path / "n.parquet"), "--backend", "bert"], "--backend", "bert"),
            (["evaluate", "--data", str(data), "--model", "m", "--output",
              str(tmp_path / "m.json"), "--format", "tsv"], "--format", "tsv"),
            (["train", "--data", str(data), "--output", str(tmp_path / "models" / "m"),
              "--format", "tsv"], "--format", "tsv")):
        result = _cli("sentiment", *args)
        text = _flat(result.output)
        assert result.exit_code == 2, (text, result.exception)
        assert f"{option}: expected one of" in text and repr(value) in text, text
